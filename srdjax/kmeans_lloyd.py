"""Lloyd's iterations for srdjax.kmeans: a plain pass over every row, and one pruned by
Hamerly's bounds that gives the same iterations and labels.

Layout: the n points, padded only if needed, with weights v (0 for padding or a masked row),
are seen as x.reshape(g, m, c, d), g the number of devices x is sharded over by rows (1 if it
is not): chunk j is x4[:, j], c contiguous rows on each device. Distances only exist for one
chunk at a time ([g, c, k]); x is never copied (a 100 MB copy costs more than a Lloyd
iteration on a CPU); a pass runs data-parallel and only [k, d] sums cross devices. Centers are
kept relative to the data mean, as in scikit-learn, so ||x||^2 - 2 x.c + ||c||^2 loses fewer
digits.

`lloyd` reads every row every iteration (vmapped restarts and candidates on GPU/TPU run it in
lockstep); `lloyd_pruned`, the CPU default, keeps Hamerly's distance bounds per row and
re-measures only rows that may change cluster: on a CPU a pass costs the thin
[rows, d] x [d, k] distance matmul of every row it measures (a plain read of x is faster
still; `benchmarks/kmeans.py --floors`).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P


def chunks_of(a, layout):
    """[n_pad, ...] -> [g, m, c, ...] (a reshape, never a copy); layout = (g, c)."""
    g, c = layout
    return a.reshape(g, a.shape[0] // (g * c), c, *a.shape[1:])


def sqdist(x, x_sq, centers, mean):
    """Squared distances of raw rows x (with ||x - mean||^2 = x_sq) to centered centers [k, d].

    The ||x||^2 - 2 x.c + ||c||^2 form is one thin matmul instead of an [n, k, d] difference.
    """
    cross = x @ centers.T - mean @ centers.T
    d2 = x_sq[..., None] - 2.0 * cross + jnp.sum(centers * centers, -1)
    return jnp.maximum(d2, 0.0)  # rounding can make a tiny distance negative


def assign(x, x_sq, v, mean, centers, active, layout):
    """One pass over the chunks: nearest active center, per-center sums and counts, inertia.

    Returns centered sums [k, d], counts [k], inertia, labels [n_pad], distances [n_pad].
    Sums are kept per device group and added once at the end: no collective per chunk.
    """
    k, g = centers.shape[0], layout[0]
    x4, sq4, v4 = (chunks_of(a, layout) for a in (x, x_sq, v))

    def body(carry, j):
        sums, counts, inertia = carry
        xj, vj = x4[:, j], v4[:, j]
        d2 = jnp.where(active, sqdist(xj, sq4[:, j], centers, mean), jnp.inf)
        labels = jnp.argmin(d2, axis=-1).astype(jnp.int32)
        mind = jnp.min(d2, axis=-1)
        # a scatter-add costs a third of the one-hot matmul; padding goes to a spare segment k
        into = jnp.where(vj > 0, labels, k)
        add = jax.vmap(lambda a, i: jax.ops.segment_sum(a, i, k + 1)[:k])
        sums = sums + add(xj, into)
        counts = counts + add(vj, into)
        return (sums, counts, inertia + jnp.sum(mind * vj, 1)), (labels, mind)

    zero = (jnp.zeros((g, *centers.shape), x.dtype), jnp.zeros((g, k), x.dtype),
            jnp.zeros((g,), x.dtype))
    (sums, counts, inertia), (labels, mind) = jax.lax.scan(body, zero, jnp.arange(x4.shape[1]))
    sums, counts, inertia = sums.sum(0), counts.sum(0), inertia.sum(0)
    sums = sums - counts[:, None] * mean
    rows = lambda a: a.swapaxes(0, 1).reshape(-1)  # noqa: E731  scan stacks [m, g, c]
    return sums, counts, inertia, rows(labels), rows(mind)


def _reseed_empty(x, v, mean, labels, mind, sums, counts, active):
    """Give every empty active cluster one of the points farthest from their centers.

    As scikit-learn does: the point leaves its old cluster's sums, so no mass is counted twice.
    Returns sums, counts and, per cluster, the row it was given (len(x), out of range, for a
    cluster that was not empty).
    """
    k, n = counts.shape[0], x.shape[0]
    empty = active & (counts == 0)

    def reseed(args):
        sums, counts, _ = args
        _, far = jax.lax.top_k(jnp.where(v > 0, mind, -1.0), k)
        pick = far[jnp.clip(jnp.cumsum(empty) - 1, 0, k - 1)]
        points, old = x[pick] - mean, labels[pick]
        e = empty.astype(x.dtype)
        sums = sums.at[old].add(-points * e[:, None])
        counts = counts.at[old].add(-e)
        return (jnp.where(empty[:, None], points, sums), jnp.where(empty, 1.0, counts),
                jnp.where(empty, pick, n))

    none = jnp.full((k,), n, jnp.int32)
    return jax.lax.cond(jnp.any(empty), reseed, lambda a: a, (sums, counts, none))


def lloyd(data, centers, active, tol_abs, max_iter, layout):
    """Lloyd iterations until the summed squared center shift is <= tol_abs (scikit-learn's rule).

    Returns centered centers, labels [n_pad] and inertia of a final assignment pass, so the
    labels always belong to the returned centers, and the number of iterations.
    """
    x, x_sq, v, mean = data

    def body(state):
        it, old, _ = state
        sums, counts, _, labels, mind = assign(x, x_sq, v, mean, old, active, layout)
        sums, counts, _ = _reseed_empty(x, v, mean, labels, mind, sums, counts, active)
        new = jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1.0)[:, None], old)
        return it + 1, new, jnp.sum((new - old) ** 2)

    def cond(state):
        it, _, shift = state
        return (it < max_iter) & (shift > tol_abs)

    init = (jnp.zeros((), jnp.int32), centers, jnp.array(jnp.inf, x.dtype))
    n_iter, centers, _ = jax.lax.while_loop(cond, body, init)
    _, _, inertia, labels, _ = assign(x, x_sq, v, mean, centers, active, layout)
    return centers, labels, inertia, n_iter


# Rows read per block by the pruned Lloyd pass (a [block, d] gather, then [block, k] distances).
# On benchmarks/kmeans.py's 50,000 × 512 on a 2-core CPU, against blocks of 128 rows and two
# scatter-adds for the moved rows' sums (timed by hand, both in one process): k = 2 7.2 vs
# 9.2 ms per iteration, k = 8 10.0 vs 11.1 ms. Blocks of 512 and 1024 were no faster; nor were
# contiguous slabs of rows measured whole, which skip the gather but not the per-block cost.
PRUNE_BLOCK = 256


def _top2(d2):
    """Nearest index, smallest and second-smallest of squared distances d2 [..., k]."""
    label = jnp.argmin(d2, -1).astype(jnp.int32)
    second = jnp.min(jnp.where(jnp.arange(d2.shape[-1]) == label[..., None], jnp.inf, d2), -1)
    return label, jnp.min(d2, -1), second


def _compact(flags, size):
    """Indices of the True entries of flags [p] in order, then zeros up to `size` >= p: what
    jnp.nonzero(flags, size=size, fill_value=0)[0] gives, in half its time on a CPU (a cumsum
    and one scatter; 0.45 against 0.86 ms for p = 25,000 on a CPU)."""
    pos = jnp.where(flags, jnp.cumsum(flags, dtype=jnp.int32) - 1, size)
    rows = jnp.arange(flags.shape[0], dtype=jnp.int32)
    return jnp.zeros((size,), jnp.int32).at[pos].set(rows, mode="drop")


def _sweep(x, x_sq, v, mean, centers, active, labels, upper, lower, need, *, block, axis):
    """Exact nearest and second-nearest active center for the rows where `need` (this device's).

    Only those rows are read: their indices are compacted and handled `block` at a time, so a
    late Lloyd iteration in which few points can change cluster costs a few blocks instead of a
    pass over x. Returns the updated labels, upper (distance to the nearest center) and lower
    (to the second nearest), and the change of the centered per-cluster sums and counts caused
    by rows that changed cluster, summed over `axis` when run per device. Label k means "in no
    cluster yet" (a row moving from it leaves no cluster's sums).

    The sums are updated in a second pass over only the rows that moved: usually a small part
    of the rows measured, and their [block, k] · [block, d] product costs as much per row as
    the distances.
    """
    p, k = x.shape[0], centers.shape[0]
    size = -(-p // block) * block
    count = jnp.sum(need)
    idx = _compact(need, size)

    def measure(state):
        b, labels, upper, lower = state
        rows = jax.lax.dynamic_slice(idx, (b * block,), (block,))
        ok = b * block + jnp.arange(block) < count
        new, first, second = _top2(
            jnp.where(active, sqdist(x[rows], x_sq[rows], centers, mean), jnp.inf))
        at = jnp.where(ok, rows, p)  # out of range: dropped
        return (b + 1, labels.at[at].set(new, mode="drop"),
                upper.at[at].set(jnp.sqrt(first), mode="drop"),
                lower.at[at].set(jnp.sqrt(second), mode="drop"))

    old = labels
    _, labels, upper, lower = jax.lax.while_loop(
        lambda st: st[0] * block < count, measure, (jnp.zeros((), jnp.int32), old, upper, lower))

    moved = labels != old
    n_moved = jnp.sum(moved)
    midx = _compact(moved, size)
    lanes = jnp.arange(k)

    def accumulate(state):
        b, dsums, dcounts = state
        rows = jax.lax.dynamic_slice(midx, (b * block,), (block,))
        w = v[rows] * (b * block + jnp.arange(block) < n_moved)
        # +w into the new cluster, -w out of the old one, as one signed [block, k] matrix: one
        # small matmul instead of two scatter-adds.
        signed = w[:, None] * ((labels[rows][:, None] == lanes).astype(x.dtype)
                               - (old[rows][:, None] == lanes).astype(x.dtype))
        return b + 1, dsums + signed.T @ (x[rows] - mean), dcounts + jnp.sum(signed, 0)

    _, dsums, dcounts = jax.lax.while_loop(
        lambda st: st[0] * block < n_moved, accumulate,
        (jnp.zeros((), jnp.int32), jnp.zeros_like(centers), jnp.zeros((k,), x.dtype)))
    if axis is not None:
        dsums, dcounts = jax.lax.psum((dsums, dcounts), axis)
    return labels, upper, lower, dsums, dcounts


def sweeper(mesh, block):
    """`_sweep` over all rows: run on every device's rows (shard_map) when x is split by rows."""
    if mesh is None:
        return functools.partial(_sweep, block=block, axis=None)
    axis = mesh.axis_names[0]
    rows, rep = P(axis), P()
    return jax.shard_map(functools.partial(_sweep, block=block, axis=axis), mesh=mesh,
                         in_specs=(rows, rows, rows, rep, rep, rep, rows, rows, rows, rows),
                         out_specs=(rows, rows, rows, rep, rep), check_vma=False)


def lloyd_pruned(data, centers, active, tol_abs, max_iter, layout, mesh):
    """`lloyd` with Hamerly's bounds: the same iterations, reading only rows that may move.

    Every row keeps an upper bound u on its distance to its center and a lower bound l on its
    distance to any other center. After the centers move by shift_j, u grows by its center's
    shift and l shrinks by the largest shift of another center; a row can only change cluster
    if u > max(l, s_a), s_a half the distance from its center to the nearest other one (Hamerly,
    "Making k-means even faster", SDM 2010). Only those rows are re-measured (exactly), and the
    per-cluster sums are updated by the rows that moved instead of being summed again. On a CPU
    a Lloyd pass costs the distances of the rows it measures; late iterations, where few rows
    are near a boundary, then cost a fraction of a pass. Empty clusters are re-seeded as in
    `lloyd`.
    """
    x, x_sq, v, mean = data
    k = centers.shape[0]
    real = v > 0
    sweep = sweeper(mesh, PRUNE_BLOCK)
    slot = lambda labels: jnp.minimum(labels, k - 1)  # noqa: E731  label k: no cluster yet

    def half_gap(c):
        gap = jnp.sum((c[:, None] - c[None]) ** 2, -1)
        gap = jnp.where(active[None] & ~jnp.eye(k, dtype=bool), gap, jnp.inf)
        return 0.5 * jnp.sqrt(jnp.min(gap, -1))

    def body(state):
        it, old, labels, upper, lower, sums, counts, _ = state
        need = real & (upper > jnp.maximum(half_gap(old)[slot(labels)], lower))
        labels, upper, lower, ds, dc = sweep(x, x_sq, v, mean, old, active, labels, upper,
                                             lower, need)
        sums, counts = sums + ds, counts + dc

        def reseed(args):  # rare: exact distances of every row, then `_reseed_empty`'s rule
            labels, upper, lower, sums, counts = args
            labels, upper, lower, ds, dc = sweep(x, x_sq, v, mean, old, active, labels, upper,
                                                 lower, real)
            sums, counts, pick = _reseed_empty(x, v, mean, labels, upper ** 2, sums + ds,
                                               counts + dc, active)
            return (labels.at[pick].set(jnp.arange(k, dtype=jnp.int32), mode="drop"),
                    upper.at[pick].set(0.0, mode="drop"), lower.at[pick].set(0.0, mode="drop"),
                    sums, counts)

        labels, upper, lower, sums, counts = jax.lax.cond(
            jnp.any(active & (counts == 0)), reseed, lambda a: a,
            (labels, upper, lower, sums, counts))
        new = jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1.0)[:, None], old)
        shift = jnp.sqrt(jnp.sum((new - old) ** 2, -1))
        top = jnp.argmax(shift)
        others = jnp.where(jnp.arange(k) == top, 0.0, shift).max()  # largest but the top one
        upper = upper + shift[slot(labels)]
        lower = lower - jnp.where(labels == top, others, shift[top])
        return it + 1, new, labels, upper, lower, sums, counts, jnp.sum(shift ** 2)

    def cond(state):
        return (state[0] < max_iter) & (state[-1] > tol_abs)

    n = x.shape[0]
    init = (jnp.zeros((), jnp.int32), centers, jnp.full((n,), k, jnp.int32),
            jnp.where(real, jnp.inf, 0.0).astype(x.dtype),
            jnp.where(real, 0.0, jnp.inf).astype(x.dtype), jnp.zeros_like(centers),
            jnp.zeros((k,), x.dtype), jnp.array(jnp.inf, x.dtype))
    state = jax.lax.while_loop(cond, body, init)
    n_iter, centers = state[0], state[1]
    _, _, inertia, labels, _ = assign(x, x_sq, v, mean, centers, active, layout)
    return centers, labels, inertia, n_iter


def lloyd_for(vectorize, mesh):
    """Plain Lloyd passes when vmapped (accelerators: lockstep, every row every time), else the
    pruned ones (CPU: one fit at a time, bound by reading x)."""
    if vectorize:
        return lloyd
    return functools.partial(lloyd_pruned, mesh=mesh)
