"""Patches, dictionary learning and sparse re-synthesis against numpy / scikit-learn references."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from sklearn.decomposition import sparse_encode
from sklearn.feature_extraction.image import extract_patches_2d, reconstruct_from_patches_2d

from srdjax import dictionary as dl
from srdjax import patches as pl
from srdjax import resynthesis as rs
from srdjax.checks import SrdjaxError
from srdjax.frequency import split
from tests.helpers import CIFAR_DIR, cifar_test_images


@pytest.fixture(scope="module")
def cifar_high():
    if not (CIFAR_DIR / "test.npz").exists():
        pytest.skip(f"CIFAR-10 not found at {CIFAR_DIR}")
    x, _ = cifar_test_images(24)
    _, high = split((x / 255.0).astype(np.float32))
    return np.asarray(high)


def _numpy_patches(images, p, s):
    n, h, w, _ = images.shape
    return np.stack([np.stack([images[i, r:r + p, c:c + p].ravel()
                               for r in range(0, h - p + 1, s) for c in range(0, w - p + 1, s)])
                     for i in range(n)])


@pytest.mark.parametrize("shape,p,s", [((2, 12, 10, 3), 4, 2), ((1, 9, 9, 1), 3, 3),
                                       ((2, 7, 8, 2), 2, 1)])
def test_extract_matches_numpy_loop(shape, p, s):
    images = np.random.default_rng(0).random(shape).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(pl.extract_patches(images, p, s)),
                                  _numpy_patches(images, p, s))


def test_extract_matches_sklearn_and_reconstruct_averages(x64):
    images = np.random.default_rng(1).random((2, 11, 9, 3))
    patches = pl.extract_patches(images, 4)
    for i in range(2):
        ref = extract_patches_2d(images[i], (4, 4))
        np.testing.assert_array_equal(np.asarray(patches[i]), ref.reshape(len(ref), -1))
    # Arbitrary (inconsistent) patches: reconstruction is sklearn's overlap average.
    noisy = np.random.default_rng(2).normal(size=patches.shape)
    rebuilt = pl.reconstruct_from_patches(jnp.asarray(noisy), (11, 9, 3), 4)
    for i in range(2):
        ref = reconstruct_from_patches_2d(noisy[i].reshape(-1, 4, 4, 3), (11, 9, 3))
        np.testing.assert_allclose(np.asarray(rebuilt[i]), ref, atol=1e-12)


@pytest.mark.parametrize("p,s", [(8, 1), (8, 4), (5, 3)])
def test_patch_round_trip_is_exact(cifar_high, p, s):
    images = cifar_high[:4, :29, :29] if (32 - p) % s else cifar_high[:4]
    shape = images.shape[1:]
    rebuilt = pl.reconstruct_from_patches(pl.extract_patches(images, p, s), shape, p, s)
    np.testing.assert_array_equal(np.asarray(rebuilt), images)


def test_patches_are_linear_and_differentiable(x64):
    x = jnp.asarray(np.random.default_rng(3).random((1, 6, 6, 2)))
    w = jnp.asarray(np.random.default_rng(4).normal(size=(1, 9, 32)))
    f = jax.jit(lambda im: pl.reconstruct_from_patches(w * pl.extract_patches(im, 4, 1),
                                                       (6, 6, 2), 4, 1))
    check_grads(f, (x,), order=1, modes=("rev", "fwd"))


def test_patches_that_do_not_tile_are_refused():
    x = np.zeros((1, 32, 32, 3), np.float32)
    with pytest.raises(SrdjaxError, match="tile"):
        pl.extract_patches(x, 8, 5)
    with pytest.raises(SrdjaxError, match="patch_size"):
        pl.extract_patches(x, 40)
    with pytest.raises(SrdjaxError, match="patches must be"):
        pl.reconstruct_from_patches(jnp.zeros((1, 10, 192)), (32, 32, 3), 8, 1)


def _planted(seed, n_atoms=50, dim=20, sparsity=3, n=2000):
    rng = np.random.default_rng(seed)
    atoms = rng.standard_normal((n_atoms, dim))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    codes = np.zeros((n, n_atoms))
    for i in range(n):
        codes[i, rng.choice(n_atoms, sparsity, replace=False)] = rng.standard_normal(sparsity)
    return atoms, (codes @ atoms).astype(np.float32)


@pytest.mark.parametrize("method", ["ksvd", "mod"])
def test_recovers_planted_dictionary(method):
    atoms, signals = _planted(0)
    learned, history = dl.learn_dictionary(jax.random.PRNGKey(0), signals, 50, 3, 30,
                                           method=method)
    learned = np.asarray(learned)
    np.testing.assert_allclose(np.linalg.norm(learned, axis=1), 1.0, atol=1e-5)
    matched = np.abs(learned @ atoms.T).max(axis=0) > 0.99
    assert matched.mean() >= 0.85, matched.mean()
    assert history[-1] < 0.05 * history[0]


@pytest.mark.parametrize("method", ["ksvd", "mod"])
def test_error_falls_monotonically_on_cifar_high_patches(cifar_high, method):
    patches = dl.sample_patches(jax.random.PRNGKey(1), cifar_high, 3000, 8)
    learned, history = dl.learn_dictionary(jax.random.PRNGKey(2), patches, 64, 4, 5,
                                           method=method)
    assert history.shape == (6,)
    assert np.all(np.diff(history) < 0), history
    assert history[-1] < 0.8 * history[0]
    # history[-1] is the error of the returned dictionary with fresh OMP codes (sklearn's).
    codes = sparse_encode(np.asarray(patches), np.asarray(learned), algorithm="omp",
                          n_nonzero_coefs=4)
    sk_error = np.sum((patches - codes @ np.asarray(learned)) ** 2) / np.sum(patches ** 2)
    np.testing.assert_allclose(history[-1], sk_error, rtol=1e-3)


def test_dead_and_repeated_atoms_are_reseeded_with_worst_signals():
    rng = np.random.default_rng(5)
    atoms = rng.standard_normal((6, 4)).astype(np.float32)
    atoms[4] = atoms[1] * 3.0                                  # repeats atom 1 once normalised
    signals = rng.standard_normal((10, 4)).astype(np.float32)
    residual = rng.standard_normal((10, 4)).astype(np.float32)
    counts = jnp.asarray([3, 2, 0, 1, 2, 0])
    out = np.asarray(dl._reseed(jax.random.PRNGKey(0), jnp.asarray(atoms), signals, residual,
                                counts))
    worst = np.argsort(-np.sum(residual ** 2, axis=1))
    unit = lambda v: v / np.linalg.norm(v)
    for atom, signal in zip([2, 4, 5], worst[:3]):             # in atom order, worst first
        np.testing.assert_allclose(out[atom], unit(signals[signal]), atol=1e-6)
    for atom in [0, 1, 3]:
        np.testing.assert_allclose(out[atom], unit(atoms[atom]), atol=1e-6)


@pytest.mark.filterwarnings("ignore:Orthogonal matching pursuit ended prematurely")
def test_sparse_code_images_matches_sklearn_pipeline(x64, cifar_high):
    high = cifar_high[:2, :16, :16].astype(np.float64)
    atoms = dl.initial_dictionary(jax.random.PRNGKey(3), pl.extract_patches(high, 4)[0], 40)
    atoms = np.asarray(atoms)
    rebuilt = rs.sparse_code_images(atoms, high, patch_size=4, sparsity=3)
    for i in range(2):
        patches = extract_patches_2d(high[i], (4, 4)).reshape(-1, 48)
        codes = sparse_encode(patches, atoms, algorithm="omp", n_nonzero_coefs=3)
        ref = reconstruct_from_patches_2d((codes @ atoms).reshape(-1, 4, 4, 3), (16, 16, 3))
        np.testing.assert_allclose(np.asarray(rebuilt[i]), ref, atol=1e-8)


def test_learn_cluster_dictionaries(cifar_high):
    ids = np.arange(12) % 3                                    # cluster 3 has no image
    dictionaries, histories = dl.learn_cluster_dictionaries(
        jax.random.PRNGKey(4), cifar_high[:12], ids, 4, patch_size=8, n_atoms=32, sparsity=3,
        n_iter=2, max_patches_per_cluster=500, method="mod")
    assert dictionaries.shape == (4, 32, 192) and len(histories[3]) == 0
    np.testing.assert_allclose(np.linalg.norm(np.asarray(dictionaries), axis=2), 1.0, atol=1e-5)
    assert all(np.all(np.diff(h) < 0) for h in histories[:3])
    # Each dictionary codes its own cluster's patches better than the empty cluster's random one.
    own = dl.sample_patches(jax.random.PRNGKey(5), cifar_high[:12][ids == 0], 400)
    errors = [dl._relative_error(d, own, *dl.omp_lib.omp_support(d, own, 3))
              for d in (dictionaries[0], dictionaries[3])]
    assert errors[0] < errors[1]


@pytest.mark.parametrize("method", ["ksvd", "mod"])
@pytest.mark.parametrize("m", [20, 300])                       # fewer and more patches than atoms
def test_zero_padding_after_n_valid_changes_nothing(cifar_high, method, m):
    patches = np.asarray(dl.sample_patches(jax.random.PRNGKey(7), cifar_high, m, 8))
    padded = np.concatenate([patches, np.zeros((512 - m, patches.shape[1]), np.float32)])
    key = jax.random.PRNGKey(8)
    want, want_history = dl.learn_dictionary(key, patches, 32, 3, 3, method=method)
    got, history = dl.learn_dictionary(key, padded, 32, 3, 3, method=method, n_valid=m)
    # Zeros only change the order of some sums: float32 rounding, no different choice.
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)
    np.testing.assert_allclose(history, want_history, rtol=1e-5)


def test_clusters_of_different_sizes_share_compiled_steps(cifar_high):
    """Three clusters of 1, 3 and 8 images (49, 147 and 392 patches at stride 4) are padded to
    one size: each dictionary step compiles once, and every dictionary is the one learned from
    its cluster's unpadded patches."""
    ids = np.array([0] + [1] * 3 + [2] * 8)
    key = jax.random.PRNGKey(9)
    before = dl._reseed._cache_size()
    dictionaries, _ = dl.learn_cluster_dictionaries(
        key, cifar_high[:12], ids, 3, patch_size=8, stride=4, n_atoms=32, sparsity=3, n_iter=2,
        max_patches_per_cluster=1000, progress=False)
    assert dl._reseed._cache_size() - before <= 1
    for cluster in range(3):
        sample_key, learn_key = jax.random.split(jax.random.fold_in(key, cluster))
        patches = dl.sample_patches(sample_key, cifar_high[:12][ids == cluster], 1000, 8, 4)
        want, _ = dl.learn_dictionary(learn_key, patches, 32, 3, 2)
        np.testing.assert_allclose(np.asarray(dictionaries[cluster]), np.asarray(want),
                                   atol=2e-5)


def test_reconstruct_high_uses_each_images_dictionary(cifar_high):
    patches = pl.extract_patches(cifar_high[:3], 8, 4)
    dictionaries = jnp.stack([dl.initial_dictionary(jax.random.PRNGKey(i), patches[i], 32)
                              for i in range(3)])
    cluster_idx = jnp.asarray([2, 0, 1, 1, 0])
    high = cifar_high[:5]
    rebuilt = jax.jit(rs.reconstruct_high, static_argnums=(3, 4))(dictionaries, cluster_idx,
                                                                  high, 8, 3)
    for i, k in enumerate(np.asarray(cluster_idx)):
        one = rs.sparse_code_images(dictionaries[k], high[i:i + 1], 8, 3)
        np.testing.assert_allclose(np.asarray(rebuilt[i:i + 1]), np.asarray(one), atol=1e-5)
    # Re-synthesis keeps much of the high-frequency energy even with these crude dictionaries.
    assert np.mean((np.asarray(rebuilt) - high) ** 2) < 0.7 * np.mean(high ** 2)


def test_small_cluster_still_gets_a_valid_dictionary():
    patches = np.random.default_rng(6).normal(size=(10, 12)).astype(np.float32)
    learned, history = dl.learn_dictionary(jax.random.PRNGKey(5), patches, 16, 2, 3)
    learned = np.asarray(learned)
    assert learned.shape == (16, 12) and np.all(np.isfinite(learned))
    np.testing.assert_allclose(np.linalg.norm(learned, axis=1), 1.0, atol=1e-5)
    assert history[-1] <= history[0]


def test_bad_learning_input():
    with pytest.raises(SrdjaxError, match="method"):
        dl.learn_dictionary(jax.random.PRNGKey(0), np.ones((5, 4), np.float32), method="pca")
    with pytest.raises(SrdjaxError, match="NaN"):
        dl.learn_dictionary(jax.random.PRNGKey(0), np.full((5, 4), np.nan, np.float32), 4, 2)
    with pytest.raises(SrdjaxError, match="n_valid"):
        dl.learn_dictionary(jax.random.PRNGKey(0), np.ones((5, 4), np.float32), 4, 2, n_valid=6)
    with pytest.raises(SrdjaxError, match="cluster_ids"):
        dl.learn_cluster_dictionaries(jax.random.PRNGKey(0), np.zeros((2, 8, 8, 3), np.float32),
                                      np.array([0, 3]), 2)
    with pytest.raises(SrdjaxError, match="dim"):
        rs.reconstruct_high(jnp.ones((2, 8, 48)), jnp.zeros(1, jnp.int32),
                            jnp.zeros((1, 8, 8, 3)), 8, 2)


def test_values_on_support_are_least_squares_per_patch():
    """Per patch, with image i's dictionary and unused (-1) slots valued 0: numpy's lstsq on the
    support's atoms, to 1e-4 relative (float32 Cholesky on well-conditioned systems)."""
    rng = np.random.default_rng(0)
    n_clusters, n_atoms, dim, n, p, sparsity = 3, 16, 12, 5, 7, 4
    dics = rng.normal(size=(n_clusters, n_atoms, dim)).astype(np.float32)
    dics /= np.linalg.norm(dics, axis=-1, keepdims=True)
    grams = np.einsum("kad,kbd->kab", dics, dics)
    k = rng.integers(0, n_clusters, n).astype(np.int32)
    patches = rng.normal(size=(n, p, dim)).astype(np.float32)
    support = np.stack([[rng.permutation(n_atoms)[:sparsity] for _ in range(p)]
                        for _ in range(n)]).astype(np.int32)
    support[0, 0, 2:] = -1                       # fewer atoms than slots
    support[3, 5, 1:] = -1
    values = np.asarray(rs.values_on_support(jnp.asarray(dics), jnp.asarray(grams), k, support,
                                             patches, image_chunk=2))
    for i in range(n):
        for j in range(p):
            used = support[i, j] >= 0
            atoms = dics[k[i]][support[i, j, used]].astype(np.float64)
            want = np.zeros(sparsity)
            want[used] = np.linalg.lstsq(atoms.T, patches[i, j].astype(np.float64), rcond=None)[0]
            np.testing.assert_allclose(values[i, j], want, rtol=1e-4, atol=1e-5)
