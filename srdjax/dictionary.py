"""Semantic reconstruction dictionaries: one dictionary of unit-norm atoms per cluster, learned
from the high-frequency patches of `srdjax.patches`; the
re-synthesis of images from them is `srdjax.resynthesis`.

Dictionary learning alternates batched OMP (`srdjax.omp`) with an atom update:
- "ksvd": approximate K-SVD (Rubinstein, Zibulevsky & Elad 2008): for each atom in turn, one
  power-iteration step of the rank-1 fit of the residual restricted to the signals using it;
  atom and those signals' coefficients are replaced together, which never increases the error.
- "mod": method of optimal directions, D = (AᵀA + ρI)⁻¹ AᵀX, then atoms renormalised.
Atoms are kept unit-norm. An atom no signal uses after coding, or one nearly repeating an earlier
atom (|cos| > 0.99, as K-SVD does), is re-seeded with one of the worst represented signals
(normalised), a different signal per re-seeded atom.
"""
from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from srdjax import omp as omp_lib
from srdjax import parallel
from srdjax.checks import check, check_finite
from srdjax.patches import _grid, extract_patches

METHODS = ("ksvd", "mod")


def _unit_rows(x, key):
    """Rows scaled to unit norm; zero rows replaced by random unit vectors."""
    norms = jnp.linalg.norm(x, axis=1, keepdims=True)
    noise = jax.random.normal(key, x.shape, x.dtype)
    noise = noise / jnp.linalg.norm(noise, axis=1, keepdims=True)
    return jnp.where(norms > 1e-12, x / jnp.maximum(norms, 1e-12), noise)


@functools.partial(jax.jit, static_argnames=("cap",))
def _ksvd_update(dictionary, signals, support, values, *, cap: int):
    """One approximate K-SVD sweep over the atoms; returns (dictionary, residual).

    `cap` (static) bounds how many signals use one atom, so each atom costs O(cap · dim) rather
    than O(n_signals · dim).
    """
    m, k = support.shape
    n_atoms = dictionary.shape[0]
    residual = signals - omp_lib.reconstruct_signals(dictionary, support, values)
    # A dummy row m absorbs the writes of unused lanes, so no real row is written twice.
    residual = jnp.concatenate([residual, jnp.zeros_like(residual[:1])])
    values = jnp.concatenate([jnp.where(support >= 0, values, 0.0), jnp.zeros_like(values[:1])])
    # Group the (signal, slot) entries by atom once; atom j's users are order[start_j:][:count_j].
    flat = jnp.where(support >= 0, support, n_atoms).reshape(-1)
    order = jnp.argsort(flat, stable=True)
    counts = jnp.bincount(flat, length=n_atoms + 1)[:n_atoms]
    starts = jnp.cumsum(counts) - counts
    order = jnp.concatenate([order, jnp.zeros(cap, order.dtype)])
    lanes = jnp.arange(cap)

    def update_atom(j, state):
        dictionary, residual, values = state
        entries = jax.lax.dynamic_slice(order, (starts[j],), (cap,))
        used = lanes < counts[j]
        rows, slots = jnp.where(used, entries // k, m), entries % k
        g = values[rows, slots]
        atom = dictionary[j]
        local = residual[rows] + g[:, None] * atom[None, :]           # error without atom j
        d = local.T @ g
        norm = jnp.linalg.norm(d)
        alive = norm > 0
        d = jnp.where(alive, d / jnp.where(alive, norm, 1.0), atom)
        g = jnp.where(alive & used, local @ d, g)
        residual = residual.at[rows].set(local - g[:, None] * d[None, :]).at[m].set(0.0)
        values = values.at[rows, slots].set(g).at[m].set(0.0)
        return dictionary.at[j].set(d), residual, values

    dictionary, residual, _ = jax.lax.fori_loop(
        0, n_atoms, update_atom, (dictionary, residual, values))
    return dictionary, residual[:m]


@jax.jit
def _mod_update(dictionary, signals, support, values):
    """Method of optimal directions; returns (dictionary, residual) before renormalisation."""
    n_atoms = dictionary.shape[0]
    codes = omp_lib.codes_from_support(support, values, n_atoms)
    ata = codes.T @ codes
    # A small ridge keeps unused atoms (zero rows and columns of AᵀA) solvable: they come out 0
    # and are re-seeded below.
    ridge = 1e-6 * jnp.trace(ata) / n_atoms + jnp.finfo(ata.dtype).tiny
    new = jnp.linalg.solve(ata + ridge * jnp.eye(n_atoms, dtype=ata.dtype), codes.T @ signals)
    return new, signals - codes @ new


@jax.jit
def _reseed(key, dictionary, signals, residual, counts):
    """Unit-normalise atoms; each unused or repeated atom takes a different worst-represented
    signal."""
    n_atoms = dictionary.shape[0]
    dictionary = _unit_rows(dictionary, key)
    # As in K-SVD, an atom nearly repeating an earlier one is wasted: re-seed it too.
    cos = jnp.abs(dictionary @ dictionary.T)
    repeat = jnp.any(jnp.tril(cos > 0.99, k=-1), axis=1)
    dead = (counts == 0) | repeat
    n_worst = min(n_atoms, signals.shape[0])
    _, worst = jax.lax.top_k(jnp.sum(residual * residual, axis=1), n_worst)
    rank = jnp.cumsum(dead) - 1
    seeds = signals[worst[jnp.clip(rank, 0, n_worst - 1)]]
    # More dead atoms than signals (tiny clusters): the rest become random unit atoms.
    seeds = jnp.where((rank < n_worst)[:, None], seeds, 0.0)
    fresh = _unit_rows(seeds, key)
    return jnp.where(dead[:, None], fresh, dictionary)


@jax.jit
def _relative_error(dictionary, signals, support, values):
    residual = signals - omp_lib.reconstruct_signals(dictionary, support, values)
    return jnp.sum(residual * residual) / jnp.maximum(jnp.sum(signals * signals), 1e-30)


def initial_dictionary(key, patches, n_atoms: int, *, n_valid: int | None = None):
    """n_atoms distinct random patches, unit-normalised; random unit atoms where patches run out
    (fewer patches than atoms) or a patch is all zero. Only the first n_valid patches (default:
    all) are drawn from, so zero padding after them leaves the result unchanged."""
    m = patches.shape[0] if n_valid is None else int(n_valid)
    pick_key, noise_key = jax.random.split(key)
    take = min(m, n_atoms)
    pick = _distinct_rows(pick_key, m, take) if take else jnp.zeros((0,), jnp.int32)
    return _rows_to_atoms(noise_key, patches, pick, n_atoms)


@functools.partial(jax.jit, static_argnames=("m", "take"))
def _distinct_rows(key, m: int, take: int):
    return jax.random.choice(key, m, (take,), replace=False)


@functools.partial(jax.jit, static_argnames=("n_atoms",))
def _rows_to_atoms(key, patches, pick, n_atoms: int):
    """patches[pick] as the first atoms, unit-normalised; the rest random unit atoms. Only this
    part sees the (padded) patches, so it compiles once per padded size, not per cluster."""
    rows = jnp.zeros((n_atoms, patches.shape[1]), patches.dtype)
    if pick.shape[0]:
        rows = rows.at[:pick.shape[0]].set(patches[pick])
    return _unit_rows(rows, key)


def _coder(patches, sparsity, chunk_size, mesh):
    """dictionary -> OMP (support, values) of the patches; with a mesh of several devices the
    patches are split over its devices (every process's, each passing the same patches), and
    the codes come back to every process."""
    chunk_size = omp_lib.default_chunk(chunk_size)
    if mesh is None or mesh.size == 1:
        return lambda d: omp_lib.omp_support(d, patches, sparsity, chunk_size=chunk_size)
    m = patches.shape[0]
    padded, _ = parallel.pad_to_multiple(np.asarray(patches), mesh.size)
    split = parallel.shard_global(mesh, padded)
    chunk = -(-chunk_size // mesh.size) * mesh.size  # every chunk spans all devices evenly

    def code(dictionary):
        support, values = omp_lib.omp_support(parallel.replicate(mesh, np.asarray(dictionary)),
                                              split, sparsity, chunk_size=chunk)
        return (jnp.asarray(parallel.to_host(support)[:m]),
                jnp.asarray(parallel.to_host(values)[:m]))

    return code


def learn_dictionary(key, patches, n_atoms: int = 256, sparsity: int = 8, n_iter: int = 10, *,
                     method: str = "ksvd", chunk_size: int | None = None,
                     mesh=None, n_valid: int | None = None):
    """Learn unit-norm atoms [n_atoms, dim] for patches [m, dim] by OMP + K-SVD/MOD alternation.

    Returns (dictionary, history): history[i] is the relative error ‖X − A D‖²_F / ‖X‖²_F of the
    OMP codes with the dictionary of iteration i (history[0]: the initial dictionary,
    history[-1]: the returned one), length n_iter + 1. The iteration loop runs on the host (each
    step jitted), because the K-SVD sweep is compiled for the largest per-atom usage it meets.
    The error is not guaranteed to fall every iteration (OMP is greedy, and a re-seeded repeated
    atom loses its signals until they are re-coded), but on real patches it does (tested).

    mesh: OMP coding, the bulk of the work, runs with the patches split over the mesh's devices
    (all processes' in a multi-process run, where every process passes the same patches and
    gets the same dictionary); the dictionary update, a sequential sweep over the atoms, runs on
    every process from the gathered codes.

    n_valid: only the first n_valid patches are real and the rest are all zero (padding). The
    result is the same as for patches[:n_valid], with programs compiled for the padded shape:
    `learn_cluster_dictionaries` pads clusters of different sizes to a few shapes this way.
    """
    check(method in METHODS, f"method must be one of {METHODS}, got {method!r}")
    chex.assert_rank(patches, 2)
    check(patches.shape[0] >= 1, "patches must hold at least one patch, got 0")
    check(isinstance(n_atoms, (int, np.integer)) and n_atoms >= 1,
          f"n_atoms must be a positive integer, got {n_atoms!r}")
    check(isinstance(n_iter, (int, np.integer)) and n_iter >= 0,
          f"n_iter must be a non-negative integer, got {n_iter!r}")
    check_finite(patches, "patches")
    patches = jnp.asarray(patches)
    check(jnp.issubdtype(patches.dtype, jnp.floating),
          f"patches must be floating point, got dtype {patches.dtype}")
    n_valid = patches.shape[0] if n_valid is None else n_valid
    check(isinstance(n_valid, (int, np.integer)) and 1 <= n_valid <= patches.shape[0],
          f"n_valid must be an integer in [1, {patches.shape[0]}], got {n_valid!r}")
    init_key, loop_key = jax.random.split(key)
    dictionary = initial_dictionary(init_key, patches, n_atoms, n_valid=n_valid)
    code = _coder(patches, sparsity, chunk_size, mesh)
    history = []
    for it in range(n_iter + 1):
        support, values = code(dictionary)
        history.append(float(_relative_error(dictionary, patches, support, values)))
        if it == n_iter:
            break
        counts = np.bincount(np.asarray(support).ravel() + 1, minlength=n_atoms + 1)[1:]
        if method == "ksvd":
            cap = 1 << int(max(counts.max(), 1) - 1).bit_length()    # power of two: few compiles
            dictionary, residual = _ksvd_update(dictionary, patches, support, values,
                                                cap=min(cap, patches.shape[0]))
        else:
            dictionary, residual = _mod_update(dictionary, patches, support, values)
        dictionary = _reseed(jax.random.fold_in(loop_key, it), dictionary, patches, residual,
                             jnp.asarray(counts))
    return dictionary, np.asarray(history)


def sample_patches(key, images, n_patches: int, patch_size: int = 8, stride: int = 1):
    """n_patches distinct patches [n, p·p·C] drawn uniformly from all patches of images, without
    extracting them all (all of them, in order, when there are no more than n_patches)."""
    chex.assert_rank(images, 4)
    rows, cols = _grid(images.shape[1], images.shape[2], patch_size, stride)
    if images.shape[0] * rows * cols <= n_patches:
        return extract_patches(images, patch_size, stride).reshape(-1, patch_size * patch_size *
                                                                   images.shape[3])
    return _sample_patches(key, jnp.asarray(images), int(n_patches), int(patch_size),
                           int(stride))


@functools.partial(jax.jit, static_argnames=("n_patches", "patch_size", "stride"))
def _sample_patches(key, images, n_patches: int, patch_size: int, stride: int):
    n, height, width, channels = images.shape
    rows, cols = _grid(height, width, patch_size, stride)
    flat = jax.random.choice(key, n * rows * cols, (n_patches,), replace=False)
    image, position = flat // (rows * cols), flat % (rows * cols)
    top, left = (position // cols) * stride, (position % cols) * stride

    def one(i, y, x):
        return jax.lax.dynamic_slice(images[i], (y, x, 0), (patch_size, patch_size, channels))

    return jax.vmap(one)(image, top, left).reshape(n_patches, -1)


# Clusters' patch sets are zero-padded to a few sizes, so the dictionary steps compile a few
# times per run, not once per cluster: every set up to this many patches, and the largest set,
# share one size; sets between are padded to the next power of two (at most 2x the work). In
# the smoke config's 10 clusters of 49-980 patches, per-cluster compiles took 33 of the 95 s
# of a run on a 2-core CPU (counted with jax_log_compiles).
PAD_FLOOR = 4096


def _padded_size(m: int, largest: int) -> int:
    return int(min(largest, max(PAD_FLOOR, 1 << (int(m) - 1).bit_length())))


def learn_cluster_dictionaries(key, high_images, cluster_ids, n_clusters: int, *,
                               patch_size: int = 8, stride: int = 1, n_atoms: int = 256,
                               sparsity: int = 8, n_iter: int = 10,
                               max_patches_per_cluster: int = 20_000, method: str = "ksvd",
                               progress: bool = True, mesh=None):
    """One dictionary per cluster from the high-frequency patches of its images.

    high_images [N, H, W, C] (high-frequency parts: values outside [0, 1] are expected),
    cluster_ids [N] in [0, n_clusters). Each cluster's patches are subsampled to at most
    max_patches_per_cluster with a key folded from `key` and the cluster index. A cluster with
    fewer patches than atoms still gets n_atoms unit atoms: the patches it has, the rest random
    (and then re-seeded from its worst-represented patches); a cluster with no image at all gets
    random unit atoms. Returns (dictionaries [K, n_atoms, p·p·C], histories: list of K arrays).
    mesh: OMP coding split over its devices, as in `learn_dictionary`.
    """
    chex.assert_rank(high_images, 4)
    check_finite(high_images, "high_images")
    check(isinstance(n_clusters, (int, np.integer)) and n_clusters >= 1,
          f"n_clusters must be a positive integer, got {n_clusters!r}")
    ids = np.asarray(cluster_ids)
    check(ids.shape == (high_images.shape[0],),
          f"cluster_ids must have shape [{high_images.shape[0]}], got {ids.shape}")
    check(np.issubdtype(ids.dtype, np.integer) and (ids.size == 0 or
                                                    (ids.min() >= 0 and ids.max() < n_clusters)),
          f"cluster_ids must be integers in [0, {n_clusters - 1}]")
    rows, cols = _grid(high_images.shape[1], high_images.shape[2], patch_size, stride)
    dim = patch_size * patch_size * high_images.shape[3]
    sizes = np.minimum(np.bincount(ids, minlength=n_clusters) * rows * cols,
                       max_patches_per_cluster)
    dictionaries, histories = [], []
    for cluster in tqdm(range(n_clusters), desc="dictionaries", unit="cluster", leave=False,
                        disable=not progress or jax.process_index() != 0):
        cluster_key = jax.random.fold_in(key, cluster)
        members = np.flatnonzero(ids == cluster)
        if members.size == 0:
            empty = jnp.zeros((0, dim), high_images.dtype)
            dictionaries.append(initial_dictionary(cluster_key, empty, n_atoms))
            histories.append(np.zeros(0))
            continue
        sample_key, learn_key = jax.random.split(cluster_key)
        patches = sample_patches(sample_key, high_images[members],
                                 max_patches_per_cluster, patch_size, stride)
        m = patches.shape[0]
        patches = jnp.pad(patches, ((0, _padded_size(m, sizes.max()) - m), (0, 0)))
        dictionary, history = learn_dictionary(learn_key, patches, n_atoms, sparsity, n_iter,
                                               method=method, mesh=mesh, n_valid=m)
        dictionaries.append(dictionary)
        histories.append(history)
    return jnp.stack(dictionaries), histories
