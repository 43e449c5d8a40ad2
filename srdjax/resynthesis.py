"""Sparse re-synthesis: an image's high-frequency part rebuilt from a cluster's dictionary.

Each image's overlapping patches (`srdjax.patches`) are OMP-coded on the dictionary of its
cluster (`srdjax.omp`), least squares on the chosen support gives the values, and the coded
patches are averaged back into the image. Purification (`srdjax.purifier`) runs these steps
apart so that its BPDA gradient can reuse the forward pass's supports.
"""
from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp

from srdjax import omp as omp_lib
from srdjax import parallel
from srdjax.checks import check, check_finite
from srdjax.patches import _average, _extract, _grid, _reconstruct


@functools.partial(jax.jit, static_argnames=("patch_size", "sparsity", "stride", "chunk_size"))
def _sparse_code_images(dictionary, high, patch_size: int, sparsity: int, stride: int,
                        chunk_size: int):
    patches = _extract(high, patch_size, stride)
    flat = patches.reshape(-1, patches.shape[-1])
    support, values = omp_lib.omp_support_unchecked(
        dictionary, flat, omp_lib.gram_of(dictionary), 0.0, sparsity=sparsity, use_tol=False,
        chunk_size=chunk_size)
    coded = omp_lib.reconstruct_signals(dictionary, support, values).reshape(patches.shape)
    return _reconstruct(coded, high.shape[1:], patch_size, stride)


def sparse_code_images(dictionary, high_images, patch_size: int = 8, sparsity: int = 8, *,
                       stride: int = 1, chunk_size: int | None = None):
    """Re-synthesise high-frequency images from their OMP-coded patches with one dictionary:
    extract patches → OMP → codes @ dictionary → average the overlapping patches."""
    chex.assert_rank([dictionary, high_images], [2, 4])
    _grid(high_images.shape[1], high_images.shape[2], patch_size, stride)
    dim = patch_size * patch_size * high_images.shape[3]
    omp_lib.check_inputs(dictionary, jnp.zeros((0, dim), dictionary.dtype), sparsity)
    check_finite(high_images, "high_images")
    dtype = jnp.result_type(dictionary, high_images)
    return _sparse_code_images(jnp.asarray(dictionary, dtype), jnp.asarray(high_images, dtype),
                               int(patch_size), int(sparsity), int(stride),
                               int(omp_lib.default_chunk(chunk_size)))


def code_per_image(dictionaries, grams, cluster_idx, patches, sparsity: int, image_chunk: int):
    """OMP supports and values [N, P, sparsity] of every patch, image i's patches [P, dim] coded
    with dictionaries[cluster_idx[i]]; `image_chunk` images at a time (bounds memory: the
    correlations are image_chunk · P · n_atoms floats)."""
    return parallel.chunked_map(
        lambda idx, signals: omp_lib.omp_support_per_dictionary(
            dictionaries, grams, idx, signals, sparsity=sparsity),
        image_chunk, cluster_idx, patches)


def values_on_support(dictionaries, grams, cluster_idx, support, patches, image_chunk: int = 16):
    """Least-squares values [N, P, sparsity] of every patch on its fixed support, image i's
    patches [P, dim] with dictionaries[cluster_idx[i]]: OMP's values when `support` is OMP's.

    The right-hand sides Dᵀx are one matmul per image (all atoms, then the support's picked)
    and the small Gram systems are gathered from `grams`: gathering each patch's atoms instead
    wrote N · P · sparsity · dim floats (0.8 GB for 200 CIFAR-size images at stride 1)."""
    n_clusters, n_atoms, dim = dictionaries.shape
    sparsity = support.shape[-1]
    flat_grams = grams.reshape(-1).astype(patches.dtype)

    def solve(idx, sup, signals):
        n, p = sup.shape[:2]
        used = sup >= 0
        atom = jnp.maximum(sup, 0)
        xy = jnp.einsum("npd,nad->npa", signals, dictionaries[idx],        # [n, P, A]
                        precision=omp_lib.HIGHEST)
        rhs = jnp.where(used, jnp.take_along_axis(xy, atom, axis=-1), 0.0)
        base = (idx * n_atoms * n_atoms)[:, None, None, None]
        gram = flat_grams[base + atom[..., :, None] * n_atoms + atom[..., None, :]]
        both = used[..., :, None] & used[..., None, :]
        # Unused slots get an identity row and column: the system stays nonsingular, value 0.
        gram = jnp.where(both, gram, jnp.eye(sparsity, dtype=gram.dtype))
        values = omp_lib.spd_solve(gram.reshape(n * p, sparsity, sparsity),
                                   rhs.reshape(n * p, sparsity))
        return values.reshape(n, p, sparsity)

    return parallel.chunked_map(solve, image_chunk, cluster_idx, support, patches)


def rebuild_per_image(dictionaries, cluster_idx, support, values, shape, patch_size: int,
                      stride: int, image_chunk: int = 16):
    """The high-frequency images [N, *shape] from per-image codes (overlaps averaged)."""
    n_clusters, n_atoms, dim = dictionaries.shape
    n, n_patches, sparsity = support.shape
    # Atom j of cluster k is row k · n_atoms + j of the stacked dictionaries.
    rows = jnp.where(support >= 0, support + cluster_idx[:, None, None] * n_atoms, -1)
    rows, values = rows.reshape(n * n_patches, sparsity), values.reshape(n * n_patches, sparsity)
    # Coded in chunks under a loop of at least 2 steps (XLA drops a loop of one), so the patches
    # are materialised once before the overlap average. Left to fuse into it, XLA's CPU backend
    # wrote each atom's gather to memory and read it back twice (hand timings of the whole
    # rebuild on a 2-core CPU: 60–70 ms instead of 24 ms for 32 CIFAR-size images, 24 ms instead of 3 ms for 4
    # images of 128×128).
    chunk = min(image_chunk * n_patches, -(-n * n_patches // 2))
    patches = parallel.chunked_map(
        functools.partial(omp_lib.reconstruct_signals, dictionaries.reshape(-1, dim)),
        chunk, rows, values)
    # The overlap average is a sum of p² shifted patches: written once, not recomputed inside
    # every consumer of the purified images (the classifier's first convolution read it 9
    # times, and purification ran 2.3× slower chained to a classifier than alone;
    # `benchmarks/purify_in_loop.py`).
    return parallel.written_once(lambda q: _average(q, shape, patch_size, stride),
                                 patches.reshape(n, n_patches, dim))


@functools.partial(jax.jit, static_argnames=("patch_size", "sparsity", "stride", "image_chunk"))
def _reconstruct_high(dictionaries, grams, cluster_idx, high, patch_size: int, sparsity: int,
                      stride: int, image_chunk: int):
    patches = _extract(high, patch_size, stride)               # [N, P, dim]
    support, values = code_per_image(dictionaries, grams, cluster_idx, patches, sparsity,
                                     image_chunk)
    return rebuild_per_image(dictionaries, cluster_idx, support, values, high.shape[1:],
                             patch_size, stride, image_chunk)


def reconstruct_high(dictionaries, cluster_idx, high, patch_size: int = 8, sparsity: int = 8, *,
                     stride: int = 1, image_chunk: int = 8):
    """`sparse_code_images` where image i uses dictionaries[cluster_idx[i]]; jittable.

    dictionaries [K, n_atoms, dim], cluster_idx [N] int, high [N, H, W, C]. Images are coded
    `image_chunk` at a time (memory grows with image_chunk · patches per image · n_atoms ·
    sparsity).
    """
    chex.assert_rank([dictionaries, cluster_idx, high], [3, 1, 4])
    chex.assert_equal_shape_prefix([cluster_idx, high], 1)
    n_clusters, n_atoms, dim = dictionaries.shape
    check(dim == patch_size * patch_size * high.shape[3],
          f"dictionaries have dim {dim} but {patch_size}x{patch_size} patches of "
          f"{high.shape[3]}-channel images have dim {patch_size * patch_size * high.shape[3]}")
    _grid(high.shape[1], high.shape[2], patch_size, stride)
    # Every atom of every dictionary must be usable: check them as one stacked dictionary.
    omp_lib.check_inputs(dictionaries.reshape(-1, dim), jnp.zeros((0, dim), dictionaries.dtype),
                         sparsity)
    check(sparsity <= n_atoms, f"sparsity must be at most n_atoms = {n_atoms}, got {sparsity}")
    check_finite(high, "high")
    grams = omp_lib.gram_of(dictionaries)
    return _reconstruct_high(dictionaries, grams, cluster_idx, high, int(patch_size),
                             int(sparsity), int(stride), max(1, min(int(image_chunk),
                                                                     high.shape[0])))
