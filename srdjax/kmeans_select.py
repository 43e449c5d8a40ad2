"""Scores for choosing k in srdjax.adaptive_kmeans: the mean silhouette and the BIC of a
diagonal Gaussian mixture at the hard k-means assignment."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from srdjax.kmeans_lloyd import chunks_of, sqdist

CRITERIA = ("silhouette", "bic")

# A split of one Gaussian blob scores about 0.34 in 2-d but below 0.1 from 8-d on (measured, see
# adaptive_kmeans), so 0.1 keeps unimodal latents at k = 1 while letting weak but real structure
# through, which the textbook 0.25 ("no substantial structure") would hide in high dimension.
SILHOUETTE_THRESHOLD = 0.1


def silhouettes(xs, ws, labels, k, chunk_size):
    """Mean silhouette of B labelings of the same points: xs [m, d], ws [m] 0/1, labels [B, m].

    The [rows, m] distance block is shared by all labelings (one matmul with a stacked one-hot).
    A labeling with fewer than two non-empty clusters gets -1 (the silhouette is undefined).
    """
    m, nb = xs.shape[0], labels.shape[0]
    xs = xs - jnp.sum(xs * ws[:, None], 0) / jnp.sum(ws)
    sq = jnp.sum(xs * xs, -1)
    onehot = jax.nn.one_hot(labels, k, dtype=xs.dtype) * ws[None, :, None]  # [B, m, k]
    counts = onehot.sum(1)  # [B, k]
    stacked = onehot.transpose(1, 0, 2).reshape(m, nb * k)
    rows = max(1, min(chunk_size, (1 << 24) // m))  # keep a distance block near 64 MB
    pad = -m % rows
    idx = jnp.arange(m + pad).reshape(-1, rows)
    xr = jnp.pad(xs, ((0, pad), (0, 0))).reshape(-1, rows, xs.shape[1])
    sqr = jnp.pad(sq, (0, pad)).reshape(-1, rows)

    def block(args):
        x, s, i = args
        dist = jnp.sqrt(sqdist(x, s, xs, jnp.zeros_like(xs[0])))
        dist = jnp.where(i[:, None] == jnp.arange(m)[None, :], 0.0, dist)  # exact self-distance
        return dist @ stacked

    sums = jax.lax.map(block, (xr, sqr, idx)).reshape(-1, nb, k)[:m].transpose(1, 0, 2)
    own_count = jnp.take_along_axis(counts, labels, axis=1)  # [B, m]
    a = jnp.take_along_axis(sums, labels[..., None], axis=2)[..., 0] / jnp.maximum(
        own_count - 1.0, 1.0)
    other = (counts[:, None, :] > 0) & (jnp.arange(k) != labels[..., None])
    b = jnp.min(jnp.where(other, sums / jnp.maximum(counts, 1.0)[:, None, :], jnp.inf), -1)
    top = jnp.maximum(a, b)
    ok = (own_count > 1) & (top > 0) & jnp.isfinite(b)  # scikit-learn's nan_to_num cases -> 0
    s = jnp.where(ok, (b - a) / jnp.where(ok, top, 1.0), 0.0)
    score = jnp.sum(s * ws, 1) / jnp.sum(ws)
    return jnp.where(jnp.sum(counts > 0, 1) >= 2, score, -1.0)


def bic_scores(data, centers, labels, var_floor, layout):
    """BIC [B] of B fits: centered centers [B, k, d], labels [B, n_pad] (see adaptive_kmeans)."""
    x, _, v, mean = data
    (k, d), n = centers.shape[1:], jnp.sum(v)
    x4, v4 = chunks_of(x, layout), chunks_of(v, layout)

    def one(centers, labels):
        l4 = chunks_of(labels, layout)

        def body(carry, j):
            onehot = jax.nn.one_hot(l4[:, j], k, dtype=x.dtype) * v4[:, j][..., None]
            dev = (x4[:, j] - mean - centers[l4[:, j]]) ** 2
            return (carry[0] + jnp.einsum("gck,gcd->gkd", onehot, dev),
                    carry[1] + onehot.sum(1)), None

        init = (jnp.zeros((layout[0], k, d), x.dtype), jnp.zeros((layout[0], k), x.dtype))
        (ss, counts), _ = jax.lax.scan(body, init, jnp.arange(x4.shape[1]))
        ss, counts = ss.sum(0), counts.sum(0)
        var = ss / jnp.maximum(counts, 1.0)[:, None] + var_floor
        used = counts > 0
        loglik = jnp.sum(jnp.where(
            used,
            counts * jnp.log(jnp.maximum(counts, 1.0) / n)
            - 0.5 * jnp.sum(counts[:, None] * jnp.log(2 * jnp.pi * var) + ss / var, -1),
            0.0))
        n_used = jnp.sum(used)
        return -2.0 * loglik + (2 * d * n_used + n_used - 1) * jnp.log(n)

    return jax.vmap(one)(centers, labels)


silhouettes_jit = jax.jit(silhouettes, static_argnames=("k", "chunk_size"))
