"""srdjax.kmeans against scikit-learn on small data.

Tolerances: inertia within 1% of sklearn.cluster.KMeans with the same k and n_init (both find
the same local optimum up to the restarts' luck); silhouette within 1e-4 of
sklearn.metrics.silhouette_score (float32 here, float64 there).

"Real latents" before any model is trained: the first 2,000 CIFAR-10 test images, pixels in
[0, 1] flattened to 3,072-d and multiplied by a fixed Gaussian projection (seed 0) to 64-d.
"""
from pathlib import Path
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from sklearn.cluster import KMeans
from sklearn.datasets import make_blobs
from sklearn.metrics import silhouette_score as sk_silhouette
from threadpoolctl import threadpool_limits

from srdjax import kmeans as km
from srdjax import kmeans_lloyd
from srdjax.checks import SrdjaxError

DATA = Path(os.environ.get("SRDJAX_DATA_DIR")
            or Path(__file__).resolve().parents[1].parent / "shared/data/cifar10")


def cifar_projection(n=2000, dim=64):
    with np.load(DATA / "test.npz", allow_pickle=False) as f:
        pixels = f["x"][:n].reshape(n, -1).astype(np.float32) / 255.0
    proj = np.random.default_rng(0).normal(size=(pixels.shape[1], dim)).astype(np.float32)
    return pixels @ proj / np.sqrt(pixels.shape[1])


def sk_inertia(x, k, seed):
    # one OpenMP thread: next to XLA's threads on 2 shared cores, more threads only spin
    with threadpool_limits(1):
        return KMeans(k, n_init=4, random_state=seed).fit(x).inertia_


def own_inertia(x, result):
    x = np.asarray(x, np.float64)
    return float(((x - np.asarray(result.centers, np.float64)[np.asarray(result.labels)]) ** 2)
                 .sum())


@pytest.mark.parametrize("k", [3, 5])
def test_inertia_matches_sklearn_on_blobs(k):
    x, _ = make_blobs(600, n_features=8, centers=5, cluster_std=1.5, random_state=1)
    for seed in range(3):
        res = km.kmeans(jax.random.key(seed), x, k, n_init=4)
        ref = sk_inertia(x, k, seed)
        assert abs(float(res.inertia) / ref - 1) < 0.01
        # the reported inertia belongs to the returned centers and labels
        np.testing.assert_allclose(float(res.inertia), own_inertia(x, res), rtol=1e-4)
        assert res.labels.dtype == jnp.int32 and res.centers.shape == (k, 8)


@pytest.mark.skipif(not (DATA / "test.npz").exists(), reason="CIFAR-10 test.npz not found")
def test_inertia_matches_sklearn_on_cifar_latents():
    z = cifar_projection()
    for k in (4, 8):
        for seed in range(2):
            res = km.kmeans(jax.random.key(seed), z, k, n_init=4)
            ref = sk_inertia(z, k, seed)
            assert abs(float(res.inertia) / ref - 1) < 0.01, (k, seed)
            # converged Lloyd: every center is the mean of its points
            labels = np.asarray(res.labels)
            means = np.stack([z[labels == j].mean(0) for j in range(k)])
            np.testing.assert_allclose(np.asarray(res.centers), means, atol=1e-3)


def test_silhouette_matches_sklearn():
    rng = np.random.default_rng(0)
    x, y = make_blobs(700, n_features=5, centers=4, random_state=0)
    assert abs(float(km.silhouette_score(x, y)) - sk_silhouette(x, y)) < 1e-4
    noisy = rng.integers(0, 6, size=700)  # overlapping labels, and label 6 never used
    noisy[0] = 7  # a singleton cluster scores 0, as in scikit-learn
    got = km.silhouette_score(x, noisy, 9, chunk_size=64)  # several row blocks
    assert abs(float(got) - sk_silhouette(x, noisy)) < 1e-4


@pytest.mark.parametrize("criterion", ["silhouette", "bic"])
def test_adaptive_kmeans_recovers_true_k(criterion):
    for true_k in range(1, 7):
        x, _ = make_blobs(600, n_features=16, centers=true_k, center_box=(-10, 10),
                          random_state=true_k)
        res = km.adaptive_kmeans(jax.random.key(0), x, 8, criterion=criterion)
        assert int(res.k) == true_k, (true_k, np.asarray(res.scores))
        assert res.scores.shape == (8,) and res.result.centers.shape == (8, 16)
        assert np.all(np.asarray(res.result.centers)[true_k:] == 0)
        labels = np.asarray(res.result.labels)
        assert set(np.unique(labels)) == set(range(true_k))
        # the chosen fit is the best restart for its k
        np.testing.assert_allclose(float(res.result.inertia), float(res.inertias[true_k - 1]))


def test_adaptive_scores_match_direct_computation():
    x, _ = make_blobs(300, n_features=6, centers=3, random_state=3)
    runs = [km.adaptive_kmeans(jax.random.key(1), x, 4, silhouette_sample=5000, vectorize=v)
            for v in (False, True)]  # exact silhouettes: n < 5000
    res = runs[0]
    assert float(res.scores[0]) == pytest.approx(km.SILHOUETTE_THRESHOLD)
    chosen = np.asarray(res.result.labels)
    assert float(res.scores[int(res.k) - 1]) == pytest.approx(sk_silhouette(x, chosen), abs=1e-4)
    # the same starts run in lockstep (the accelerator default) or one after another (CPU)
    assert int(runs[1].k) == int(res.k)
    np.testing.assert_allclose(runs[1].inertias, res.inertias, rtol=1e-5)
    np.testing.assert_allclose(runs[1].scores, res.scores, rtol=1e-5, atol=1e-6)


def test_empty_clusters_never_nan():
    rng = np.random.default_rng(0)
    x = np.repeat(rng.normal(size=(3, 4)), 5, axis=0)  # 3 distinct points, k = 6
    res = km.kmeans(jax.random.key(0), x, 6, n_init=2)
    assert np.all(np.isfinite(np.asarray(res.centers)))
    assert float(res.inertia) == pytest.approx(0.0, abs=1e-4)
    ada = km.adaptive_kmeans(jax.random.key(0), x, 8, criterion="bic")
    assert np.all(np.isfinite(np.asarray(ada.scores)))
    assert int(ada.k) == 3


def test_mask_and_row_sharding():
    x, _ = make_blobs(1000, n_features=8, centers=4, random_state=2)
    x = x.astype(np.float32)
    mask = np.arange(1000) % 3 != 0
    res = km.kmeans(jax.random.key(0), x, 4, mask=jnp.asarray(mask), chunk_size=128)
    labels = np.asarray(res.labels)
    assert np.all(labels[~mask] == -1) and np.all(labels[mask] >= 0)
    ref = sk_inertia(x[mask], 4, 0)
    assert abs(float(res.inertia) / ref - 1) < 0.01
    # rows sharded over the two test devices: the same clustering, run data-parallel
    mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
    sharded = jax.device_put(x, NamedSharding(mesh, PartitionSpec("data")))
    single = km.kmeans(jax.random.key(1), x, 4, chunk_size=128)
    split = km.kmeans(jax.random.key(1), sharded, 4, chunk_size=128)
    assert float(split.inertia) == pytest.approx(float(single.inertia), rel=1e-4)
    assert np.mean(np.asarray(split.labels) == np.asarray(single.labels)) > 0.99


def test_pruned_lloyd_runs_the_same_iterations_as_plain_lloyd():
    """Hamerly's bounds only skip rows that provably keep their cluster: same iterations, same
    labels and centers as the plain pass, on one device and split over two, with masked rows."""
    rng = np.random.default_rng(0)
    centers = 0.4 * rng.normal(size=(6, 32))  # overlapping blobs: many rows near a boundary
    x = (centers[rng.integers(0, 6, 2000)] + rng.normal(size=(2000, 32))).astype(np.float32)
    mask = jnp.asarray(np.arange(2000) % 7 != 0)
    mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
    sharded = jax.device_put(x, NamedSharding(mesh, PartitionSpec("data")))
    for k in (1, 5):
        plain = km.kmeans(jax.random.key(k), x, k, mask=mask, n_init=1, max_iter=200,
                          chunk_size=256, vectorize=True)
        assert int(plain.n_iter) > 10 or k == 1
        for data in (x, sharded):
            pruned = km.kmeans(jax.random.key(k), data, k, mask=mask, n_init=1, max_iter=200,
                               chunk_size=256, vectorize=False)
            assert int(pruned.n_iter) == int(plain.n_iter), k
            np.testing.assert_array_equal(np.asarray(pruned.labels), np.asarray(plain.labels))
            np.testing.assert_allclose(np.asarray(pruned.centers), np.asarray(plain.centers),
                                       atol=1e-4)
            np.testing.assert_allclose(float(pruned.inertia), float(plain.inertia), rtol=1e-5)


@pytest.mark.parametrize("vectorize", [False, True])
def test_a_given_start_runs_sklearns_lloyd_path(vectorize):
    """With scikit-learn's own k-means++ centers as `init`, both run the same Lloyd iterations
    from the same start: the same iteration count and labels, inertia within 1e-5 relative
    (float32 sums in different orders), on overlapping blobs where the run takes 25-100
    iterations. (On larger overlapping data the two paths part after many iterations: a label
    flipped by the last bit changes the next centers.)"""
    from sklearn.cluster import kmeans_plusplus
    rng = np.random.default_rng(0)
    centers = 0.05 * rng.normal(size=(8, 32))
    x = (centers[rng.integers(0, 8, 4000)] + rng.normal(size=(4000, 32))).astype(np.float32)
    for k in (3, 8):
        init, _ = kmeans_plusplus(x, k, random_state=k)
        with threadpool_limits(1):
            sk = KMeans(k, init=init, n_init=1, max_iter=300, tol=1e-4).fit(x)
        res = km.kmeans(jax.random.key(0), x, k, init=jnp.asarray(init), max_iter=300,
                        tol=1e-4, vectorize=vectorize)
        assert int(res.n_iter) == sk.n_iter_ > 20, k
        np.testing.assert_array_equal(np.asarray(res.labels), sk.labels_)
        np.testing.assert_allclose(float(res.inertia), sk.inertia_, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(res.centers), sk.cluster_centers_, atol=1e-4)


@pytest.mark.parametrize("fraction", [0.0, 0.03, 0.5, 1.0])
def test_compact_gives_the_indices_of_nonzero(fraction):
    flags = np.random.default_rng(1).random(1000) < fraction
    want = np.zeros(1024, np.int32)
    want[:flags.sum()] = np.flatnonzero(flags)
    np.testing.assert_array_equal(np.asarray(kmeans_lloyd._compact(jnp.asarray(flags), 1024)), want)


@pytest.mark.parametrize("call, match", [
    (lambda x: km.kmeans(jax.random.key(0), x, 0), "k must be"),
    (lambda x: km.kmeans(jax.random.key(0), x, 11), r"\[1, n=10\]"),
    (lambda x: km.kmeans(jax.random.key(0), x[:, 0], 2), "matrix"),
    (lambda x: km.kmeans(jax.random.key(0), x[None], 2), "matrix"),
    (lambda x: km.kmeans(jax.random.key(0), x.at[3, 1].set(jnp.nan), 2), "NaN"),
    (lambda x: km.kmeans(jax.random.key(0), x.at[0, 0].set(jnp.inf), 2), "infinite"),
    (lambda x: km.kmeans(jax.random.key(0), x, 2, mask=np.ones(9, bool)), "mask"),
    (lambda x: km.kmeans(jax.random.key(0), x, 2, init=x[:3]), "init must hold k=2"),
    (lambda x: km.kmeans(jax.random.key(0), x, 2, init=x[:2].at[0, 0].set(jnp.nan)),
     "init contains NaN"),
    (lambda x: km.adaptive_kmeans(jax.random.key(0), x, 3, criterion="gap"), "criterion"),
    (lambda x: km.adaptive_kmeans(jax.random.key(0), x, 12), "k_max"),
    (lambda x: km.silhouette_score(x, jnp.zeros(10, jnp.int32)), "distinct labels"),
    (lambda x: km.silhouette_score(x, jnp.zeros(9, jnp.int32)), "shape"),
])
def test_bad_input(call, match):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(10, 3)), jnp.float32)
    with pytest.raises(SrdjaxError, match=match):
        call(x)
