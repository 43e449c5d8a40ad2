"""Input-transformation baselines (JPEG, bit-depth reduction, Gaussian blur) and BPDA wrappers.

Each defense is a pure jax function images -> images ([N, H, W, C] in [0, 1], same shape and dtype),
so it composes with a classifier into one `logits_fn` that the attacks in `srdjax.attacks` attack
as a whole. JPEG and bit-depth reduction round, so their true gradient is zero almost everywhere;
an attack that differentiates them learns nothing, which is why published evaluations of such
defenses overstated them (Athalye et al. 2018). Wrap them with `bpda` to attack them properly:
`logits_fn = lambda x: model(bpda(jpeg)(x))`.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from srdjax.checks import check

# ITU-T T.81 Annex K tables (the ones libjpeg scales by quality).
_LUMA_TABLE = np.array([
    [16, 11, 10, 16, 24, 40, 51, 61], [12, 12, 14, 19, 26, 58, 60, 55],
    [14, 13, 16, 24, 40, 57, 69, 56], [14, 17, 22, 29, 51, 87, 80, 62],
    [18, 22, 37, 56, 68, 109, 103, 77], [24, 35, 55, 64, 81, 104, 113, 92],
    [49, 64, 78, 87, 103, 121, 120, 101], [72, 92, 95, 98, 112, 100, 103, 99]])
_CHROMA_TABLE = np.array([
    [17, 18, 24, 47, 99, 99, 99, 99], [18, 21, 26, 66, 99, 99, 99, 99],
    [24, 26, 56, 99, 99, 99, 99, 99], [47, 66, 99, 99, 99, 99, 99, 99],
    [99, 99, 99, 99, 99, 99, 99, 99], [99, 99, 99, 99, 99, 99, 99, 99],
    [99, 99, 99, 99, 99, 99, 99, 99], [99, 99, 99, 99, 99, 99, 99, 99]])
# JFIF full-range RGB <-> YCbCr.
_RGB_TO_YCC = np.array([[0.299, 0.587, 0.114],
                        [-0.168735892, -0.331264108, 0.5],
                        [0.5, -0.418687589, -0.081312411]])
_YCC_TO_RGB = np.linalg.inv(_RGB_TO_YCC)
# Full float32 matmuls: TF32/bf16 defaults on accelerators would move pixel values across the
# rounding boundaries this emulation depends on.
_einsum = functools.partial(jnp.einsum, precision=jax.lax.Precision.HIGHEST)


def quantization_table(base: np.ndarray, quality: int) -> np.ndarray:
    """libjpeg's `jpeg_quality_scaling` with baseline clamping to [1, 255]."""
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    return np.clip((base * scale + 50) // 100, 1, 255).astype(np.float64)


def _dct_matrix(n: int = 8) -> np.ndarray:
    """Orthonormal DCT-II: JPEG's 8x8 FDCT is exactly D @ block @ D.T with this D."""
    k = np.arange(n)[:, None]
    d = np.cos(np.pi * (2 * np.arange(n)[None, :] + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    d[0] /= np.sqrt(2.0)
    return d


def _to_8bit(v):
    return jnp.clip(jnp.round(v), 0.0, 255.0)


def _blockwise(fn, plane):
    """Applies `fn` to every 8x8 block of planes [N, H, W] (H, W multiples of 8)."""
    n, h, w = plane.shape
    blocks = plane.reshape(n, h // 8, 8, w // 8, 8)
    return fn(blocks).reshape(n, h, w)


def _code_plane(plane, table):
    """Level shift, 8x8 DCT, quantise with `table`, dequantise, inverse DCT."""
    d = jnp.asarray(_dct_matrix(), plane.dtype)
    q = jnp.asarray(table, plane.dtype)

    def code(blocks):
        coef = _einsum("uh,nahbw,vw->nabuv", d, blocks - 128.0, d)
        coef = jnp.round(coef / q) * q
        # libjpeg stores decoded samples as 8-bit integers before any further step.
        return _to_8bit(_einsum("uh,nabuv,vw->nahbw", d, coef, d) + 128.0)
    return _blockwise(code, plane)


def _downsample(plane):
    """libjpeg's h2v2 downsampling: 2x2 sums rounded with a bias alternating 1, 2 by column."""
    n, h, w = plane.shape
    sums = plane.reshape(n, h // 2, 2, w // 2, 2).sum(axis=(2, 4))
    bias = jnp.tile(jnp.asarray([1.0, 2.0], plane.dtype), w // 4)
    return jnp.floor((sums + bias) / 4.0)


def _neighbours(v, axis):
    """The previous and next entries along `axis`, replicating the edges."""
    idx = jnp.arange(v.shape[axis])
    prev = jnp.take(v, jnp.maximum(idx - 1, 0), axis=axis)
    nxt = jnp.take(v, jnp.minimum(idx + 1, v.shape[axis] - 1), axis=axis)
    return prev, nxt


def _interleave(even, odd, axis):
    shape = list(even.shape)
    shape[axis] *= 2
    return jnp.stack([even, odd], axis=axis + 1).reshape(shape)


def _fancy_upsample(plane):
    """libjpeg's default h2v2 'fancy' upsampling: triangle weights 9/16, 3/16, 3/16, 1/16, with its
    integer rounding (colsum = 3 near + far rows; then (3 this + neighbour + 8 or 7) >> 4)."""
    up, down = _neighbours(plane, 1)
    colsum = _interleave(3.0 * plane + up, 3.0 * plane + down, 1)
    left, right = _neighbours(colsum, 2)
    return _interleave(jnp.floor((3.0 * colsum + left + 8.0) / 16.0),
                       jnp.floor((3.0 * colsum + right + 7.0) / 16.0), 2)


@functools.partial(jax.jit, static_argnames=("quality", "subsampling"))
def jpeg(x: jax.Array, quality: int = 75, subsampling: bool = True) -> jax.Array:
    """JPEG compress-decompress of RGB images in [0, 1], in JAX.

    Follows libjpeg's baseline path: 8-bit input, JFIF YCbCr, chroma 4:2:0 subsampling by 2x2
    averaging when `subsampling` (Pillow's default: chroma subsampling IS done unless
    `subsampling=False`, which keeps 4:4:4), orthonormal
    8x8 DCT, the Annex K tables scaled by `quality`, rounding, inverse DCT, 'fancy' chroma
    upsampling, 8-bit output. It computes the DCT in floating point where libjpeg uses integer
    arithmetic, so a coefficient near a rounding boundary can land on the other side: against
    Pillow 13 (libjpeg-turbo) on CIFAR-10 at quality 75, the mean difference is 0.4/255 (JPEG itself
    changes 6/255) and 80% of values are identical. Edges are padded by replication
    to whole blocks, as libjpeg does. The gradient is zero almost everywhere: attack it with `bpda`.
    """
    check(isinstance(quality, (int, np.integer)) and 1 <= quality <= 100,
          f"jpeg quality must be an integer in [1, 100], got {quality!r}")
    check(x.ndim == 4 and x.shape[-1] == 3, f"jpeg needs RGB images [N, H, W, 3], got {x.shape}")
    n, h, w, _ = x.shape
    unit = 16 if subsampling else 8
    ph, pw = -h % unit, -w % unit
    pixels = jnp.round(jnp.clip(x, 0.0, 1.0) * 255.0)
    pixels = jnp.pad(pixels, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="edge")
    ycc = _to_8bit(_einsum("nhwc,dc->nhwd", pixels, jnp.asarray(_RGB_TO_YCC, x.dtype))
                   + jnp.asarray([0.0, 128.0, 128.0], x.dtype))
    luma_q = quantization_table(_LUMA_TABLE, quality)
    chroma_q = quantization_table(_CHROMA_TABLE, quality)
    planes = [_code_plane(ycc[..., 0], luma_q)]
    for ch in (1, 2):
        plane = ycc[..., ch]
        if subsampling:
            coded = _code_plane(_downsample(plane), chroma_q)
            plane = _fancy_upsample(coded)
        else:
            plane = _code_plane(plane, chroma_q)
        planes.append(plane)
    ycc = jnp.stack(planes, axis=-1) - jnp.asarray([0.0, 128.0, 128.0], x.dtype)
    rgb = _einsum("nhwc,dc->nhwd", ycc, jnp.asarray(_YCC_TO_RGB, x.dtype))
    rgb = jnp.clip(jnp.round(rgb), 0.0, 255.0) / 255.0
    return rgb[:, :h, :w, :].astype(x.dtype)


@functools.partial(jax.jit, static_argnames=("bits",))
def bit_depth(x: jax.Array, bits: int = 4) -> jax.Array:
    """Rounds every value to the nearest of 2**bits evenly spaced levels in [0, 1] (feature
    squeezing, Xu et al. 2018)."""
    check(isinstance(bits, (int, np.integer)) and 1 <= bits <= 16,
          f"bit_depth bits must be an integer in [1, 16], got {bits!r}")
    levels = float(2 ** bits - 1)
    return (jnp.round(x * levels) / levels).astype(x.dtype)


def _blur_matrix(n: int, sigma: float, truncate: float) -> np.ndarray:
    """The [n, n] matrix of scipy.ndimage's 1-d Gaussian filter with mode='reflect'."""
    radius = int(truncate * sigma + 0.5)
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    # numpy's 'symmetric' padding is scipy's 'reflect' (d c b a | a b c d), repeated if needed.
    source = np.pad(np.arange(n), radius, mode="symmetric")
    matrix = np.zeros((n, n))
    for i in range(n):
        np.add.at(matrix[i], source[i:i + 2 * radius + 1], taps)
    return matrix


@functools.partial(jax.jit, static_argnames=("sigma", "truncate"))
def gaussian_blur(x: jax.Array, sigma: float = 1.0, truncate: float = 4.0) -> jax.Array:
    """Per-channel Gaussian blur over H and W, as scipy.ndimage.gaussian_filter(mode='reflect').

    The separable filter with its boundary folded in is a fixed [H, H] and [W, W] matrix, so the
    blur is two small matmuls: exact, differentiable, and cheap at CIFAR and ImageNet sizes.
    """
    check(isinstance(sigma, (int, float, np.integer, np.floating)) and sigma > 0,
          f"gaussian_blur sigma must be a number > 0, got {sigma!r}")
    check(x.ndim == 4, f"gaussian_blur needs images [N, H, W, C], got shape {x.shape}")
    _, h, w, _ = x.shape
    rows = jnp.asarray(_blur_matrix(h, float(sigma), truncate), x.dtype)
    cols = jnp.asarray(_blur_matrix(w, float(sigma), truncate), x.dtype)
    return _einsum("ih,nhwc,jw->nijc", rows, x, cols)


def bpda(forward: Callable, backward: Callable | None = None) -> Callable:
    """A function whose value is `forward(x, *args)` and whose gradient is that of `backward`.

    Backward Pass Differentiable Approximation (Athalye et al. 2018). `backward` defaults to the
    identity (straight-through): the right choice for a transform that approximately returns its
    input (JPEG, quantisation, purification). Gradients flow to `args` only through `backward`;
    with the identity they get none.
    """
    check(callable(forward), f"bpda forward must be callable, got {type(forward).__name__}")
    check(backward is None or callable(backward),
          f"bpda backward must be callable or None, got {type(backward).__name__}")
    surrogate = backward if backward is not None else (lambda x, *args: x)

    @jax.custom_vjp
    def wrapped(x, *args):
        return forward(x, *args)

    def fwd(x, *args):
        return forward(x, *args), (x, args)

    def bwd(residuals, cotangent):
        x, args = residuals
        _, vjp = jax.vjp(surrogate, x, *args)
        return vjp(cotangent)

    wrapped.defvjp(fwd, bwd)
    return wrapped


def straight_through(x: jax.Array, y: jax.Array) -> jax.Array:
    """Value y (up to one rounding of x + (y - x)), gradient of the identity in x.

    Prefer `bpda` where the forward value must be bit-exact.
    """
    return x + jax.lax.stop_gradient(y - x)
