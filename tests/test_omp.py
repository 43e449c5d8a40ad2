"""Batched OMP against scikit-learn's orthogonal_mp_gram / sparse_encode(algorithm="omp").

Float64 throughout the comparisons (float32 near-ties may pick a different atom on noise)."""
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from sklearn.decomposition import sparse_encode
from sklearn.linear_model import orthogonal_mp_gram

from srdjax import omp as omp_lib
from srdjax.checks import SrdjaxError
from srdjax.frequency import split
from tests.helpers import CIFAR_DIR, cifar_test_images

TOL = 1e-8  # float64; the issue asks for 1e-4


def _unit(rows):
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def _sklearn(dictionary, signals, sparsity=None, tol=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "ended prematurely" is expected here
        codes = orthogonal_mp_gram(dictionary @ dictionary.T, dictionary @ signals.T,
                                   n_nonzero_coefs=sparsity, tol=tol,
                                   norms_squared=np.sum(signals ** 2, axis=1))
    return np.asarray(codes).reshape(len(dictionary), len(signals)).T


def _assert_same_codes(codes, ref):
    np.testing.assert_array_equal(codes != 0, ref != 0)
    np.testing.assert_allclose(codes, ref, atol=TOL, rtol=0)


@pytest.mark.parametrize("sparsity", [1, 3, 8])
def test_random_matches_sparse_encode(x64, sparsity):
    rng = np.random.default_rng(sparsity)
    dictionary = _unit(rng.standard_normal((60, 24)))
    signals = rng.standard_normal((300, 24))
    ref = sparse_encode(signals, dictionary, algorithm="omp", n_nonzero_coefs=sparsity)
    codes = np.asarray(omp_lib.omp(dictionary, signals, sparsity))
    assert codes.shape == (300, 60)
    _assert_same_codes(codes, ref)


def test_sparsity_equal_to_dim(x64):
    rng = np.random.default_rng(10)
    dictionary = _unit(rng.standard_normal((40, 12)))
    signals = rng.standard_normal((200, 12))
    codes = np.asarray(omp_lib.omp(dictionary, signals, 12))
    _assert_same_codes(codes, _sklearn(dictionary, signals, 12))
    np.testing.assert_allclose(codes @ dictionary, signals, atol=1e-10)


def test_cifar_high_frequency_patches(x64):
    if not (CIFAR_DIR / "test.npz").exists():
        pytest.skip(f"CIFAR-10 not found at {CIFAR_DIR}")
    x, _ = cifar_test_images(12)
    _, high = split(jnp.asarray(x / 255.0))
    high = np.asarray(high)
    patches = np.stack([high[i, r:r + 8, c:c + 8].ravel()
                        for i in range(12) for r in range(0, 25, 4) for c in range(0, 25, 4)])
    dictionary, signals = _unit(patches[:256]), patches[256:]       # 256 atoms, 332 signals
    codes = np.asarray(omp_lib.omp(dictionary, signals, 8))
    _assert_same_codes(codes, _sklearn(dictionary, signals, 8))


def test_exact_duplicate_atoms(x64):
    # Which copy of a duplicated atom wins a tie is not reproducible in sklearn (BLAS rounding
    # decides), so compare codes summed over each group of copies, and the reconstructions.
    rng = np.random.default_rng(11)
    base = _unit(rng.standard_normal((30, 16)))
    copies = np.r_[np.arange(30), np.arange(0, 30, 3)]
    dictionary = base[copies]
    signals = rng.standard_normal((300, 16))
    codes = np.asarray(omp_lib.omp(dictionary, signals, 10))
    ref = _sklearn(dictionary, signals, 10)

    def merged(c):
        out = np.zeros((len(c), 30))
        np.add.at(out.T, copies, c.T)
        return out

    np.testing.assert_allclose(merged(codes), merged(ref), atol=TOL)
    np.testing.assert_array_equal((codes != 0).sum(1), (ref != 0).sum(1))
    np.testing.assert_allclose(codes @ dictionary, ref @ dictionary, atol=TOL)


def test_rank_deficient_dictionary_stops_like_sklearn(x64):
    # 5 distinct directions in dim 8 (each some twice): sklearn stops after 5 atoms with its
    # "ended prematurely" warning, although 8 were asked for.
    rng = np.random.default_rng(12)
    base = _unit(rng.standard_normal((5, 8)))
    copies = np.r_[np.arange(5), [0, 2, 4, 1, 3]]
    dictionary, signals = base[copies], rng.standard_normal((200, 8))
    codes = np.asarray(omp_lib.omp(dictionary, signals, 8))
    ref = _sklearn(dictionary, signals, 8)
    np.testing.assert_array_equal((ref != 0).sum(1), 5)
    np.testing.assert_array_equal((codes != 0).sum(1), 5)
    np.testing.assert_allclose(codes @ dictionary, ref @ dictionary, atol=TOL)


def test_near_duplicate_atoms(x64):
    rng = np.random.default_rng(13)
    base = rng.standard_normal((30, 16))
    dictionary = _unit(np.r_[base, base[:10] + 1e-3 * rng.standard_normal((10, 16))])
    signals = rng.standard_normal((300, 16))
    codes = np.asarray(omp_lib.omp(dictionary, signals, 16))
    _assert_same_codes(codes, _sklearn(dictionary, signals, 16))


def test_all_zero_and_exactly_sparse_signals(x64):
    rng = np.random.default_rng(14)
    dictionary = _unit(rng.standard_normal((50, 20)))
    signals = rng.standard_normal((90, 20))
    signals[::3] = 0.0
    signals[1::3] = rng.standard_normal((30, 2)) @ dictionary[[4, 17]]
    codes = np.asarray(omp_lib.omp(dictionary, signals, 6))
    np.testing.assert_array_equal(codes[::3], 0.0)
    # Once the residual is exactly 0 no further atom is added (usually after the 2 true atoms).
    np.testing.assert_allclose(codes[1::3] @ dictionary, signals[1::3], atol=1e-10)
    assert np.all((codes[1::3] != 0).sum(1) < 6) and np.mean((codes[1::3] != 0).sum(1) == 2) > 0.9
    _assert_same_codes(codes, _sklearn(dictionary, signals, 6))


@pytest.mark.parametrize("tol", [0.5, 4.0])
def test_residual_tolerance(x64, tol):
    rng = np.random.default_rng(15)
    dictionary = _unit(rng.standard_normal((40, 10)))
    signals = rng.standard_normal((300, 10))
    codes = np.asarray(omp_lib.omp(dictionary, signals, 10, tol=tol))
    ref = _sklearn(dictionary, signals, tol=tol)
    assert len(np.unique((ref != 0).sum(1))) > 2       # signals really stop at different counts
    _assert_same_codes(codes, ref)
    assert np.all(np.sum((signals - codes @ dictionary) ** 2, axis=1) <= tol + 1e-9)


def test_chunked_jitted_and_precomputed_gram_agree(x64):
    rng = np.random.default_rng(16)
    dictionary = _unit(rng.standard_normal((30, 12)))
    signals = rng.standard_normal((103, 12))
    ref = np.asarray(omp_lib.omp(dictionary, signals, 4))
    chunked = np.asarray(omp_lib.omp(dictionary, signals, 4, chunk_size=10))
    jitted = jax.jit(lambda d, x: omp_lib.omp(d, x, 4, chunk_size=16))(dictionary, signals)
    with_gram = omp_lib.omp(dictionary, signals, 4, gram=dictionary @ dictionary.T)
    for other in (chunked, jitted, with_gram):   # equal up to summation order
        _assert_same_codes(np.asarray(other), ref)
    _assert_same_codes(ref, _sklearn(dictionary, signals, 4))


def test_float32_agrees_with_sklearn_float64():
    rng = np.random.default_rng(17)
    dictionary = _unit(rng.standard_normal((128, 48)))
    signals = rng.standard_normal((400, 48))
    ref = _sklearn(dictionary, signals, 6)
    codes = np.asarray(omp_lib.omp(dictionary.astype(np.float32), signals.astype(np.float32), 6))
    assert codes.dtype == np.float32
    same = np.all((codes != 0) == (ref != 0), axis=1)
    assert same.mean() >= 0.97
    np.testing.assert_allclose(codes[same], ref[same], atol=1e-4)


def test_compact_form_and_least_squares_on_support(x64):
    rng = np.random.default_rng(18)
    dictionary = _unit(rng.standard_normal((30, 12)))
    signals = rng.standard_normal((40, 12))
    signals[0] = 0.0
    support, values = omp_lib.omp_support(dictionary, signals, 5)
    codes = omp_lib.codes_from_support(support, values, 30)
    np.testing.assert_allclose(omp_lib.reconstruct_signals(dictionary, support, values),
                               np.asarray(codes) @ dictionary, atol=1e-12)
    refit = omp_lib.least_squares_on_support(dictionary, signals, support)
    np.testing.assert_allclose(refit, values, atol=1e-10)
    support = np.asarray(support)
    assert np.all(support[0] == -1)
    for i in range(1, 5):   # against numpy's least squares on the same atoms
        atoms = dictionary[support[i]]
        lstsq = np.linalg.lstsq(atoms.T, signals[i], rcond=None)[0]
        np.testing.assert_allclose(np.asarray(refit[i]), lstsq, atol=1e-10)
    check_grads(lambda d, x: omp_lib.least_squares_on_support(d, x, support),
                (jnp.asarray(dictionary), jnp.asarray(signals)), order=1, modes=("rev",),
                atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("args,kwargs,match", [
    ((np.eye(4), np.ones((3, 4)), 0), {}, "sparsity"),
    ((np.eye(4), np.ones((3, 4)), 5), {}, "sparsity"),
    ((np.eye(6)[:, :4], np.ones((3, 4)), 5), {}, "sparsity"),
    ((np.eye(4), np.ones((3, 4)), 2.0), {}, "sparsity"),
    ((np.r_[np.eye(4), np.zeros((1, 4))], np.ones((3, 4)), 2), {}, "zero"),
    ((np.eye(4), np.ones((3, 5)), 2), {}, "dim"),
    ((np.eye(4), np.ones(4), 2), {}, "signals"),
    ((np.eye(4), np.full((3, 4), np.nan), 2), {}, "NaN"),
    ((np.eye(4), np.ones((3, 4)), 2), {"tol": -1.0}, "tol"),
    ((np.eye(4), np.ones((3, 4)), 2), {"gram": np.eye(3)}, "gram"),
    ((np.eye(4, dtype=np.int32), np.ones((3, 4), np.int32), 2), {}, "floating"),
])
def test_bad_input(args, kwargs, match):
    with pytest.raises(SrdjaxError, match=match):
        omp_lib.omp(*args, **kwargs)


def test_per_dictionary_blocks_match_sklearn_per_group(x64):
    """Groups of signals, each with its own dictionary, coded in blocks that straddle groups
    (block 37 over groups of 50): every group's codes equal sklearn's with its dictionary."""
    rng = np.random.default_rng(5)
    dicts = np.stack([_unit(rng.normal(size=(32, 12))) for _ in range(3)])
    grams = np.einsum("kad,kbd->kab", dicts, dicts)
    signals = rng.normal(size=(4, 50, 12))
    index = np.array([2, 0, 1, 2])
    support, values = omp_lib.omp_support_per_dictionary(
        jnp.asarray(dicts), jnp.asarray(grams), jnp.asarray(index), jnp.asarray(signals),
        sparsity=4, block=37)
    for i, k in enumerate(index):
        codes = omp_lib.codes_from_support(support[i], values[i], 32)
        _assert_same_codes(np.asarray(codes), _sklearn(dicts[k], signals[i], sparsity=4))


def test_accelerator_chunk_defaults_code_the_same(x64, monkeypatch):
    """On a GPU/TPU the chunk and block defaults are one large block instead of CPU-cache-sized
    ones (an H200 ran purify's OMP at 1.4M patches/s over blocks of 128); run that path here
    (the platform test patched): the codes equal sklearn's, as with the CPU defaults."""
    from srdjax import parallel
    monkeypatch.setattr(parallel, "on_accelerator", lambda: True)
    assert omp_lib.default_chunk() == omp_lib.ACCELERATOR_CHUNK
    rng = np.random.default_rng(6)
    dicts = np.stack([_unit(rng.normal(size=(32, 12))) for _ in range(3)])
    signals = rng.normal(size=(4, 300, 12))
    index = np.array([1, 0, 2, 1])
    support, values = omp_lib.omp_support_per_dictionary(
        jnp.asarray(dicts), jnp.asarray(np.einsum("kad,kbd->kab", dicts, dicts)),
        jnp.asarray(index), jnp.asarray(signals), sparsity=5)
    for i, k in enumerate(index):
        codes = omp_lib.codes_from_support(support[i], values[i], 32)
        _assert_same_codes(np.asarray(codes), _sklearn(dicts[k], signals[i], sparsity=5))
    flat = signals.reshape(-1, 12)
    _assert_same_codes(np.asarray(omp_lib.omp(dicts[0], flat, 5)), _sklearn(dicts[0], flat, 5))


def test_every_product_of_omp_asks_for_full_float32_precision():
    """A GPU's default float32 product is TF32 (10-bit mantissa), with which OMP picked another
    atom than sklearn for 0.5% of CIFAR patches on an H200: every dot of OMP's programs must
    carry precision HIGHEST (a no-op on a CPU, so only the lowered program can show it)."""
    import functools
    d, g = jnp.ones((3, 32, 12)), jnp.ones((3, 32, 32))
    s = jnp.ones((2, 50, 12))
    programs = [
        jax.jit(functools.partial(omp_lib.omp_support_per_dictionary, sparsity=3)).lower(
            d, g, jnp.array([0, 1]), s),
        jax.jit(functools.partial(omp_lib.omp_support, sparsity=3)).lower(d[0], s[0]),
        jax.jit(omp_lib.least_squares_on_support).lower(d[0], s[0], jnp.zeros((50, 3), int)),
    ]
    for lowered in programs:
        dots = [line for line in lowered.as_text().splitlines() if "dot_general" in line]
        assert dots and all("precision = [HIGHEST, HIGHEST]" in line for line in dots), dots


def test_spd_solve_equals_numpy_and_lapack_gradients():
    # Batched SPD systems like OMP's grams on a support (k = 12), plus an identity-padded one.
    rng = np.random.default_rng(3)
    m = rng.normal(size=(40, 12, 30)).astype(np.float32)
    b = rng.normal(size=(40, 12)).astype(np.float32)
    a = m @ m.transpose(0, 2, 1)
    a[0, 8:, :], a[0, :, 8:] = 0.0, 0.0
    a[0, 8:, 8:] = np.eye(4)
    x = np.asarray(omp_lib.spd_solve(jnp.asarray(a), jnp.asarray(b)))
    ref = np.linalg.solve(a.astype(np.float64), b[..., None].astype(np.float64))[..., 0]
    np.testing.assert_allclose(x, ref, rtol=1e-4, atol=1e-5)

    # Through a symmetric parametrisation (as gram = atoms atoms^T), its gradient is LAPACK's.
    def loss(solve):
        return lambda m, b: jnp.sum(solve(m @ jnp.swapaxes(m, 1, 2), b) ** 2)
    ours = jax.grad(loss(omp_lib.spd_solve), argnums=(0, 1))(jnp.asarray(m), jnp.asarray(b))
    lapack = jax.grad(loss(lambda a, b: jnp.linalg.solve(a, b[..., None])[..., 0]),
                      argnums=(0, 1))(jnp.asarray(m), jnp.asarray(b))
    for g, r in zip(ours, lapack):
        np.testing.assert_allclose(g, r, rtol=1e-3, atol=1e-5 * float(jnp.abs(r).max()))


@pytest.mark.parametrize("n,chunk", [(0, 8), (1, 8), (7, 8), (13, 4), (100, 16), (97, 16),
                                     (10000, 128)])
def test_chunked_map_equals_one_call_on_every_row(n, chunk):
    """parallel.chunked_map (OMP's blocks, purify's image chunks) gives, row for row, what the
    function gives on all rows at once: no rows, divisible and padded chunkings, several outputs."""
    from srdjax import parallel
    rng = np.random.default_rng(n)
    x, y = rng.normal(size=(n, 5)).astype(np.float32), rng.integers(0, 9, n).astype(np.int32)

    def fn(a, b):
        return a * 2.0 + b[:, None], jnp.sum(a, axis=1) - b

    got = jax.jit(lambda a, b: parallel.chunked_map(fn, chunk, a, b))(x, y)
    want = fn(x, y)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-5)   # float32 sums, reordered


def test_chunked_map_is_differentiable_row_for_row():
    """Reverse mode through the chunk loop (a fori_loop of dynamic slices and updates) gives
    the row-wise gradient, padding rows included in the split and dropped from the result."""
    from srdjax import parallel
    x = np.random.default_rng(0).normal(size=(13, 3)).astype(np.float32)
    w = np.random.default_rng(1).normal(size=(13, 3)).astype(np.float32)
    loss = lambda a: jnp.sum(parallel.chunked_map(lambda c: jnp.sin(c) * c, 4, a) * w)  # noqa
    np.testing.assert_allclose(jax.jit(jax.grad(loss))(x), (np.cos(x) * x + np.sin(x)) * w,
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n", [1, 2, 7, 64])
def test_written_once_equals_one_call_and_keeps_its_loop(n):
    """parallel.written_once (purify's overlap average) gives fn's rows, several outputs, and
    keeps a loop in the compiled program even for one row (XLA drops a loop of one step, and
    its output would then be fused into, and recomputed by, every consumer)."""
    from srdjax import parallel
    x = np.random.default_rng(n).normal(size=(n, 6, 6, 3)).astype(np.float32)

    def fn(a):
        return jnp.pad(a, ((0, 0), (1, 1), (1, 1), (0, 0)))[:, 2:, 2:] + a, jnp.sum(a, (1, 2))

    f = jax.jit(lambda a: parallel.written_once(fn, a))
    for g, w in zip(f(x), fn(x)):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)
    assert " while(" in f.lower(x).compile().as_text()


def test_chunked_map_keeps_a_sharded_batch_on_its_devices():
    from srdjax import parallel
    mesh = parallel.make_mesh(jax.devices()[:2])
    x = parallel.shard_batch(mesh, np.arange(64 * 3, dtype=np.float32).reshape(64, 3))
    f = jax.jit(lambda a: parallel.chunked_map(lambda c: c * 3.0, 16, a))
    hlo = f.lower(x).compile().as_text()
    assert " all-gather(" not in hlo and " collective-permute(" not in hlo
    np.testing.assert_array_equal(f(x), np.asarray(x) * 3.0)


@pytest.mark.parametrize("n_atoms", [256, 96, 32, 40, 7])      # grouped by 32, or not
def test_first_argmax_is_numpys_argmax_with_its_tie_rule(n_atoms):
    """Few distinct values, so most rows have ties (np.argmax keeps the lowest index)."""
    values = np.random.default_rng(n_atoms).integers(0, 4, size=(300, n_atoms))
    values = values.astype(np.float32)
    index, top = omp_lib._first_argmax(jnp.asarray(values))
    np.testing.assert_array_equal(index, np.argmax(values, axis=1))
    np.testing.assert_array_equal(top, values.max(axis=1))
