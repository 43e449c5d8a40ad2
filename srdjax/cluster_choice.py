"""Other ways to choose the dictionary purification rebuilds with (the purifier ablation).

`srdjax.purifier` picks the cluster nearest the robust latent (the paper): one choice, as
fragile as the classifier that makes it. Two deterministic alternatives, each a pure function
of (purifier state, images) that jit and gradient attacks can trace:

  reconstruction  the cluster whose dictionary rebuilds the image's high-frequency part best:
                  k* = argmin_k ‖H(x) − Ĥ_k(x)‖² over every cluster of every class, Ĥ_k the
                  OMP rebuild with D_k (costs K purifications; ties go to the lower k).
  top classes     purify once per each of the `top` classes whose clusters lie nearest the
                  robust latent (with that class's nearest cluster), classify every rebuild
                  and average the classifier's probabilities (as CARSO, arXiv 2306.06081,
                  combines several reconstructions); returned as log-probabilities, so argmax
                  and gradient attacks apply as to logits. top = 1 is the paper's purify.

Neither draws random numbers, so neither needs EOT to be evaluated.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from srdjax import clusters as clusters_lib
from srdjax import patches as patch_lib
from srdjax import resynthesis
from srdjax import frequency
from srdjax.checks import check, is_concrete


def _split(p, x):
    o = p.options
    return frequency.split(x, method=o.split_method, lam=o.lam, pad=o.pad, sigma=o.sigma)


def rebuild_high(p, k, high):
    """Ĥ: the high parts [N, H, W, C] rebuilt with OMP, image i with dictionary k[i]."""
    o = p.options
    patches = patch_lib._extract(high, o.patch_size, o.stride)
    support, values = resynthesis.code_per_image(p.dictionaries, p.grams, k, patches, o.sparsity,
                                              o.image_chunk)
    return resynthesis.rebuild_per_image(p.dictionaries, k, support, values, high.shape[1:],
                                      o.patch_size, o.stride, o.image_chunk)


def _all_rebuilds(p, high):
    """[K, N, H, W, C]: every image's high part rebuilt with every dictionary."""
    n = high.shape[0]
    return jax.lax.map(lambda k: rebuild_high(p, jnp.full((n,), k, jnp.int32), high),
                       jnp.arange(p.dictionaries.shape[0], dtype=jnp.int32))


def reconstruction_errors(p, x):
    """‖H(x) − Ĥ_k(x)‖² [N, K] of every image under every cluster's dictionary."""
    _, high = _split(p, x)
    rebuilt = _all_rebuilds(p, high)
    return jnp.sum((rebuilt - high[None]) ** 2, axis=(2, 3, 4)).T


@jax.jit
def purify_by_reconstruction(p, x):
    """(purified images, chosen cluster [N]): rebuilt with the dictionary of lowest
    reconstruction error over all clusters."""
    low, high = _split(p, x)
    rebuilt = _all_rebuilds(p, high)                                   # [K, N, H, W, C]
    k = jnp.argmin(jnp.sum((rebuilt - high[None]) ** 2, axis=(2, 3, 4)), axis=0)
    chosen = jnp.take_along_axis(rebuilt, k[None, :, None, None, None], axis=0)[0]
    return jnp.clip(low + chosen, 0.0, 1.0).astype(x.dtype), k.astype(jnp.int32)


def top_class_clusters(p, x, top: int):
    """[N, top] cluster ids, nearest the robust latent first, one per class: the nearest
    cluster of each of the `top` classes that have the nearest clusters (ties: lower id)."""
    ids = p.clusters.class_ids
    check(top >= 1, f"top must be >= 1, got {top}")
    if is_concrete(ids):
        n_classes = len(np.unique(np.asarray(ids)))
        check(top <= n_classes, f"top must be at most the {n_classes} classes, got {top}")
    dist = clusters_lib.cluster_distances(p.latent(x), p.clusters, p.options.distance)
    order = jnp.argsort(dist, axis=1, stable=True)                       # [N, K]
    cls = ids[order]
    k = order.shape[1]
    before = jnp.arange(k)[None, :] < jnp.arange(k)[:, None]             # [i, j]: j < i
    first = ~jnp.any((cls[:, :, None] == cls[:, None, :]) & before, axis=-1)
    # A class's first (nearest) cluster keeps its place; the others go behind all of them.
    place = jnp.where(first, jnp.arange(k), k + jnp.arange(k))
    pick = jnp.argsort(place, axis=1)[:, :top]
    return jnp.take_along_axis(order, pick, axis=1).astype(jnp.int32)


def top_class_log_probs(p, classifier, x, top: int):
    """log of the mean over the `top` rebuilds of softmax(classifier(purified)): [N, classes]."""
    low, high = _split(p, x)
    ks = top_class_clusters(p, x, top)                                   # [N, top]

    def one(k):
        purified = jnp.clip(low + rebuild_high(p, k, high), 0.0, 1.0).astype(x.dtype)
        return jax.nn.softmax(classifier(purified), axis=-1)

    probs = jax.lax.map(one, ks.T)                                       # [top, N, classes]
    return jnp.log(jnp.mean(probs, axis=0))
