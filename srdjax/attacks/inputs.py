"""Checks of an attack's arguments at its boundary: one clear error line for a bad value."""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from srdjax.attacks.norms import NORMS
from srdjax.checks import check, check_images, check_labels, is_concrete


def _check_number(value, name, minimum=0.0):
    if is_concrete(value):
        v = float(np.asarray(value))
        check(np.ndim(value) == 0 and math.isfinite(v) and v >= minimum,
              f"{name} must be a finite number >= {minimum:g}, got {value!r}")


def _check_count(value, name):
    check(isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1,
          f"{name} must be an integer >= 1, got {value!r}")


def _check_choice(value, choices, name):
    check(value in choices, f"unknown {name} {value!r}; expected one of {sorted(choices)}")


def _check_key(key):
    check(key is not None, "key must be a jax.random key, got None")


def _check_inputs(logits_fn, x, y, eps, target=None, norm="linf"):
    check(callable(logits_fn), f"logits_fn must be a callable images -> logits, got "
                               f"{type(logits_fn).__name__}")
    check_images(x, "images", channels=None)
    check_labels(y, jnp.shape(x)[0], name="labels")
    if target is not None:
        check_labels(target, jnp.shape(x)[0], name="target labels")
    _check_number(eps, "eps")
    _check_choice(norm, NORMS, "norm")


def _check_ids(ids, n):
    if ids is not None:
        check(jnp.shape(ids) == (n,) and jnp.issubdtype(jnp.result_type(ids), jnp.integer),
              f"ids must be integers of shape ({n},), got {jnp.result_type(ids)} {jnp.shape(ids)}")
