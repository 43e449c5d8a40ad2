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


def _value_range(x) -> tuple[float, float, bool]:
    """(min, max, all finite) of a concrete array. An array on an accelerator or spread over
    several processes is reduced where it lives (three scalars come back, not the batch)."""
    on_device = isinstance(x, jax.Array) and (
        not _local(x) or any(d.platform != "cpu" for d in x.devices()))
    if on_device:
        lo, hi, finite = _device_range(x)
        return float(lo), float(hi), bool(finite)
    arr = np.asarray(x)
    finite = bool(np.all(np.isfinite(arr)))
    if not finite:
        return float("nan"), float("nan"), False
    return float(arr.min()), float(arr.max()), True


@jax.jit
def _device_range(x):
    ok = jnp.isfinite(x)
    return (jnp.min(jnp.where(ok, x, jnp.inf)), jnp.max(jnp.where(ok, x, -jnp.inf)),
            jnp.all(ok))


def check_images(x, name: str = "images", *, channels: int | None = 3) -> None:
    """Float images [N, H, W, C] with values in [0, 1], finite, at least one image."""
    check(hasattr(x, "shape") and hasattr(x, "dtype"),
          f"{name} must be an array [N, H, W, C], got {type(x).__name__}")
    shape = tuple(jnp.shape(x))
    check(len(shape) == 4, f"{name} must be NHWC with rank 4, got shape {shape}")
    if channels is not None:
        check(shape[-1] == channels,
              f"{name} must have {channels} channels last (NHWC), got shape {shape}")
    dtype = jnp.result_type(x)
    hint = " (uint8 images: divide by 255)" if jnp.issubdtype(dtype, jnp.integer) else ""
    check(jnp.issubdtype(dtype, jnp.floating),
          f"{name} must be floating point in [0, 1], got dtype {dtype}{hint}")
    if is_concrete(x) and jnp.size(x):
        lo, hi, finite = _value_range(x)
        check(finite, f"{name} contains NaN or infinite values")
        scale = " (0-255 values? divide by 255)" if hi > 1.0 and hi <= 255.0 and lo >= 0 else ""
        check(lo >= 0.0 and hi <= 1.0,
              f"{name} must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}]{scale}")


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
