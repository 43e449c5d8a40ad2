"""Per-sample attack losses (larger = more adversarial) and the objective a gradient attack
maximises: CE, the Carlini-Wagner margin, DLR and targeted DLR (Croce & Hein 2020)."""
from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp

from srdjax.checks import SrdjaxError


def _logit_of(logits, labels):
    return jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]


def _best_other(logits, labels):
    """The largest logit among the classes other than `labels`."""
    mask = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.bool_)
    return jnp.max(jnp.where(mask, -jnp.inf, logits), axis=-1)


def ce_loss(logits, labels):
    return jax.nn.logsumexp(logits, axis=-1) - _logit_of(logits, labels)


def margin_loss(logits, labels, confidence=jnp.inf):
    """Carlini-Wagner: best wrong logit minus true logit, capped at `confidence`."""
    return jnp.minimum(_best_other(logits, labels) - _logit_of(logits, labels), confidence)


def dlr_loss(logits, labels):
    """Difference of logits ratio (Croce & Hein 2020): shift- and scale-invariant margin."""
    top = jnp.sort(logits, axis=-1)[:, ::-1]
    scale = top[:, 0] - top[:, 2] + 1e-12
    return (_best_other(logits, labels) - _logit_of(logits, labels)) / scale


def targeted_ce_loss(logits, target):
    return -ce_loss(logits, target)


def targeted_margin_loss(logits, target, confidence=jnp.inf):
    return jnp.minimum(_logit_of(logits, target) - _best_other(logits, target), confidence)


def targeted_dlr_loss(logits, labels, target):
    top = jnp.sort(logits, axis=-1)[:, ::-1]
    scale = top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + 1e-12
    return (_logit_of(logits, target) - _logit_of(logits, labels)) / scale


LOSSES = ("ce", "margin", "dlr")


def _objective(fn, loss, labels, target, confidence=jnp.inf, reach=None):
    """x_adv -> (per-sample loss, per-sample success) for the chosen loss and goal; with
    loss="given", `fn` itself returns the per-sample loss and nothing counts as success.
    Success: predicted as `reach` when given, else misclassified."""
    def objective(x_adv):
        if loss == "given":
            value = fn(x_adv)
            chex.assert_shape(value, (x_adv.shape[0],))
            return value, jnp.zeros(value.shape, jnp.bool_)
        logits = fn(x_adv)
        chex.assert_shape(logits, (labels.shape[0], None))
        if loss == "dlr" and logits.shape[-1] < (3 if target is None else 4):
            raise SrdjaxError(f"the dlr loss needs at least {3 if target is None else 4} classes, "
                              f"got logits of shape {logits.shape}")
        predicted = jnp.argmax(logits, axis=-1)
        success = predicted != labels if reach is None else predicted == reach
        if target is None:
            value = {"ce": ce_loss, "dlr": dlr_loss,
                     "margin": functools.partial(margin_loss, confidence=confidence)}[loss]
            return value(logits, labels), success
        value = {"ce": lambda z: targeted_ce_loss(z, target),
                 "dlr": lambda z: targeted_dlr_loss(z, labels, target),
                 "margin": lambda z: targeted_margin_loss(z, target, confidence)}[loss]
        return value(logits), success
    return objective

