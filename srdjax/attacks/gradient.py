"""Gradient attacks with a fixed step: FGSM, PGD (L∞/L2), CW, and PGD on any per-sample loss."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from srdjax.attacks.inputs import (_check_choice, _check_count, _check_ids, _check_inputs,
                                   _check_key, _check_number)
from srdjax.attacks.losses import LOSSES
from srdjax.attacks.loops import (Best, _apply, _compiled, _goal, _loop, _restarts, _row_ids,
                                  _Step, _value_and_grad)
from srdjax.attacks.norms import NORMS
from srdjax.checks import check, check_images


def _pgd_body(settings, consts, i, carry):
    loss, norm = settings
    goal, step_size = consts
    nrm = NORMS[norm]
    x_adv, best = carry
    (value, success), grad = _value_and_grad(goal.objective(loss))(x_adv)
    best = best.update(x_adv, value, success)
    return nrm.project(x_adv + step_size * nrm.direction(grad), goal.x, goal.eps), best


def _pgd_last(settings, goal, carry):
    x_adv, best = carry
    return best.update(x_adv, *goal.objective(settings[0])(x_adv))


def _pgd_run(goal, start, step_size, steps, loss, norm):
    """One PGD run from `start`; returns the best point visited (the start included)."""
    settings = (loss, norm)
    carry = _loop(steps, _Step(_pgd_body, settings, (goal, step_size)),
                  (start, Best.empty(goal.x)))
    return _apply(_pgd_last, settings, goal, carry)


def _fgsm_rule(settings, goal):
    nrm = NORMS[settings[0]]
    (_, _), grad = _value_and_grad(goal.objective("ce"))(goal.x)
    return nrm.project(goal.x + goal.eps * nrm.direction(grad), goal.x, goal.eps)


def _fgsm_impl(fn, x, y, target, eps, *, norm):
    adv = _apply(_fgsm_rule, (norm,), _goal(fn, x, y, target, eps))
    return jax.lax.stop_gradient(adv.astype(x.dtype))


def _pgd_impl(fn, x, y, target, eps, step_size, confidence, key, ids, *, steps, norm, loss,
              restarts, random_start):
    goal = _goal(fn, x, y, target, eps, confidence)
    step_size = jnp.asarray(step_size, x.dtype)
    run = lambda start: _pgd_run(goal, start, step_size, steps, loss, norm)
    return _restarts(run, x, key, restarts, random_start, norm, goal.eps, _row_ids(ids, x))


_fgsm = _compiled(_fgsm_impl, ("norm",))
_pgd = _compiled(_pgd_impl, ("steps", "norm", "loss", "restarts", "random_start"))


def fgsm(logits_fn, x, y, *, eps, key=None, norm="linf", target=None, ids=None):
    """One step of size eps along the sign (L∞) or normalised (L2) gradient of the CE loss
    (Goodfellow et al. 2015); toward `target` when given. `key` and `ids` are unused (kept for
    the common call signature)."""
    _check_inputs(logits_fn, x, y, eps, target, norm)
    return _fgsm(logits_fn, x, y, target, eps, norm=norm)


def pgd(logits_fn, x, y, *, eps, key, steps=20, step_size=None, norm="linf", loss="ce",
        restarts=1, random_start=True, target=None, confidence=float("inf"), ids=None):
    """Projected gradient ascent on `loss` (Madry et al. 2018) under the L∞ or L2 ball.

    step_size defaults to 2.5 * eps / steps. Each of `restarts` runs starts at a random point of the
    ball (or at x without `random_start`); per sample the result is the best point visited over
    all runs: a successful one (misclassified, or classified as `target`) if any, else the one
    with the highest loss. Image i's start r is drawn from fold_in(fold_in(key, r), ids[i])
    (ids default 0..N-1), so its result does not depend on the other images of its batch.
    """
    _check_inputs(logits_fn, x, y, eps, target, norm)
    _check_ids(ids, jnp.shape(x)[0])
    _check_key(key)
    _check_count(steps, "steps")
    _check_count(restarts, "restarts")
    _check_choice(loss, LOSSES, "loss")
    step_size = 2.5 * eps / steps if step_size is None else step_size
    _check_number(step_size, "step_size")
    return _pgd(logits_fn, x, y, target, eps, step_size, confidence, key, ids, steps=steps,
                norm=norm, loss=loss, restarts=restarts, random_start=random_start)


def cw(logits_fn, x, y, *, eps, key, steps=30, step_size=None, confidence=50.0, norm="linf",
       restarts=1, random_start=True, target=None, ids=None):
    """PGD on the Carlini-Wagner margin loss (best wrong logit minus true logit, capped at
    `confidence`): the 'CW∞' attack of Madry et al. and the robustness benchmarks."""
    return pgd(logits_fn, x, y, eps=eps, key=key, steps=steps, step_size=step_size, norm=norm,
               loss="margin", restarts=restarts, random_start=random_start, target=target,
               confidence=confidence, ids=ids)


def pgd_on_loss(loss_fn, x, *, eps, key, steps=10, step_size=None, norm="linf",
                random_start=True, ids=None):
    """Maximises an arbitrary per-sample loss `loss_fn(x_adv) -> [N]` by PGD in the eps-ball.

    The building block for adversarial training with a custom loss and for attacks on internal
    quantities (e.g. pushing a latent toward a wrong cluster). Returns per sample the visited
    point of highest loss, with stop_gradient.
    """
    check(callable(loss_fn), f"loss_fn must be a callable images -> [N] losses, got "
                             f"{type(loss_fn).__name__}")
    check_images(x, "images", channels=None)
    _check_ids(ids, jnp.shape(x)[0])
    _check_number(eps, "eps")
    _check_key(key)
    _check_choice(norm, NORMS, "norm")
    _check_count(steps, "steps")
    step_size = 2.5 * eps / steps if step_size is None else step_size
    _check_number(step_size, "step_size")
    return _pgd(loss_fn, x, None, None, eps, step_size, jnp.inf, key, ids, steps=steps,
                norm=norm, loss="given", restarts=1, random_start=random_start)

