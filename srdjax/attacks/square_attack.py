"""The Square attack (Andriushchenko et al. 2020): gradient-free random search over squares."""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from srdjax import parallel
from srdjax.attacks import loops
from srdjax.attacks.inputs import _check_count, _check_ids, _check_inputs, _check_key
from srdjax.attacks.losses import _best_other, _logit_of
from srdjax.attacks.loops import _HOST, _apply, _compiled, _loop, _row_ids, _rows_like, _Step
from srdjax.attacks.norms import _per_sample
from srdjax.checks import check, is_concrete


# Fraction of the budget used (in 1/10000) -> divisor of p_init, the original schedule.
_P_SCHEDULE = ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64),
               (6000, 128), (8000, 256), (10000, 512))


def square_sizes(n_queries: int, p_init: float, height: int, width: int) -> np.ndarray:
    """Side of the square changed at each query after the first: sqrt(p * H * W), p halving on the
    original schedule, at least 1 and less than the image side."""
    sizes = []
    for it in range(n_queries - 1):
        t = int(it / n_queries * 10000)
        p = p_init / next(div for bound, div in _P_SCHEDULE if t <= bound)
        sizes.append(min(max(int(round(math.sqrt(p * height * width))), 1), min(height, width) - 1))
    return np.asarray(sizes, np.int32).reshape(-1)


class _SquareGoal(NamedTuple):
    fn: Callable
    x: jax.Array
    y: jax.Array
    target: jax.Array | None
    eps: jax.Array
    key: jax.Array
    sizes: jax.Array      # the window side of each proposal
    ids: jax.Array        # each row's index in the batch: its random draws are keyed by it


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
    # Start: vertical stripes of +-eps, kept only where they beat the clean image.
    x = g.x
    _, _, w, c = x.shape
    signs = jax.vmap(lambda r: jax.random.rademacher(jax.random.fold_in(key, r), (1, w, c),
                                                     x.dtype))(g.ids)
    stripes = jnp.clip(x + g.eps * signs, 0.0, 1.0)
    m_clean, m_stripes = _square_margin(g, x), _square_margin(g, stripes)
    use = m_stripes < m_clean
    return jnp.where(_per_sample(use, x), stripes, x), jnp.where(use, m_stripes, m_clean)


def _square_body(settings, g, i, carry):
    best, m_best = carry
    x, eps = g.x, g.eps
    n, h, w, c = x.shape
    rows = jnp.arange(h)[None, :, None, None]
    cols = jnp.arange(w)[None, None, :, None]
    channel_bits = jnp.arange(min(c, 30))
    s = g.sizes[i]
    step_key = jax.random.fold_in(g.key, i)

    def draws(row):
        k_top, k_left, k_sign, k_flip = jax.random.split(jax.random.fold_in(step_key, row), 4)
        return (jax.random.randint(k_top, (), 0, h - s + 1),
                jax.random.randint(k_left, (), 0, w - s + 1),
                jax.random.rademacher(k_sign, (c,), x.dtype),
                jax.random.randint(k_flip, (), 1, 2 ** channel_bits.size))

    top, left, signs, pattern = jax.vmap(draws)(g.ids)
    top, left = top[:, None, None, None], left[:, None, None, None]
    window = (rows >= top) & (rows < top + s) & (cols >= left) & (cols < left + s)
    signs = signs[:, None, None, :]
    proposal = lambda sg: jnp.where(window, jnp.clip(x + eps * sg, 0.0, 1.0), best)
    # A draw that leaves the window as it is wastes a query: redraw among the other sign
    # patterns (flip a random non-empty subset of channels), as the original's rejection loop.
    same = jnp.all(jnp.where(window, jnp.abs(proposal(signs) - best) < 1e-7, True),
                   axis=(1, 2, 3))
    flips = 1 - 2 * ((pattern[:, None] >> channel_bits) & 1)
    flips = jnp.pad(flips, ((0, 0), (0, c - channel_bits.size)), constant_values=1)
    signs = jnp.where(_per_sample(same, signs), signs * flips[:, None, None, :], signs)
    candidate = proposal(signs)
    m_new = _square_margin(g, candidate)
    accept = (m_new < m_best) & (m_best > 0)
    return (jnp.where(_per_sample(accept, x), candidate, best),
            jnp.where(accept, m_new, m_best))


def _square_host(g: _SquareGoal, carry, n_steps: int):
    """The query loop from the host, re-batched to the unfooled rows every SQUARE_COMPACT_EVERY
    queries (sizes rounded up to eighths of the batch, so few shapes compile; padding repeats a
    row, whose copies evolve identically). One process only: the rows are gathered on the host."""
    n, parts = g.x.shape[0], parallel.row_parts(g.x)
    quantum = -(-max(1, -(-n // 8)) // parts) * parts
    host = {name: np.asarray(getattr(g, name)) for name in ("x", "y", "target", "ids")
            if getattr(g, name) is not None}
    best, margin = np.array(carry[0]), np.array(carry[1])
    rows, real, sub_g = np.arange(n), n, g
    i = 0
    while i < n_steps:
        for j in range(i, min(i + SQUARE_COMPACT_EVERY, n_steps)):
            carry = loops._host_apply(_square_body, (), sub_g, jnp.asarray(j, jnp.int32), carry)
        i = min(i + SQUARE_COMPACT_EVERY, n_steps)
        best[rows[:real]] = np.asarray(carry[0])[:real]
        margin[rows[:real]] = np.asarray(carry[1])[:real]
        active = np.nonzero(margin > 0)[0]
        if i >= n_steps or active.size == 0:
            break
        size = -(-active.size // quantum) * quantum
        if size >= len(rows):
            continue
        rows, real = np.concatenate([active, np.full(size - active.size, active[-1])]), active.size
        sub_g = g._replace(**{name: _rows_like(v[rows], g.x) for name, v in host.items()})
        carry = (_rows_like(best[rows], g.x), _rows_like(margin[rows], g.x))
    return _rows_like(best, g.x)


def _square_impl(fn, x, y, target, eps, key, ids, *, n_queries, p_init):
    n, h, w, _ = x.shape
    k_init, k_loop = jax.random.split(key)
    # One spare entry so that a budget of one query still traces the (never run) loop body.
    sizes = jnp.asarray(np.append(square_sizes(n_queries, p_init, h, w), 1))
    host = _HOST.get() and is_concrete(x)
    g = _SquareGoal(fn, x, y, target, jnp.asarray(eps, x.dtype), k_loop, sizes, _row_ids(ids, x))
    carry = _apply(_square_init, (), g, k_init)
    if host and jax.process_count() == 1:
        best = _square_host(g, carry, n_queries - 1)
    else:
        best, _ = _loop(n_queries - 1, _Step(_square_body, (), g), carry)
    return jax.lax.stop_gradient(best.astype(x.dtype))


_square = _compiled(_square_impl, ("n_queries", "p_init"))


def square(logits_fn, x, y, *, eps, key, n_queries=1000, p_init=0.8, target=None, ids=None):
    """L∞ Square attack: gradient-free random search with the margin loss.

    Starts from vertical stripes of +-eps (one query; kept per sample only if it lowers the margin
    of the clean image, which costs one more query), then proposes per sample a square window of
    side sqrt(p * H * W) set to x +- eps with one random sign per channel, accepted if it lowers
    the margin; samples already misclassified (or at `target`) stop changing. p starts at p_init
    (0.05 in the paper, 0.8 in AutoAttack's tuning for CIFAR-10, the default here) and halves on
    the original schedule. `n_queries` counts the start and the proposals.
    """
    _check_inputs(logits_fn, x, y, eps, target)
    _check_ids(ids, jnp.shape(x)[0])
    _check_key(key)
    _check_count(n_queries, "n_queries")
    check(0 < p_init <= 1, f"p_init must lie in (0, 1], got {p_init!r}")
    shape = jnp.shape(x)
    check(min(shape[1], shape[2]) >= 2, f"square needs images of at least 2x2 pixels, got {shape}")
    return _square(logits_fn, x, y, target, eps, key, ids, n_queries=n_queries, p_init=float(p_init))
