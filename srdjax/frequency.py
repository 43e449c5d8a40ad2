"""Low/high frequency split of images: x = low + high.

Default low-pass is the Tikhonov (quadratic gradient penalty) filter of uGuard,

    low = argmin_u ½‖u − x‖² + (λ/2) Σ‖∇u‖²,   i.e.   (I + λ ∇ᵀ∇) low = x,

solved in closed form with the FFT. The image is first padded symmetrically by `pad` pixels
(numpy's "symmetric" mode: reflected with the edge pixel repeated), then ∇ is taken as forward
differences with *periodic* boundary on the padded image, so ∇ᵀ∇ is diagonalised by the DFT with
eigenvalues 4 sin²(π k_y/H) + 4 sin²(π k_x/W); the padding keeps the wrap-around seam away from the
kept pixels. The option "gaussian" is a Gaussian blur with scipy.ndimage's sampled kernel
(truncate = 4σ) and its "reflect" boundary (the same symmetric extension).

Both filters are positive and preserve constants, so low stays within the range of x. Everything is
linear in x, jittable, batched over N and differentiable (real FFTs, pads and slices only).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from srdjax.checks import check, check_images

METHODS = ("tikhonov", "gaussian")


def _tikhonov_transfer(height: int, width: int, lam, dtype):
    """1 / (1 + λ |F∇|²) on the rfft2 grid of a [height, width] image."""
    ky = np.sin(np.pi * np.fft.fftfreq(height)) ** 2
    kx = np.sin(np.pi * np.fft.rfftfreq(width)) ** 2
    laplacian = 4.0 * (ky[:, None] + kx[None, :])
    return 1.0 / (1.0 + lam * jnp.asarray(laplacian, dtype))


@functools.partial(jax.jit, static_argnames=("pad",))
def tikhonov_low_pass(x, lam=5.0, *, pad: int = 16):
    """Tikhonov low-pass of NHWC images x (no range checks; see `low_pass`)."""
    _, height, width, _ = x.shape
    padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="symmetric")
    ph, pw = height + 2 * pad, width + 2 * pad
    spectrum = jnp.fft.rfft2(padded, axes=(1, 2))
    transfer = _tikhonov_transfer(ph, pw, lam, x.dtype)
    low = jnp.fft.irfft2(spectrum * transfer[None, :, :, None], s=(ph, pw), axes=(1, 2))
    return low[:, pad:pad + height, pad:pad + width, :].astype(x.dtype)


def gaussian_kernel(sigma: float, truncate: float = 4.0) -> np.ndarray:
    """scipy.ndimage.gaussian_filter1d's kernel: radius int(truncate·σ + 0.5), normalised."""
    radius = int(truncate * float(sigma) + 0.5)
    taps = np.arange(-radius, radius + 1, dtype=np.float64)
    weights = np.exp(-0.5 * (taps / float(sigma)) ** 2)
    return weights / weights.sum()


@functools.partial(jax.jit, static_argnames=("sigma",))
def gaussian_low_pass(x, *, sigma: float = 2.5):
    """Separable Gaussian blur of NHWC images x with scipy's "reflect" (symmetric) boundary."""
    weights = gaussian_kernel(sigma)
    radius = len(weights) // 2

    def blur(img, axis):
        size = img.shape[axis]
        widths = [(0, 0)] * img.ndim
        widths[axis] = (radius, radius)
        padded = jnp.pad(img, widths, mode="symmetric")
        out = 0.0
        for offset, weight in enumerate(weights):
            out = out + weight * jax.lax.slice_in_dim(padded, offset, offset + size, axis=axis)
        return out

    return blur(blur(x, 1), 2).astype(x.dtype)


def low_pass(x, *, method: str = "tikhonov", lam=5.0, pad: int = 16, sigma: float = 2.5):
    """Low-frequency part of NHWC images x in [0, 1].

    method "tikhonov" uses `lam` and `pad`; method "gaussian" uses `sigma` (default 2.5 puts its
    half-power frequency, ≈0.075 cycles/pixel, near the Tikhonov λ = 5 filter's ≈0.072).
    """
    check_images(x, "images", channels=None)
    check(method in METHODS, f"method must be one of {METHODS}, got {method!r}")
    if method == "tikhonov":
        check(isinstance(pad, (int, np.integer)) and pad >= 0,
              f"pad must be a non-negative integer, got {pad!r}")
        check(not isinstance(lam, (int, float)) or lam >= 0, f"lam must be >= 0, got {lam}")
        return tikhonov_low_pass(x, lam, pad=int(pad))
    check(float(sigma) > 0, f"sigma must be > 0, got {sigma}")
    return gaussian_low_pass(x, sigma=float(sigma))


def split(x, *, method: str = "tikhonov", lam=5.0, pad: int = 16, sigma: float = 2.5):
    """(low, high) with high = x − low, so low + high reproduces x (up to one float rounding).

    x: float images [N, H, W, C] in [0, 1]. See `low_pass` for the options.
    """
    low = low_pass(x, method=method, lam=lam, pad=pad, sigma=sigma)
    return low, x - low
