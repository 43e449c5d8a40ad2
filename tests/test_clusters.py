"""srdjax.clusters against numpy: cluster statistics, distances, assignments, errors.

Tolerances: means/stds 1e-5 relative (float32 sums of a few hundred points), precisions 1e-3
relative (a float32 inverse of a shrunk 6x6 covariance), distances 1e-5 relative.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.datasets import make_blobs

from srdjax import clusters as cl
from srdjax.checks import SrdjaxError


@pytest.fixture(scope="module")
def fitted():
    """Class 0 is two blobs, class 1 three; 10% of the samples masked out."""
    x, blob = make_blobs(1000, n_features=6, centers=5, center_box=(-12, 12), random_state=4)
    x = x.astype(np.float32)
    y = np.where(blob < 2, 0, 1).astype(np.int32)
    mask = np.random.default_rng(0).random(1000) > 0.1
    clusters, assignment, info = cl.fit_clusters(
        jax.random.key(0), x, y, 2, k_max=5, mask=mask, covariance=True, shrinkage=0.2)
    return x, y, blob, mask, clusters, np.asarray(assignment), info


def test_fit_recovers_subclusters_per_class(fitted):
    x, y, blob, mask, clusters, assignment, info = fitted
    assert info["k"].tolist() == [2, 3]
    assert info["samples"].tolist() == [int(((y == c) & mask).sum()) for c in (0, 1)]
    assert clusters.class_ids.tolist() == [0, 0, 1, 1, 1]
    assert clusters.index_in_class.tolist() == [0, 1, 0, 1, 2]
    assert np.all(assignment[~mask] == -1)
    for i in range(clusters.num_clusters):
        members = assignment == i
        assert members.sum() == int(clusters.counts[i])
        assert np.all(y[members] == int(clusters.class_ids[i]))
        assert len(np.unique(blob[members])) == 1  # each cluster is one true blob


def test_distributions_equal_numpy(fitted):
    x, _, _, _, clusters, assignment, _ = fitted
    d, s, min_std = x.shape[1], 0.2, 1e-3
    for i in range(clusters.num_clusters):
        pts = x[assignment == i].astype(np.float64)
        np.testing.assert_allclose(clusters.means[i], pts.mean(0), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(clusters.stds[i], np.maximum(pts.std(0), min_std), rtol=1e-5)
        cov = np.cov(pts, rowvar=False, bias=True)
        shrunk = (1 - s) * cov + (s * np.trace(cov) / d + min_std ** 2) * np.eye(d)
        np.testing.assert_allclose(clusters.precisions[i], np.linalg.inv(shrunk), rtol=1e-3,
                                   atol=1e-4)


def test_std_floor_and_identical_points():
    x = np.zeros((20, 3), np.float32)
    x[10:] = 5.0  # class 1: ten identical points
    y = np.repeat([0, 1], 10).astype(np.int32)
    x[:10, 0] = np.linspace(0, 1, 10)
    clusters, _, _ = cl.fit_clusters(jax.random.key(0), x, y, 2, k_max=1, covariance=True,
                                     min_std=0.01)
    np.testing.assert_allclose(clusters.stds[1], [0.01] * 3)
    np.testing.assert_allclose(clusters.precisions[1], np.eye(3) / 0.01 ** 2, rtol=1e-4)
    assert np.all(np.isfinite(np.asarray(cl.cluster_distances(x, clusters, "mahalanobis"))))


def random_clusters(rng, k=8, d=64):
    a = rng.normal(size=(k, d, d)) / np.sqrt(d)
    cov = a @ a.transpose(0, 2, 1) + 0.1 * np.eye(d)
    return cl.ClusterSet(
        means=jnp.asarray(rng.normal(size=(k, d)), jnp.float32),
        stds=jnp.asarray(rng.uniform(0.5, 2.0, size=(k, d)), jnp.float32),
        class_ids=jnp.asarray(np.arange(k) % 3, jnp.int32),
        index_in_class=jnp.asarray(np.arange(k) // 3, jnp.int32),
        counts=jnp.ones(k, jnp.int32),
        precisions=jnp.asarray(np.linalg.inv(cov), jnp.float32))


def test_distances_equal_numpy_loop():
    rng = np.random.default_rng(1)
    clusters = random_clusters(rng)
    z = rng.normal(size=(1100, 64)).astype(np.float32)  # several row blocks for Mahalanobis
    sigma = np.asarray(cl.cluster_distances(z, clusters, "sigma"))
    maha = np.asarray(cl.cluster_distances(z, clusters, "mahalanobis"))
    mu, sd, prec = (np.asarray(a, np.float64) for a in
                    (clusters.means, clusters.stds, clusters.precisions))
    for i in range(0, 1100, 37):
        for k in range(clusters.num_clusters):
            diff = z[i] - mu[k]
            assert sigma[i, k] == pytest.approx(np.sum((diff / sd[k]) ** 2), rel=1e-5)
            assert maha[i, k] == pytest.approx(diff @ prec[k] @ diff, rel=1e-4)
    np.testing.assert_array_equal(cl.nearest_cluster(z, clusters, "sigma"), sigma.argmin(1))


def test_assign_picks_nearest_cluster_of_own_class():
    rng = np.random.default_rng(2)
    clusters = random_clusters(rng, k=7, d=5)
    z = rng.normal(size=(300, 5)).astype(np.float32)
    labels = rng.integers(0, 3, size=300).astype(np.int32)
    for kind in ("sigma", "mahalanobis"):
        dist = np.asarray(cl.cluster_distances(z, clusters, kind))
        got = np.asarray(cl.assign(clusters, z, labels, kind))
        class_ids = np.asarray(clusters.class_ids)
        for i in range(300):
            own = np.flatnonzero(class_ids == labels[i])
            assert got[i] == own[np.argmin(dist[i, own])]
        # the constraint matters: often the overall nearest cluster is of another class
        assert np.mean(got != dist.argmin(1)) > 0.2


def test_empty_class_is_one_clear_error():
    x = np.random.default_rng(0).normal(size=(30, 4)).astype(np.float32)
    y = np.repeat([0, 1, 3], 10).astype(np.int32)
    with pytest.raises(SrdjaxError, match="class 2 has no samples"):
        cl.fit_clusters(jax.random.key(0), x, y, 4)
    mask = y != 1
    with pytest.raises(SrdjaxError, match="class 1 has no samples left after the mask"):
        cl.fit_clusters(jax.random.key(0), x, y, 4, mask=mask)


def test_bad_queries():
    rng = np.random.default_rng(3)
    clusters = random_clusters(rng, k=4, d=5)
    z = rng.normal(size=(6, 5)).astype(np.float32)
    with pytest.raises(SrdjaxError, match="dims"):
        cl.cluster_distances(z[:, :4], clusters)
    with pytest.raises(SrdjaxError, match="kind"):
        cl.cluster_distances(z, clusters, "cosine")
    with pytest.raises(SrdjaxError, match="covariance=True"):
        cl.cluster_distances(z, clusters.replace(precisions=None), "mahalanobis")
    with pytest.raises(SrdjaxError, match="no cluster"):
        cl.assign(clusters, z, np.array([0, 1, 2, 5, 0, 1], np.int32))
    with pytest.raises(SrdjaxError, match="NaN"):
        cl.nearest_cluster(np.full((2, 5), np.nan, np.float32), clusters)
