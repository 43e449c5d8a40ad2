"""The Square attack (Andriushchenko et al. 2020) as AutoAttack's code runs it (fra31/auto-attack,
`autoattack/square.py`): gradient-free random search with the margin loss, L∞ and L2.

Followed from the official code: `n_queries` iterations after the start (5,000 in AutoAttack's
standard version), the side of the square from p_init (0.8) halved at iterations 10, 50, 200,
500, 1,000, 2,000, 4,000, 6,000 and 8,000 (AutoAttack runs Square with `resc_schedule=False`;
`rescale_schedule=True` stretches these to the budget as the code's default), a position
drawn in {0, ..., H - s - 1} (the code's random_int never draws the last one); L∞: the start
is vertical stripes x ± eps per column and channel, a proposal sets a square to x ± eps, one sign
per channel; L2: see `square_l2`. A proposal is kept when it lowers the margin; an image stops
once misclassified. Images misclassified clean are not attacked; the result is the last kept
point where the image ends misclassified, else x.

The code draws one square position (and sign) for the whole batch at each iteration; here each
image draws its own from fold_in(key, its id), so that its result does not depend on its batch.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from srdjax import parallel
from srdjax.attacks import loops
from srdjax.attacks import square_l2
from srdjax.attacks.inputs import _check_count, _check_ids, _check_inputs, _check_key
from srdjax.attacks.losses import _best_other, _logit_of
from srdjax.attacks.loops import (_HOST, _active_rows, _apply, _compiled, _loop, _row_ids,
                                  _rows_like, _Step)
from srdjax.attacks.norms import _per_sample, row_keys
from srdjax.checks import check, is_concrete

# Iteration bound -> divisor of p_init (the code's p_selection): p_init / div once it > bound.
_P_SCHEDULE = ((10, 2), (50, 4), (200, 8), (500, 16), (1000, 32), (2000, 64), (4000, 128),
               (6000, 256), (8000, 512))


def square_p(it: int, n_queries: int, p_init: float, rescale_schedule: bool = False) -> float:
    """The fraction p of the image a square covers at iteration `it` (the code's p_selection)."""
    if rescale_schedule:
        it = int(it / n_queries * 10000)
    divisor = 1
    for bound, div in _P_SCHEDULE:
        if it > bound:
            divisor = div
    return p_init / divisor


def square_sizes(n_queries: int, p_init: float, height: int, width: int, channels: int = 3,
                 norm: str = "linf", rescale_schedule: bool = False) -> np.ndarray:
    """The side s of the square at each iteration: round(sqrt(p * n_features / C)), at least 1
    (L∞) or 3 and odd (L2), at most the image's side."""
    n_features = channels * height * width
    sizes = []
    for it in range(n_queries):
        s = int(round(math.sqrt(square_p(it, n_queries, p_init, rescale_schedule) * n_features
                                / channels)))
        if norm == "linf":
            s = max(s, 1)
        else:
            s = max(s, 3)
            s += 1 - s % 2
        sizes.append(min(s, min(height, width)))
    return np.asarray(sizes, np.int32)


class _SquareGoal(NamedTuple):
    fn: Callable
    x: jax.Array
    y: jax.Array
    target: jax.Array | None
    eps: jax.Array
    key: jax.Array
    sizes: jax.Array      # the square's side at each iteration
    ids: jax.Array        # each row's id: its random draws are keyed by it
    etas: jax.Array       # L2: eta(s) of every side used (square_l2.eta_table); L∞: unused
    eta_index: jax.Array  # L2: each iteration's entry of etas


# Host loops re-batch Square every this many queries to the rows not yet fooled: a fooled row
# (margin <= 0) never changes again, so querying it is wasted (most of the cost on a CPU once
# half the batch is fooled). Draws are keyed per row, so the images are those of one batch.
SQUARE_COMPACT_EVERY = 50


def _square_margin(g: _SquareGoal, u):
    """Below zero = success; the attack minimises it."""
    logits = g.fn(u)
    chex.assert_shape(logits, (g.x.shape[0], None))
    if g.target is None:
        return _logit_of(logits, g.y) - _best_other(logits, g.y)
    return _best_other(logits, g.target) - _logit_of(logits, g.target)


def _square_init(settings, g, key):
    norm, = settings
    x = g.x
    n, h, w, c = x.shape
    keys = row_keys(key, g.ids)
    if norm == "linf":
        stripes = jax.vmap(lambda k: jax.random.rademacher(k, (1, w, c), x.dtype))(keys)
        start = jnp.clip(x + g.eps * stripes, 0.0, 1.0)
    else:
        blocks = jnp.asarray(square_l2.start_blocks(h, w), x.dtype)

        def draws(k):
            k_sign, k_t = jax.random.split(k)
            return (jax.random.rademacher(k_sign, (blocks.shape[0], c), x.dtype),
                    jax.random.bernoulli(k_t, 0.5, (blocks.shape[0],)))
        start = square_l2.start(x, g.eps, blocks, *jax.vmap(draws)(keys))
    # Images misclassified clean are not attacked: a margin of -inf keeps them as they are.
    correct = _square_margin(g, x) > 0
    return start, jnp.where(correct, _square_margin(g, start), -jnp.inf)


def _square_body(settings, g, i, carry):
    norm, = settings
    best, m_best = carry
    x, eps = g.x, g.eps
    n, h, w, c = x.shape
    s = g.sizes[i]

    def draws(key):
        k = jax.random.split(key, 6)
        corner = lambda a, b, size: (jax.random.randint(a, (), 0, jnp.maximum(h - s, 1)),
                                     jax.random.randint(b, (), 0, jnp.maximum(w - s, 1)))
        return (corner(k[0], k[1], s), corner(k[2], k[3], s),
                jax.random.rademacher(k[4], (c,), x.dtype), jax.random.bernoulli(k[5], 0.5))

    first, second, signs, transposed = jax.vmap(draws)(row_keys(jax.random.fold_in(g.key, i),
                                                                 g.ids))
    if norm == "linf":
        rows = jnp.arange(h)[None, :, None, None]
        cols = jnp.arange(w)[None, None, :, None]
        top, left = first[0][:, None, None, None], first[1][:, None, None, None]
        window = (rows >= top) & (rows < top + s) & (cols >= left) & (cols < left + s)
        step = jnp.where(window, 2.0 * eps * signs[:, None, None, :], 0.0)
        candidate = jnp.clip(jnp.clip(best + step, x - eps, x + eps), 0.0, 1.0)
    else:
        candidate = square_l2.proposal(x, best, eps, g.etas[g.eta_index[i]], s, first, second,
                                       signs, transposed)
    m_new = _square_margin(g, candidate)
    accept = (m_new < m_best) & (m_best > 0)
    return (jnp.where(_per_sample(accept, x), candidate, best),
            jnp.where(accept, m_new, m_best))


def _square_result(settings, g, best, margin):
    """best where the image ends misclassified (or at its target), else x."""
    logits = g.fn(best)
    done = (jnp.argmax(logits, -1) != g.y) if g.target is None else (
        jnp.argmax(logits, -1) == g.target)
    return jnp.where(_per_sample(done & (margin > -jnp.inf), g.x), best, g.x)


def _square_host(g: _SquareGoal, carry, n_steps: int, norm: str):
    """The query loop from the host, re-batched to the unfooled rows every SQUARE_COMPACT_EVERY
    queries (`loops._active_rows`). One process only: the rows are gathered on the host."""
    n, parts = g.x.shape[0], parallel.row_parts(g.x)
    host = {name: np.asarray(getattr(g, name)) for name in ("x", "y", "target", "ids")
            if getattr(g, name) is not None}
    best, margin = np.array(carry[0]), np.array(carry[1])
    rows, real, sub_g = np.arange(n), n, g
    i = 0
    while i < n_steps:
        for j in range(i, min(i + SQUARE_COMPACT_EVERY, n_steps)):
            carry = loops._host_apply(_square_body, (norm,), sub_g, jnp.asarray(j, jnp.int32),
                                      carry)
        i = min(i + SQUARE_COMPACT_EVERY, n_steps)
        best[rows[:real]] = np.asarray(carry[0])[:real]
        margin[rows[:real]] = np.asarray(carry[1])[:real]
        active = margin > 0
        if i >= n_steps or not active.any():
            break
        new_rows, new_real = _active_rows(active, parts)
        if len(new_rows) >= len(rows):
            continue
        rows, real = new_rows, new_real
        sub_g = g._replace(**{name: _rows_like(v[rows], g.x) for name, v in host.items()})
        carry = (_rows_like(best[rows], g.x), _rows_like(margin[rows], g.x))
    return _rows_like(best, g.x), _rows_like(margin, g.x)


def _square_impl(fn, x, y, target, eps, key, ids, *, n_queries, p_init, norm, rescale_schedule):
    _, h, w, c = x.shape
    k_init, k_loop = jax.random.split(key)
    sizes = square_sizes(n_queries, p_init, h, w, c, norm, rescale_schedule)
    if norm == "l2":
        etas, eta_index = square_l2.eta_table(sizes, h, w)
    else:
        etas, eta_index = np.zeros((1, 1, 1), np.float32), np.zeros(n_queries, np.int32)
    g = _SquareGoal(fn, x, y, target, jnp.asarray(eps, x.dtype), k_loop, jnp.asarray(sizes),
                    _row_ids(ids, x), jnp.asarray(etas, x.dtype), jnp.asarray(eta_index))
    carry = _apply(_square_init, (norm,), g, k_init)
    if _HOST.get() and is_concrete(x) and jax.process_count() == 1:
        best, margin = _square_host(g, carry, n_queries, norm)
    else:
        best, margin = _loop(n_queries, _Step(_square_body, (norm,), g), carry)
    out = _apply(_square_result, (), g, best, margin)
    return jax.lax.stop_gradient(out.astype(x.dtype))


_square = _compiled(_square_impl, ("n_queries", "p_init", "norm", "rescale_schedule"))


def square(logits_fn, x, y, *, eps, key, norm="linf", n_queries=5000, p_init=0.8, target=None,
           rescale_schedule=False, ids=None):
    """The Square attack, L∞ or L2, as AutoAttack runs it (see the module docstring): defaults
    are the standard version's (5,000 iterations, p_init = 0.8, the schedule not rescaled).

    `n_queries` counts the iterations after the start (each one query of the model; the start
    and the clean check cost two more). With `target`, the margin is the target's over the best
    other class and success means reaching it (an extension: AutoAttack's Square is untargeted).
    `ids` (default 0..N-1) key each image's random draws.
    """
    _check_inputs(logits_fn, x, y, eps, target, norm)
    _check_key(key)
    _check_count(n_queries, "n_queries")
    _check_ids(ids, jnp.shape(x)[0])
    check(0 < p_init <= 1, f"p_init must lie in (0, 1], got {p_init!r}")
    shape = jnp.shape(x)
    smallest = 2 if norm == "linf" else 5
    check(min(shape[1], shape[2]) >= smallest,
          f"square ({norm}) needs images of at least {smallest}x{smallest} pixels, got {shape}")
    return _square(logits_fn, x, y, target, eps, key, ids, n_queries=n_queries,
                   p_init=float(p_init), norm=norm, rescale_schedule=bool(rescale_schedule))
