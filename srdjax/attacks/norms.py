"""The norms an attack works in, each as a random start in the ball, a steepest-ascent
direction and a projection onto the ε-ball ∩ [0, 1].

Random draws are per image: image i draws with `fold_in(key, ids[i])` (`row_keys`), so what an
attack does to an image does not depend on which other images share its batch."""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp


def row_keys(key, ids):
    """One key per image [N]: fold_in(key, its id)."""
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(ids)


def _per_sample(v, like):
    """Reshapes per-sample values [N] to broadcast against images [N, ...]."""
    return jnp.reshape(v, v.shape + (1,) * (like.ndim - v.ndim))


def _l2_size(v):
    return jnp.sqrt(jnp.sum(jnp.square(v), axis=tuple(range(1, v.ndim)), keepdims=True))


def _linf_project(x_adv, x, eps):
    return jnp.clip(jnp.clip(x_adv, x - eps, x + eps), 0.0, 1.0)


def _linf_init(keys, x, eps):
    noise = jax.vmap(lambda k: jax.random.uniform(k, x.shape[1:], x.dtype, -1.0, 1.0))(keys)
    return _linf_project(x + noise * eps, x, eps)


def _l2_project(x_adv, x, eps):
    # Clipping to [0, 1] after the ball projection never leaves the ball, since x is in the box.
    delta = x_adv - x
    delta = delta * jnp.minimum(1.0, eps / (_l2_size(delta) + 1e-12))
    return jnp.clip(x + delta, 0.0, 1.0)


def _l2_init(keys, x, eps):
    def draw(key):
        k_dir, k_rad = jax.random.split(key)
        return (jax.random.normal(k_dir, x.shape[1:], x.dtype),
                jax.random.uniform(k_rad, (), x.dtype))
    direction, u = jax.vmap(draw)(keys)
    direction = direction / (_l2_size(direction) + 1e-12)
    # Uniform in the ball: radius eps * U^(1/d).
    radius = eps * u ** (1.0 / x[0].size)
    return _l2_project(x + _per_sample(radius, x) * direction, x, eps)


class Norm(NamedTuple):
    init: Callable      # (keys [N], x, eps) -> random start in the ball ∩ [0, 1]
    direction: Callable  # gradient -> steepest-ascent direction of unit size in the norm
    project: Callable   # (x_adv, x, eps) -> point in the ball ∩ [0, 1]


NORMS = {
    "linf": Norm(_linf_init, jnp.sign, _linf_project),
    "l2": Norm(_l2_init, lambda g: g / (_l2_size(g) + 1e-12), _l2_project),
}
