"""Input-transformation defenses against Pillow, numpy and scipy; BPDA gradients."""
import io
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage
from PIL import Image

from srdjax import defenses
from srdjax.checks import SrdjaxError

DATA_DIR = Path(os.environ.get(
    "SRDJAX_DATA_DIR", Path(__file__).resolve().parents[1].parent / "shared/data/cifar10"))


@pytest.fixture(scope="module")
def cifar_uint8():
    path = DATA_DIR / "test.npz"
    if not path.exists():
        pytest.skip(f"CIFAR-10 not found at {path}")
    with np.load(path, allow_pickle=False) as data:
        return data["x"][:32]


def _pillow_jpeg(images, quality, subsampling):
    out = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=quality,
                                    subsampling=2 if subsampling else 0)
        out.append(np.asarray(Image.open(buffer)))
    return np.stack(out).astype(np.float64) / 255.0


@pytest.mark.parametrize("quality,subsampling", [(75, True), (75, False), (30, True)])
def test_jpeg_close_to_pillow(cifar_uint8, quality, subsampling):
    # Pillow (libjpeg-turbo) computes the DCT in integer arithmetic; ours is floating point, so a
    # coefficient at a rounding boundary may flip. Measured on these images: mean difference
    # 0.3-0.45/255, 80% of values identical. Tolerances: mean < 0.7/255 (a tenth of what JPEG
    # itself changes), 99th percentile <= 6/255, at least 70% of values identical.
    reference = _pillow_jpeg(cifar_uint8, quality, subsampling)
    ours = np.asarray(defenses.jpeg(jnp.asarray(cifar_uint8 / 255.0, jnp.float32),
                                    quality=quality, subsampling=subsampling), np.float64)
    diff = np.abs(ours - reference)
    jpeg_change = np.abs(reference - cifar_uint8 / 255.0).mean()
    assert diff.mean() < 0.7 / 255 and diff.mean() < 0.1 * jpeg_change
    assert np.percentile(diff, 99) <= 6 / 255 + 1e-6
    assert np.mean(diff < 0.5 / 255) >= 0.7
    # Output sits on the 8-bit grid, in [0, 1], same shape and dtype.
    assert ours.shape == cifar_uint8.shape
    np.testing.assert_allclose(ours * 255, np.round(ours * 255), atol=1e-3)


def test_jpeg_pads_odd_sizes_like_pillow(cifar_uint8):
    crop = np.ascontiguousarray(cifar_uint8[:8, :27, :21])
    reference = _pillow_jpeg(crop, 75, True)
    ours = np.asarray(defenses.jpeg(jnp.asarray(crop / 255.0, jnp.float32)))
    assert ours.shape == crop.shape
    assert np.abs(ours - reference).mean() < 1.0 / 255


@pytest.mark.parametrize("bits", [1, 3, 4, 8])
def test_bit_depth_exact_against_numpy(bits):
    x = np.random.default_rng(0).uniform(0, 1, (4, 8, 8, 3)).astype(np.float32)
    x[0, 0, 0] = [0.0, 1.0, 0.5]
    levels = np.float32(2 ** bits - 1)
    expected = np.rint(x * levels) / levels
    ours = np.asarray(defenses.bit_depth(jnp.asarray(x), bits=bits))
    # Exact up to one float32 rounding of the final division (XLA may multiply by 1/levels).
    np.testing.assert_allclose(ours, expected, rtol=0, atol=6e-8)
    assert len(np.unique(ours)) <= 2 ** bits


@pytest.mark.parametrize("sigma,size", [(1.0, (2, 32, 32, 3)), (0.6, (1, 9, 13, 1)),
                                        (3.0, (1, 7, 7, 3))])
def test_gaussian_blur_matches_scipy(sigma, size):
    x = np.random.default_rng(1).uniform(0, 1, size)
    expected = scipy.ndimage.gaussian_filter(x, sigma=(0, sigma, sigma, 0), mode="reflect")
    ours = np.asarray(defenses.gaussian_blur(jnp.asarray(x, jnp.float32), sigma=sigma))
    # float32 against scipy's float64: 1e-6 absolute on values in [0, 1].
    np.testing.assert_allclose(ours, expected, atol=1e-6)


def _model(x):
    w = jnp.linspace(-1.0, 1.0, x[0].size).reshape(x.shape[1:])
    return jnp.tanh(jnp.sum(x * w, axis=(1, 2, 3))) ** 2


def test_bpda_identity_gradient_equals_plain_gradient():
    # 8-bit images: 8-bit quantisation returns them unchanged (an identity-like transform).
    x = jnp.asarray(np.round(np.random.default_rng(2).uniform(0, 255, (3, 8, 8, 3))) / 255,
                    jnp.float32)
    plain = jax.grad(lambda u: _model(u).sum())(x)
    eight_bit = defenses.bpda(lambda u: defenses.bit_depth(u, bits=8))
    np.testing.assert_allclose(eight_bit(x), x, atol=1e-7)
    through = jax.grad(lambda u: _model(eight_bit(u)).sum())(x)
    np.testing.assert_allclose(through, plain, rtol=1e-5, atol=1e-6)
    # Evaluated at the transformed point, as BPDA prescribes: d/dx f(g(x)) ~ f'(g(x)).
    q = defenses.bit_depth(x, bits=4)
    at_q = jax.grad(lambda u: _model(u).sum())(q)
    quantised = jax.grad(lambda u: _model(defenses.bpda(
        lambda v: defenses.bit_depth(v, bits=4))(u)).sum())(x)
    np.testing.assert_allclose(quantised, at_q, rtol=1e-5, atol=1e-6)
    # Without BPDA the rounding kills the gradient.
    dead = jax.grad(lambda u: _model(defenses.bit_depth(u, bits=4)).sum())(x)
    assert float(jnp.abs(dead).max()) == 0.0
    # Straight-through gives the same gradient and the same value up to one rounding.
    st = jax.grad(lambda u: _model(
        defenses.straight_through(u, defenses.bit_depth(u, bits=8))).sum())(x)
    np.testing.assert_allclose(st, plain, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(defenses.straight_through(x, q), q, atol=1e-7)


def test_bpda_with_backward_uses_its_gradient():
    x = jnp.asarray(np.random.default_rng(3).uniform(0, 1, (2, 8, 8, 3)), jnp.float32)
    blur = lambda u: defenses.gaussian_blur(u, sigma=1.0)
    wrapped = defenses.bpda(lambda u: defenses.jpeg(u, quality=50), blur)
    # Forward is JPEG exactly.
    np.testing.assert_array_equal(wrapped(x), defenses.jpeg(x, quality=50))
    # Gradient is the vector-Jacobian product of the blur, at x.
    cotangent = jnp.asarray(np.random.default_rng(4).normal(size=x.shape), jnp.float32)
    _, vjp = jax.vjp(wrapped, x)
    _, blur_vjp = jax.vjp(blur, x)
    np.testing.assert_allclose(vjp(cotangent)[0], blur_vjp(cotangent)[0], rtol=1e-5, atol=1e-6)
    # Extra arguments reach both passes; their gradient is backward's.
    scaled = defenses.bpda(lambda u, s: jnp.round(u * s), lambda u, s: u * s)
    gx, gs = jax.grad(lambda u, s: scaled(u, s).sum(), argnums=(0, 1))(x, 3.0)
    np.testing.assert_allclose(gx, jnp.full_like(x, 3.0))
    np.testing.assert_allclose(gs, x.sum(), rtol=1e-5)
    # Inside jit, closing over traced values.
    jitted = jax.jit(lambda u, s: jax.grad(
        lambda v: defenses.bpda(lambda w: jnp.round(w * s))(v).sum())(u))
    np.testing.assert_allclose(jitted(x, 2.0), jnp.ones_like(x))


def test_bad_arguments():
    x = jnp.zeros((1, 8, 8, 3))
    with pytest.raises(SrdjaxError, match="quality"):
        defenses.jpeg(x, quality=0)
    with pytest.raises(SrdjaxError, match="RGB"):
        defenses.jpeg(jnp.zeros((1, 8, 8, 1)))
    with pytest.raises(SrdjaxError, match="bits"):
        defenses.bit_depth(x, bits=0)
    with pytest.raises(SrdjaxError, match="sigma"):
        defenses.gaussian_blur(x, sigma=-1.0)
    with pytest.raises(SrdjaxError, match="callable"):
        defenses.bpda("jpeg")
