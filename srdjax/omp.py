"""Batched Orthogonal Matching Pursuit (Batch-OMP) on device.

Conventions follow `sklearn.decomposition.sparse_encode(X=signals, dictionary=dictionary,
algorithm="omp", n_nonzero_coefs=sparsity)`: atoms are the rows of `dictionary`, codes are
[n_signals, n_atoms] and `codes @ dictionary` approximates `signals`.

The algorithm is sklearn's `_gram_omp` (Rubinstein, Zibulevsky & Elad's Batch-OMP) run for a whole
chunk of signals at once: it works only from the Gram matrix G = D Dᵀ and the correlations D x, and
grows the Cholesky factor of the selected atoms' Gram block one row per step. We carry the *inverse*
of that factor (it grows the same way, one row per step), so every per-step solve is a matrix-vector
product instead of a sequential triangular solve; in exact arithmetic the codes are identical.

sklearn's early stops are reproduced, per signal:
- the best remaining correlation has squared value < machine eps (e.g. an all-zero signal, or an
  exactly represented one) — no atom is added;
- the best atom is one already selected;
- the new atom is linearly dependent on the selected ones (Cholesky pivot <= eps);
- with `tol`: the residual's squared norm fell to <= tol after adding an atom.
sklearn warns "ended prematurely due to linear dependence" in the first three cases; we stop
silently (a warning per signal inside `jit` is not possible) and leave the unused slots empty.
The eps thresholds are absolute, as in sklearn (float32: correlations below ~3.5e-4 stop a
signal), so signals should not be scaled far below unit size. Ties go to the lowest atom index.
sklearn breaks them in its internally swapped atom order, but between exact duplicate atoms its
correlations differ in the last bit depending on BLAS, so which copy it picks is not
reproducible anyway; the reconstruction is the same either way.

Memory per chunk is about chunk_size · sparsity · n_atoms floats (the Gram rows of the support).
Chunk sizes default by platform: a CPU core's cache wants small chunks, a GPU or TPU as few
passes of the loop over chunks as memory allows (`default_chunk`).

Every product (correlations, Gram matrices, the factor updates) runs at full float32 precision
(`Precision.HIGHEST`): on a GPU, JAX's default for float32 products uses TF32 (10-bit mantissa),
with which OMP picked a different atom than scikit-learn for 0.5% of CIFAR patches on an H200
(benchmarks/results/h200/omp.json). On a CPU it changes nothing.
"""
from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np

from srdjax import parallel
from srdjax.checks import check, check_finite, is_concrete

DEFAULT_CHUNK = 1024           # signals per chunk on a CPU
ACCELERATOR_CHUNK = 32768     # on a GPU or TPU: 0.3 GB of state at 256 atoms, sparsity 8
PER_DICTIONARY_BLOCK = 128    # omp_support_per_dictionary's block on a CPU (see there)
HIGHEST = jax.lax.Precision.HIGHEST


def default_chunk(chunk: int | None = None, *, cpu: int = DEFAULT_CHUNK) -> int:
    """`chunk` if given, else the signals coded together by default: `cpu` on a CPU,
    ACCELERATOR_CHUNK on a GPU or TPU."""
    if chunk is not None:
        return chunk
    return ACCELERATOR_CHUNK if parallel.on_accelerator() else cpu


def gram_of(dictionaries):
    """Gram matrices D Dᵀ of one dictionary [A, dim] or a stack [K, A, dim], at full precision."""
    return jnp.einsum("...ad,...bd->...ab", dictionaries, dictionaries, precision=HIGHEST)


# Width of the column groups `_first_argmax` reduces across first (see there).
ARGMAX_GROUP = 32


def _first_argmax(values):
    """(index of the first maximum along axis 1, the maximum): np.argmax's tie rule.

    XLA's CPU argmax is a slow variadic reduce; two plain reductions (the max, then the lowest
    index holding it) are several times faster. Each is done in two levels: [B, A] is seen as
    [B, A / 32, 32] and reduced across the groups first, which XLA's CPU backend vectorizes,
    then across the 32 lanes: OMP in purify's blocks of 128 signals, 256 atoms, 1.11x faster
    than one reduction along each row (`benchmarks/omp.py --argmax-ab --chunk 128`)."""
    b, a = values.shape
    g = ARGMAX_GROUP if a % ARGMAX_GROUP == 0 and a > ARGMAX_GROUP else a
    grouped = values.reshape(b, a // g, g)
    top = jnp.max(jnp.max(grouped, axis=1), axis=1)
    lanes = jnp.arange(a, dtype=jnp.int32).reshape(1, a // g, g)
    first = jnp.min(jnp.where(grouped == top[:, None, None], lanes, a), axis=1)
    return jnp.min(first, axis=1), top


def _pick(values, index):
    """values[b, index[b]] for every row b."""
    return jnp.take_along_axis(values, index[:, None], axis=1)[:, 0]


def _batch_omp(gram, xy, xnorm2, tol, *, sparsity: int, use_tol: bool, gram_index=None):
    """One chunk: gram [n_atoms, n_atoms], xy [B, n_atoms] = signals @ Dᵀ, xnorm2 [B].

    With `gram_index` [B], gram is a stack [K, n_atoms, n_atoms] and signal b uses
    gram[gram_index[b]] (signals of several dictionaries coded together).
    Returns support [B, sparsity] (int32, -1 where unused) and values [B, sparsity].

    The steps are unrolled at trace time (sparsity is a few to a few dozen) and the state grows
    by one slot per step, so step t works on t selected atoms, not on `sparsity` zero-padded
    slots: about half the work of a fixed-shape loop, and XLA's CPU backend runs loop bodies
    several times slower than straight-line code (see `parallel.fori_loop`).
    """
    batch, _ = xy.shape
    dtype = xy.dtype
    eps = jnp.finfo(dtype).eps
    n_atoms = gram.shape[-1]
    if gram_index is not None:   # one stacked table, so every lookup is a row gather
        gram = gram.reshape(-1, n_atoms)
    support = jnp.zeros((batch, 0), jnp.int32)
    gsel = []                                    # Gram rows of the selected atoms, [B, n_atoms]
    linv = jnp.zeros((batch, 0, 0), dtype)       # L⁻¹, L the Cholesky factor of G_SS
    z = jnp.zeros((batch, 0), dtype)             # L⁻¹ D_S x
    gamma = xy_s = z
    done = jnp.zeros((batch,), bool)
    for t in range(sparsity):
        # Correlations of every atom with the current residual, α = D x − G_S γ.
        alpha = xy
        for j in range(t):
            alpha = alpha - gamma[:, j, None] * gsel[j]
        atom, a_max = _first_argmax(jnp.abs(alpha))
        # Row lookups indexed per signal (not by arange(B)), which GSPMD keeps on the device
        # that holds the signal when a jitted caller shards the batch.
        g = gram[atom if gram_index is None else gram_index * n_atoms + atom]  # [B, n_atoms]
        stop = a_max * a_max < eps
        pivot = _pick(g, atom)
        if t:
            c = jnp.take_along_axis(g, jnp.maximum(support, 0), axis=1)  # G_S,new
            w = jnp.einsum("bij,bj->bi", linv, c, precision=HIGHEST)
            pivot = pivot - jnp.sum(w * w, axis=1)
            reselected = jnp.any(support == atom[:, None], axis=1)
            stop = stop | reselected | (pivot <= eps)
        active = ~(done | stop)
        d = jnp.sqrt(jnp.where(active, pivot, 1.0))
        # New last row of L⁻¹ for L_new = [[L, 0], [wᵀ, d]]: [-wᵀ L⁻¹, 1] / d.
        new_row = jnp.ones((batch, 1), dtype)
        if t:
            new_row = jnp.concatenate([-jnp.einsum("bi,bij->bj", w, linv, precision=HIGHEST),
                                       new_row], axis=1)
        new_row = jnp.where(active[:, None], new_row / d[:, None], 0.0)
        linv = jnp.concatenate([jnp.pad(linv, ((0, 0), (0, 0), (0, 1))), new_row[:, None]], 1)
        xy_s = jnp.concatenate([xy_s, jnp.where(active, _pick(xy, atom), 0.0)[:, None]], axis=1)
        z = jnp.concatenate([z, jnp.sum(new_row * xy_s, axis=1)[:, None]], axis=1)
        gamma = jnp.einsum("bij,bi->bj", linv, z, precision=HIGHEST)  # (L Lᵀ)⁻¹ D_S x = L⁻ᵀ z
        gsel.append(jnp.where(active[:, None], g, 0.0))
        support = jnp.concatenate([support, jnp.where(active, atom, -1)[:, None]], axis=1)
        done = done | stop
        if use_tol:
            # ‖x − D_Sᵀγ‖² = ‖x‖² − x·D_Sᵀγ = ‖x‖² − ‖z‖², as sklearn's running tol_curr.
            residual2 = xnorm2 - jnp.sum(z * z, axis=1)
            done = done | (active & (jnp.abs(residual2) <= tol))
    return support, jnp.where(support >= 0, gamma, 0.0)


def omp_support_per_dictionary(dictionaries, grams, index, signals, *, sparsity: int,
                               block: int | None = None):
    """Supports and values [N, P, sparsity] of N groups of P signals [N, P, dim], group i coded
    with dictionaries[index[i]] (grams: their Gram matrices); jittable, no checks.

    The correlations are one batched matmul per group; the greedy steps then run over blocks of
    `block` signals drawn across groups, each with its own Gram matrix. Blocks of a few hundred
    keep the per-step working set (block · sparsity · n_atoms floats of selected Gram rows) in a
    CPU core's cache: coding all of an image batch's patches at once streamed it from memory
    every step, about 3x slower. So `block` defaults to PER_DICTIONARY_BLOCK on a CPU; on a GPU
    or TPU, where each block is a pass of a loop of small kernels, to ACCELERATOR_CHUNK."""
    n, p, dim = signals.shape
    block = default_chunk(block, cpu=PER_DICTIONARY_BLOCK)
    xy = jnp.einsum("npd,nad->npa", signals, dictionaries[index], precision=HIGHEST)  # [N, P, A]
    gram = grams.astype(signals.dtype)
    tol = jnp.zeros((), signals.dtype)

    def code(xyb, normb, idxb):
        return _batch_omp(gram, xyb, normb, tol, sparsity=sparsity, use_tol=False,
                          gram_index=idxb)

    support, values = parallel.chunked_map(
        code, block, xy.reshape(n * p, -1), jnp.sum(signals * signals, axis=-1).reshape(n * p),
        jnp.repeat(index, p))
    return support.reshape(n, p, sparsity), values.reshape(n, p, sparsity)


@functools.partial(jax.jit, static_argnames=("sparsity", "use_tol", "chunk_size"))
def omp_support_unchecked(dictionary, signals, gram, tol, *, sparsity: int, use_tol: bool,
                          chunk_size: int):
    """`omp_support` without the input checks (for callers that checked already, or inside jit);
    `tol` is ignored unless use_tol."""
    n, dim = signals.shape
    dtype = signals.dtype
    gram = gram.astype(dtype)
    tol = jnp.asarray(tol, dtype)

    def code(chunk):
        xy = jnp.matmul(chunk, dictionary.T, precision=HIGHEST)
        return _batch_omp(gram, xy, jnp.sum(chunk * chunk, axis=1), tol,
                          sparsity=sparsity, use_tol=use_tol)

    return parallel.chunked_map(code, chunk_size, signals)


def check_inputs(dictionary, signals, sparsity, gram=None, tol=None):
    """Shape, dtype and (on concrete arrays) value checks of OMP's inputs; returns the dtype."""
    d_shape, x_shape = jnp.shape(dictionary), jnp.shape(signals)
    check(len(d_shape) == 2, f"dictionary must be [n_atoms, dim], got shape {tuple(d_shape)}")
    check(len(x_shape) == 2, f"signals must be [n_signals, dim], got shape {tuple(x_shape)}")
    n_atoms, dim = d_shape
    check(x_shape[1] == dim,
          f"signals have dim {x_shape[1]} but dictionary atoms have dim {dim} (atoms are rows)")
    check(isinstance(sparsity, (int, np.integer)) and 1 <= sparsity <= min(dim, n_atoms),
          f"sparsity must be an integer in [1, {min(dim, n_atoms)}] (min of dim and n_atoms), "
          f"got {sparsity!r}")
    dtype = jnp.result_type(dictionary, signals)
    check(jnp.issubdtype(dtype, jnp.floating),
          f"dictionary and signals must be floating point, got dtype {dtype}")
    if gram is not None:
        check(jnp.shape(gram) == (n_atoms, n_atoms),
              f"gram must be [{n_atoms}, {n_atoms}] (dictionary @ dictionary.T), "
              f"got shape {tuple(jnp.shape(gram))}")
    if tol is not None and is_concrete(tol):
        check(float(tol) >= 0, f"tol must be >= 0 (a squared residual norm), got {tol}")
    check_finite(signals, "signals")
    check_finite(dictionary, "dictionary")
    if is_concrete(dictionary) and n_atoms:
        norms = np.linalg.norm(np.asarray(dictionary, np.float64), axis=1)
        zero = np.flatnonzero(norms == 0)
        check(zero.size == 0, f"dictionary atoms must have nonzero norm; atoms {zero[:8].tolist()}"
                              f" are zero")
    return dtype


def omp_support(dictionary, signals, sparsity: int, *, gram=None, tol=None,
                chunk_size: int | None = None):
    """Sparse codes in compact form: (support [n, sparsity] int32, -1 where unused; values).

    With `tol`, a signal stops as soon as its residual's squared norm is <= tol, and at `sparsity`
    atoms at the latest (sklearn's tol mode has no cap: pass sparsity = min(dim, n_atoms) to match
    it). Signals are coded `chunk_size` at a time, so working memory is bounded by the chunk, not
    by n; the compact output is n · sparsity values (dense `omp` codes are n · n_atoms).
    chunk_size defaults to `default_chunk()` (by platform).
    """
    dtype = check_inputs(dictionary, signals, sparsity, gram, tol)
    dictionary = jnp.asarray(dictionary, dtype)
    signals = jnp.asarray(signals, dtype)
    if gram is None:
        gram = gram_of(dictionary)
    chunk_size = default_chunk(chunk_size)
    check(chunk_size >= 1, f"chunk_size must be >= 1, got {chunk_size}")
    return omp_support_unchecked(dictionary, signals, gram, 0.0 if tol is None else tol,
                                 sparsity=int(sparsity), use_tol=tol is not None,
                                 chunk_size=int(chunk_size))


@functools.partial(jax.jit, static_argnames=("n_atoms",))
def codes_from_support(support, values, n_atoms: int):
    """Dense codes [n, n_atoms] from the compact (support, values) form."""
    chex.assert_equal_shape([support, values])
    # Each slot's value placed by comparing its atom with every atom index (empty slots, -1,
    # match none): elementwise, so a row-sharded batch stays where it is. A scatter-add into
    # zeros was 3x slower on a CPU, and over two devices XLA summed the dense codes across them.
    atoms = jnp.arange(n_atoms, dtype=support.dtype)[None, :]
    dense = jnp.zeros((support.shape[0], n_atoms), values.dtype)
    for j in range(support.shape[1]):
        dense = dense + jnp.where(atoms == support[:, j, None], values[:, j, None], 0)
    return dense


def omp(dictionary, signals, sparsity: int, *, gram=None, tol=None,
        chunk_size: int | None = None):
    """Codes [n, n_atoms] with codes @ dictionary ≈ signals, as sklearn's sparse_encode(omp)."""
    support, values = omp_support(dictionary, signals, sparsity, gram=gram, tol=tol,
                                  chunk_size=chunk_size)
    return codes_from_support(support, values, jnp.shape(dictionary)[0])


@jax.jit
def reconstruct_signals(dictionary, support, values):
    """codes @ dictionary from the compact form, without building dense codes."""
    chex.assert_equal_shape([support, values])
    values = jnp.where(support >= 0, values, 0.0)
    index = jnp.maximum(support, 0)
    # One gathered atom per slot, summed as they come: XLA fuses the gathers into the sum, where
    # gathering all [n, k, dim] atoms first and contracting them was 30x slower on a CPU.
    out = values[:, 0, None] * dictionary[index[:, 0]]
    for j in range(1, support.shape[1]):
        out = out + values[:, j, None] * dictionary[index[:, j]]
    return out


@jax.jit
def least_squares_on_support(dictionary, signals, support):
    """Least-squares values on a fixed support: argmin_v ‖x − Σ_j v_j D[s_j]‖² per signal.

    support [n, k] int (-1 = unused slot), as returned by `omp_support`; returns values [n, k].
    Differentiable in `dictionary` and `signals`: with OMP's support held fixed this is exactly
    OMP's output, so it is the exact-gradient part of a BPDA attack on sparse coding. (Support as
    indices rather than a mask: a mask over all atoms would need an n_atoms² solve per signal.)
    """
    chex.assert_rank([dictionary, signals, support], [2, 2, 2])
    used = support >= 0
    atoms = jnp.take(dictionary, jnp.maximum(support, 0), axis=0)
    atoms = jnp.where(used[:, :, None], atoms, 0.0)                     # [n, k, dim]
    gram = jnp.einsum("nid,njd->nij", atoms, atoms, precision=HIGHEST)
    # Unused slots get an identity row/column so the system stays nonsingular and their value is 0.
    k = support.shape[1]
    gram = gram + jnp.eye(k, dtype=gram.dtype) * (~used)[:, None, :]
    rhs = jnp.einsum("nkd,nd->nk", atoms, signals, precision=HIGHEST)
    return spd_solve(gram, rhs)


def spd_solve(a, b):
    """x with a @ x = b for a batch of small symmetric positive-definite systems, a [n, k, k],
    b [n, k]: Cholesky and two triangular solves written out over the k (≤ a few dozen) entries,
    in elementwise ops only, differentiable by JAX.

    Not `jnp.linalg.solve`: on a CPU it calls LAPACK, whose batched kernel waits on XLA's
    intra-op thread pool from inside that pool; when two host devices run it at once (an attack
    step over a batch split across 2 devices on 2 cores) every pool thread waits and the
    program deadlocks. On accelerators these few-dozen-flop systems cost nothing either way."""
    chex.assert_rank([a, b], [3, 2])
    k = a.shape[-1]
    chol = [[None] * k for _ in range(k)]               # chol[i][j], j <= i: arrays [n]
    for j in range(k):
        diag = a[:, j, j] - sum((chol[j][m] ** 2 for m in range(j)), jnp.zeros_like(a[:, 0, 0]))
        chol[j][j] = jnp.sqrt(jnp.maximum(diag, jnp.finfo(a.dtype).tiny))
        for i in range(j + 1, k):
            off = a[:, i, j] - sum((chol[i][m] * chol[j][m] for m in range(j)),
                                   jnp.zeros_like(a[:, 0, 0]))
            chol[i][j] = off / chol[j][j]
    y = []
    for i in range(k):                                   # L y = b
        y.append((b[:, i] - sum((chol[i][m] * y[m] for m in range(i)),
                                jnp.zeros_like(b[:, 0]))) / chol[i][i])
    x = [None] * k
    for i in reversed(range(k)):                         # L^T x = y
        x[i] = (y[i] - sum((chol[m][i] * x[m] for m in range(i + 1, k)),
                           jnp.zeros_like(b[:, 0]))) / chol[i][i]
    return jnp.stack(x, axis=-1)
