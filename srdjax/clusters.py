"""Cluster distributions of latents: per-class adaptive k-means, then a Gaussian per cluster.

Stage 2 of the method, numeric part: the latents of each class are clustered with
`kmeans.adaptive_kmeans` (k chosen per class), every cluster gets a mean and a per-dimension std
(and optionally a shrunk covariance for a Mahalanobis distance), and clusters are numbered
globally, class by class: cluster ids of class 0 first, then class 1, ...

Distances (both squared, summed over dimensions, never averaged):
  sigma        sum_j ((z_j - mu_j) / sigma_j)^2, a chi-square with d degrees of freedom for a
               point of the cluster; equal to "mahalanobis" with a diagonal covariance.
  mahalanobis  (z - mu)^T P (z - mu), P = S^-1 with the shrunk covariance
               S = (1 - s) C + (s tr(C) / d + min_std^2) I   (Ledoit-Wolf style target; the
               min_std^2 ridge keeps S invertible for a cluster of identical points).
C and sigma are maximum-likelihood estimates (divided by the count, numpy's np.std / bias=True).
"""
from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from srdjax import kmeans as km
from srdjax import parallel
from srdjax.checks import SrdjaxError, check, check_labels, is_concrete

KINDS = ("sigma", "mahalanobis")


@struct.dataclass
class ClusterSet:
    """K clusters of all classes. Row i is cluster i, of class class_ids[i]."""
    means: jax.Array  # [K, d]
    stds: jax.Array  # [K, d], floored at min_std
    class_ids: jax.Array  # [K] int32
    index_in_class: jax.Array  # [K] int32, 0.. within its class
    counts: jax.Array  # [K] int32, samples the cluster was fitted on
    precisions: jax.Array | None = None  # [K, d, d] inverse shrunk covariances, if fitted

    @property
    def num_clusters(self) -> int:
        return self.means.shape[0]


# ----------------------------------------------------------------------------- fitting

@functools.partial(jax.jit, static_argnames=("k", "covariance"))
def _cluster_stats(x, weights, labels, min_std, shrinkage, *, k, covariance):
    """Mean, std, count and (optionally) precision of clusters 0..k-1 of the weighted rows x."""
    onehot = jax.nn.one_hot(labels, k, dtype=x.dtype) * weights[:, None]  # [n, k]
    counts = onehot.sum(0)
    means = (onehot.T @ x) / counts[:, None]
    # centered per cluster before squaring: E[x^2] - mu^2 loses digits in float32
    dev = (x - means[jnp.clip(labels, 0, k - 1)]) * weights[:, None]
    var = (onehot.T @ (dev * dev)) / counts[:, None]
    stds = jnp.maximum(jnp.sqrt(var), min_std)
    if not covariance:
        return means, stds, counts, None
    cov = jnp.einsum("nk,nd,ne->kde", onehot, dev, dev) / counts[:, None, None]
    d = x.shape[1]
    target = jnp.trace(cov, axis1=1, axis2=2) / d * shrinkage + min_std ** 2
    shrunk = (1.0 - shrinkage) * cov + target[:, None, None] * jnp.eye(d, dtype=x.dtype)
    chol = jax.vmap(jnp.linalg.cholesky)(shrunk)
    eye = jnp.broadcast_to(jnp.eye(d, dtype=x.dtype), shrunk.shape)
    precisions = jax.vmap(lambda c, i: jax.scipy.linalg.cho_solve((c, True), i))(chol, eye)
    return means, stds, counts, 0.5 * (precisions + precisions.swapaxes(1, 2))


def _check_latents(z, name="latents"):
    z = jnp.asarray(z)
    check(z.ndim == 2 and z.shape[0] >= 1 and z.shape[1] >= 1,
          f"{name} must be a non-empty matrix [n, d], got shape {tuple(z.shape)}")
    check(jnp.issubdtype(z.dtype, jnp.floating), f"{name} must be floating point, got {z.dtype}")
    if is_concrete(z):
        check(bool(jnp.isfinite(z).all()), f"{name} contains NaN or infinite values")
    return z


def fit_clusters(key: jax.Array, latents: jax.Array, labels: jax.Array, num_classes: int, *,
                 k_max: int = 8, criterion: str = "silhouette",
                 threshold: float = km.SILHOUETTE_THRESHOLD, mask: jax.Array | None = None,
                 min_std: float = 1e-3, covariance: bool = False, shrinkage: float = 0.1,
                 n_init: int = 4, max_iter: int = 100, tol: float = 1e-4,
                 silhouette_sample: int = 2000, chunk_size: int = km.DEFAULT_CHUNK,
                 mesh: jax.sharding.Mesh | None = None) -> tuple[ClusterSet, jax.Array, dict]:
    """Cluster the latents [n, d] of each class with adaptive k-means; fit a Gaussian per cluster.

    mask [n] bool (e.g. "the baseline classifies it correctly"): only these samples are
    clustered. Returns the ClusterSet, the global cluster id of every sample [n] int32 (-1 where
    masked out: use `assign` to place those later), and an info dict with, per class, the
    chosen k, the sample count and the criterion's score of every candidate k (NaN beyond the
    class's k_max). Each class's rows are padded to the largest class, so one compiled
    k-means program serves every class. Clusters left empty by the final assignment are dropped.

    mesh: run each class's k-means with its rows split over the mesh's devices (all processes'
    in a multi-process run, where every process passes the same latents and gets the same
    result); the per-cluster statistics, a pass over [n_class, d], are computed on every
    process from its own copy.
    """
    latents = _check_latents(latents)
    n = latents.shape[0]
    check(isinstance(num_classes, int) and num_classes >= 1,
          f"num_classes must be a positive int, got {num_classes!r}")
    check_labels(labels, n, num_classes)
    check(isinstance(k_max, int) and k_max >= 1, f"k_max must be an int >= 1, got {k_max!r}")
    check(0.0 <= float(shrinkage) <= 1.0, f"shrinkage must lie in [0, 1], got {shrinkage!r}")
    check(float(min_std) > 0.0, f"min_std must be > 0, got {min_std!r}")
    y = np.asarray(labels)
    keep = np.ones(n, bool) if mask is None else np.asarray(mask)
    check(keep.shape == (n,) and keep.dtype == bool,
          f"mask must be booleans of shape [{n}], got {keep.dtype} {keep.shape}")
    members = [np.flatnonzero((y == c) & keep) for c in range(num_classes)]
    for c, idx in enumerate(members):
        if idx.size == 0:
            where = " left after the mask" if mask is not None else ""
            raise SrdjaxError(f"class {c} has no samples{where}; each of the {num_classes} "
                              "classes needs at least one to be clustered")
    n_max = max(idx.size for idx in members)
    split = mesh is not None and mesh.size > 1
    if split:  # rows divide the devices; padding rows are masked out
        n_max = -(-n_max // mesh.size) * mesh.size
    assignment = np.full(n, -1, np.int32)
    parts, ks, scores = [], [], np.full((num_classes, k_max), np.nan)
    offset = 0
    for c, idx in enumerate(members):
        padded = np.concatenate([idx, np.full(n_max - idx.size, idx[0])])
        valid = np.arange(n_max) < idx.size
        x_c = jnp.take(latents, jnp.asarray(padded), axis=0)
        k_c = min(k_max, idx.size)
        x_fit, valid_fit = (parallel.shard_global(mesh, np.asarray(x_c), valid) if split
                            else (x_c, jnp.asarray(valid)))
        res = km.adaptive_kmeans(jax.random.fold_in(key, c), x_fit, k_c, criterion=criterion,
                                 threshold=threshold, mask=valid_fit, n_init=n_init,
                                 max_iter=max_iter, tol=tol, silhouette_sample=silhouette_sample,
                                 chunk_size=chunk_size)
        local = parallel.to_host(res.result.labels)[:idx.size]
        used, local = np.unique(local, return_inverse=True)  # drop clusters left empty
        local_padded = np.concatenate([local, np.zeros(n_max - idx.size, int)]).astype(np.int32)
        stats = _cluster_stats(x_c, jnp.asarray(valid, latents.dtype), jnp.asarray(local_padded),
                               jnp.asarray(min_std, latents.dtype),
                               jnp.asarray(shrinkage, latents.dtype), k=used.size,
                               covariance=covariance)
        assignment[idx] = offset + local
        offset += used.size
        parts.append(stats + (np.full(used.size, c),))
        ks.append(used.size)
        scores[c, :k_c] = parallel.to_host(res.scores)
    cat = lambda i: jnp.concatenate([p[i] for p in parts])  # noqa: E731
    clusters = ClusterSet(
        means=cat(0), stds=cat(1), counts=cat(2).astype(jnp.int32),
        class_ids=jnp.asarray(np.concatenate([p[4] for p in parts]), jnp.int32),
        index_in_class=jnp.asarray(np.concatenate([np.arange(k) for k in ks]), jnp.int32),
        precisions=cat(3) if covariance else None)
    info = {"k": np.array(ks), "samples": np.array([idx.size for idx in members]),
            "scores": scores, "criterion": criterion}
    return clusters, jnp.asarray(assignment), info


# ----------------------------------------------------------------------------- distances

def _distances_block(z, means, stds, precisions, kind):
    diff = z[:, None, :] - means[None]  # [b, K, d]: a block keeps this small
    if kind == "sigma":
        return jnp.sum((diff / stds[None]) ** 2, -1)
    return jnp.einsum("bkd,kde,bke->bk", diff, precisions, diff)


@functools.partial(jax.jit, static_argnames=("kind",))
def _distances(z, clusters, *, kind):
    n, d = z.shape
    per_row = clusters.num_clusters * d * (d if kind == "mahalanobis" else 1)
    block = max(1, min(n, (1 << 24) // per_row))  # an [block, K, d] difference near 64 MB
    pad = -n % block
    zb = jnp.pad(z, ((0, pad), (0, 0))).reshape(-1, block, d)
    out = jax.lax.map(lambda b: _distances_block(b, clusters.means, clusters.stds,
                                                 clusters.precisions, kind), zb)
    return out.reshape(-1, clusters.num_clusters)[:n]


def _check_query(z, clusters, kind):
    z = _check_latents(z, "z")
    check(kind in KINDS, f"kind must be one of {KINDS}, got {kind!r}")
    check(z.shape[1] == clusters.means.shape[1],
          f"z has {z.shape[1]} dims but the clusters have {clusters.means.shape[1]}")
    check(kind != "mahalanobis" or clusters.precisions is not None,
          "kind='mahalanobis' needs precisions: fit the clusters with covariance=True")
    return z


def cluster_distances(z: jax.Array, clusters: ClusterSet, kind: str = "sigma") -> jax.Array:
    """Squared distance [n, K] of every latent z [n, d] to every cluster (see the module doc)."""
    z = _check_query(z, clusters, kind)
    out = _distances(z, clusters, kind=kind)
    chex.assert_shape(out, (z.shape[0], clusters.num_clusters))
    return out


def nearest_cluster(z: jax.Array, clusters: ClusterSet, kind: str = "sigma") -> jax.Array:
    """Global id [n] int32 of the nearest cluster of any class."""
    return jnp.argmin(cluster_distances(z, clusters, kind), axis=1).astype(jnp.int32)


def assign(clusters: ClusterSet, latents: jax.Array, labels: jax.Array,
           kind: str = "sigma") -> jax.Array:
    """Global id [n] int32 of the nearest cluster of each sample's own class.

    For samples left out of the fit (e.g. misclassified training images), which still need a
    cluster of their true class for robust training.
    """
    z = _check_query(latents, clusters, kind)
    check_labels(labels, z.shape[0])
    labels = jnp.asarray(labels)
    if is_concrete(labels):
        missing = np.setdiff1d(np.asarray(labels), np.asarray(clusters.class_ids))
        check(missing.size == 0, f"labels {missing.tolist()} have no cluster in this ClusterSet")
    dist = _distances(z, clusters, kind=kind)
    own = clusters.class_ids[None, :] == labels[:, None]
    return jnp.argmin(jnp.where(own, dist, jnp.inf), axis=1).astype(jnp.int32)
