"""Input checks at the library's boundaries: one clear error line per bad value.

Shape and dtype checks work on traced arrays too; value checks (range, NaN) only run on concrete
arrays, because inside `jit` the values are not known. Public entry points call these before
jitting, so a user's bad input is caught where the user can see it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


class SrdjaxError(ValueError):
    """A bad input, config value or file: the message names the value and what was expected."""


def is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _local(x) -> bool:
    """Whether all of x can be fetched to this host (not so for an array spread over several
    processes: such arrays are checked with on-device reductions instead)."""
    return not isinstance(x, jax.Array) or x.is_fully_addressable


def check(condition: bool, message: str) -> None:
    if not condition:
        raise SrdjaxError(message)


def check_finite(x, name: str) -> None:
    """NaN and infinity are refused (only checked on concrete arrays)."""
    if is_concrete(x) and jnp.issubdtype(jnp.result_type(x), jnp.floating):
        finite = np.all(np.isfinite(np.asarray(x))) if _local(x) else bool(jnp.isfinite(x).all())
        if not finite:
            raise SrdjaxError(f"{name} contains NaN or infinite values")


def check_images(x, name: str = "images", *, channels: int | None = 3) -> None:
    """Float images [N, H, W, C] with values in [0, 1]."""
    shape = jnp.shape(x)
    check(len(shape) == 4, f"{name} must be NHWC with rank 4, got shape {tuple(shape)}")
    if channels is not None:
        check(shape[-1] == channels,
              f"{name} must have {channels} channels last (NHWC), got shape {tuple(shape)}")
    dtype = jnp.result_type(x)
    check(jnp.issubdtype(dtype, jnp.floating),
          f"{name} must be floating point in [0, 1], got dtype {dtype}")
    if is_concrete(x):
        check_finite(x, name)
        if jnp.size(x):
            arr = np.asarray(x) if _local(x) else x
            lo, hi = float(arr.min()), float(arr.max())
            check(lo >= 0.0 and hi <= 1.0,
                  f"{name} must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}]")


def check_labels(y, n: int, num_classes: int | None = None, name: str = "labels") -> None:
    shape = jnp.shape(y)
    check(len(shape) == 1 and shape[0] == n,
          f"{name} must have shape [{n}] to match the batch, got {tuple(shape)}")
    check(jnp.issubdtype(jnp.result_type(y), jnp.integer),
          f"{name} must be integers, got dtype {jnp.result_type(y)}")
    if num_classes is not None and is_concrete(y) and n:
        arr = np.asarray(y)
        check(arr.min() >= 0 and arr.max() < num_classes,
              f"{name} must lie in [0, {num_classes - 1}], got [{arr.min()}, {arr.max()}]")
