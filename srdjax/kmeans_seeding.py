"""k-means++ seeding for srdjax.kmeans: scikit-learn's greedy variant, drawn on device."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from srdjax.kmeans_lloyd import sqdist


def _draw(key, weights, n):
    """n indices drawn with replacement, P(i) proportional to weights[i] (Gumbel-max trick).

    Unlike cumsum + searchsorted this is one parallel argmax: a cumsum over rows sharded on
    several devices costs more than a Lloyd pass. All-zero weights give row 0 (a real point).
    """
    logits = jnp.where(weights > 0, jnp.log(jnp.where(weights > 0, weights, 1.0)), -jnp.inf)
    return jnp.argmax(logits[:, None] + jax.random.gumbel(key, (weights.shape[0], n)), axis=0)


def kmeans_plusplus(key, data, k, n_trials):
    """Greedy k-means++ (scikit-learn's): each new center is the best of n_trials D^2 samples.

    Step i draws with fold_in(key, i), so the first j centers for k do not depend on k: the
    adaptive search reuses one k_max-center start for every candidate k. Centers are centered.
    """
    x, x_sq, v, mean = data
    start = x[_draw(jax.random.fold_in(key, 0), v, 1)][0] - mean
    closest = sqdist(x, x_sq, start[None], mean)[:, 0] * v
    centers = jnp.zeros((k, x.shape[1]), x.dtype).at[0].set(start)

    def step(i, carry):
        centers, closest = carry
        trials = x[_draw(jax.random.fold_in(key, i), closest, n_trials)] - mean  # [t, d]
        pot = jnp.minimum(closest[:, None], sqdist(x, x_sq, trials, mean)) * v[:, None]
        best = jnp.argmin(pot.sum(0))
        return centers.at[i].set(trials[best]), pot[:, best]

    centers, _ = jax.lax.fori_loop(1, k, step, (centers, closest))
    return centers


def default_trials(k):
    return 2 + int(math.log(k))
