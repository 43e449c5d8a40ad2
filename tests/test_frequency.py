"""Low/high split against a dense solve of the Tikhonov problem, scipy's Gaussian filter and
finite differences."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage
from jax.test_util import check_grads

from srdjax import frequency
from srdjax.checks import SrdjaxError
from tests.helpers import CIFAR_DIR, cifar_test_images


@pytest.fixture(scope="module")
def cifar():
    if not (CIFAR_DIR / "test.npz").exists():
        pytest.skip(f"CIFAR-10 not found at {CIFAR_DIR}")
    x, _ = cifar_test_images(8)
    return (x / 255.0).astype(np.float32)


def _dense_tikhonov(x, lam, pad):
    """Solve (I + λ(DxᵀDx + DyᵀDy)) u = x_pad densely, periodic forward differences, then crop."""
    n, h, w, c = x.shape
    ph, pw = h + 2 * pad, w + 2 * pad

    def forward_diff(size):
        d = -np.eye(size)
        d[np.arange(size), (np.arange(size) + 1) % size] = 1.0
        return d

    dx = np.kron(np.eye(ph), forward_diff(pw))
    dy = np.kron(forward_diff(ph), np.eye(pw))
    system = np.eye(ph * pw) + lam * (dx.T @ dx + dy.T @ dy)
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="symmetric")
    rhs = padded.transpose(1, 2, 0, 3).reshape(ph * pw, n * c)
    u = np.linalg.solve(system, rhs).reshape(ph, pw, n, c).transpose(2, 0, 1, 3)
    return u[:, pad:pad + h, pad:pad + w]


@pytest.mark.parametrize("lam,pad,shape", [(5.0, 4, (2, 8, 8, 3)), (0.7, 3, (1, 6, 9, 2))])
def test_tikhonov_equals_dense_solve(x64, lam, pad, shape):
    x = np.random.default_rng(0).random(shape)
    low, _ = frequency.split(jnp.asarray(x), lam=lam, pad=pad)
    assert low.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(low), _dense_tikhonov(x, lam, pad), atol=1e-10)


def test_tikhonov_float32_equals_dense_solve():
    x = np.random.default_rng(1).random((2, 8, 8, 3)).astype(np.float32)
    low, _ = frequency.split(x, lam=5.0, pad=4)
    np.testing.assert_allclose(np.asarray(low), _dense_tikhonov(x.astype(np.float64), 5.0, 4),
                               atol=1e-5)


@pytest.mark.parametrize("method", ["tikhonov", "gaussian"])
def test_high_is_x_minus_low(cifar, method):
    low, high = frequency.split(cifar, method=method)
    low, high = np.asarray(low), np.asarray(high)
    np.testing.assert_array_equal(high, cifar - low)
    # low + high is x up to the one rounding of the subtraction (bitwise equality is impossible
    # in floating point in general: x - low is not always representable).
    np.testing.assert_allclose(low + high, cifar, rtol=0, atol=np.finfo(np.float32).eps)
    # Both filters are averages with positive weights, so low stays inside x's range.
    assert low.min() >= -1e-6 and low.max() <= 1 + 1e-6
    assert np.abs(high).mean() > 1e-3


@pytest.mark.parametrize("sigma,size", [(2.5, 32), (1.0, 16), (2.5, 8)])
def test_gaussian_matches_scipy(cifar, sigma, size):
    x = cifar[:, :size, :size]
    low = frequency.low_pass(x, method="gaussian", sigma=sigma)
    ref = scipy.ndimage.gaussian_filter(x.astype(np.float64), sigma=(0, sigma, sigma, 0),
                                        mode="reflect")
    np.testing.assert_allclose(np.asarray(low), ref, atol=1e-6)


@pytest.mark.parametrize("method", ["tikhonov", "gaussian"])
def test_gradients_match_finite_differences(x64, method):
    x = jnp.asarray(np.random.default_rng(2).random((2, 6, 7, 3)))
    weights = jnp.asarray(np.random.default_rng(3).normal(size=(2, 6, 7, 3)))

    def f(images):
        low, high = frequency.split(images, method=method, pad=3, sigma=1.0)
        return jnp.sum(weights * high) + jnp.sum(low ** 2)

    check_grads(f, (x,), order=1, modes=("rev", "fwd"), atol=1e-6, rtol=1e-6)


def test_batched_and_jitted_equal_one_at_a_time(cifar):
    batched_low, batched_high = jax.jit(frequency.split)(jnp.asarray(cifar))
    for i in range(3):
        low, high = frequency.split(cifar[i:i + 1])
        np.testing.assert_allclose(np.asarray(batched_low[i:i + 1]), np.asarray(low), atol=1e-6)
        np.testing.assert_allclose(np.asarray(batched_high[i:i + 1]), np.asarray(high), atol=1e-6)


@pytest.mark.parametrize("bad,match", [
    (np.zeros((8, 8, 3), np.float32), "NHWC"),
    (np.full((1, 8, 8, 3), 1.5, np.float32), r"\[0, 1\]"),
    (np.zeros((1, 8, 8, 3), np.uint8), "floating"),
])
def test_bad_images(bad, match):
    with pytest.raises(SrdjaxError, match=match):
        frequency.split(bad)


def test_bad_options():
    x = np.zeros((1, 8, 8, 3), np.float32)
    with pytest.raises(SrdjaxError, match="method"):
        frequency.split(x, method="wavelet")
    with pytest.raises(SrdjaxError, match="lam"):
        frequency.split(x, lam=-1.0)
    with pytest.raises(SrdjaxError, match="sigma"):
        frequency.split(x, method="gaussian", sigma=0.0)
