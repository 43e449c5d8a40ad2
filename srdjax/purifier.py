"""Stage 5: purification, and the whole defense as one differentiable function.

    purify(x) = clip(L(x) + Ĥ, 0, 1),  Ĥ = patches⁻¹( OMP_{D_k*}( patches(H(x)) ) ),
    k* = argmin_k d(z_g(x), N_k)  over every cluster of every class,

with (L, H) the frequency split, z_g the robust model's latent and D_k the dictionary learned
from cluster k's images. Everything is one jitted function of (state, images); the state is a
pytree, so `purify` can be called from, and traced into, other jitted JAX code.

`defense_logits` is purify followed by a classifier, with the BPDA gradient of Athalye et al.
(2018): given the cluster choice and OMP's supports, purify is *linear* in x (split, patch
extraction, least squares on the fixed support, overlap averaging), and the backward pass is the
exact gradient of that linear map; the choices themselves (argmin, atom selection) pass no
gradient and the final clip is straight-through.

Loading a trained workdir as a purifier or a defense is `srdjax.loading`'s (it knows the stages).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from srdjax import clusters as clusters_lib
from srdjax import patches as patch_lib
from srdjax import resynthesis
from srdjax import frequency
from srdjax import omp as omp_lib
from srdjax import parallel
from srdjax.checks import check, check_images
from srdjax.models import apply_model


# Patches OMP-coded together on a GPU or TPU when image_chunk is 0 (auto): 419 CIFAR images at
# stride 1, about 0.3 GB of correlations at 256 atoms.
ACCELERATOR_PATCHES = 262144


@dataclasses.dataclass(frozen=True)
class PurifyOptions:
    """Static choices of purification (hashable: they select the compiled program).

    image_chunk: images OMP-coded together (memory grows with it); 0 (the default) is chosen by
    `make_purifier` for the platform: 16 on a CPU, ACCELERATOR_PATCHES' worth on a GPU or TPU."""
    image_size: tuple[int, int]
    patch_size: int = 8
    stride: int = 1
    sparsity: int = 8
    split_method: str = "tikhonov"
    lam: float = 5.0
    pad: int = 16
    sigma: float = 2.5
    distance: str = "sigma"
    image_chunk: int = 0


@flax.struct.dataclass
class Purifier:
    """Robust model, cluster distributions and dictionaries, as one pytree.

    `purifier(x)` is `purify(purifier, x)` (inputs checked); `purifier.unchecked(x)` is
    `purify_unchecked(purifier, x)`, for use inside other jitted code."""
    graphdef: Any = flax.struct.field(pytree_node=False)
    options: PurifyOptions = flax.struct.field(pytree_node=False)
    params: Any
    batch_stats: Any
    clusters: clusters_lib.ClusterSet
    dictionaries: jax.Array          # [K, n_atoms, p·p·C]
    grams: jax.Array                 # [K, n_atoms, n_atoms]

    def __call__(self, x, *, return_cluster: bool = False):
        return purify(self, x, return_cluster=return_cluster)

    def unchecked(self, x, *, return_cluster: bool = False):
        return purify_unchecked(self, x, return_cluster=return_cluster)

    def latent(self, x):
        return apply_model(self.graphdef, self.params, self.batch_stats, x)[1]


def auto_image_chunk(options: PurifyOptions) -> int:
    """Images per OMP chunk for image_chunk = 0: 16 on a CPU (a core's cache), else enough
    images for ACCELERATOR_PATCHES patches (each chunk is a pass of a loop of small kernels)."""
    if not parallel.on_accelerator():
        return 16
    rows, cols = patch_lib._grid(*options.image_size, options.patch_size, options.stride)
    return max(16, ACCELERATOR_PATCHES // (rows * cols))


def check_image_chunk(value, name: str = "image_chunk") -> None:
    check(isinstance(value, (int, np.integer)) and value >= 0,
          f"{name} must be a non-negative integer (0: by platform), got {value!r}")


def make_purifier(graphdef, params, batch_stats, cluster_set, dictionaries,
                  options: PurifyOptions) -> Purifier:
    check_image_chunk(options.image_chunk)
    if options.image_chunk == 0:
        options = dataclasses.replace(options, image_chunk=auto_image_chunk(options))
    check(dictionaries.shape[0] == cluster_set.means.shape[0],
          f"{dictionaries.shape[0]} dictionaries for {cluster_set.means.shape[0]} clusters")
    return Purifier(graphdef, options, params, batch_stats, cluster_set, dictionaries,
                    omp_lib.gram_of(dictionaries))


def _split(p: Purifier, x):
    o = p.options
    if o.split_method == "tikhonov":
        low = frequency.tikhonov_low_pass(x, o.lam, pad=o.pad)
    else:
        low = frequency.gaussian_low_pass(x, sigma=o.sigma)
    return low, x - low


def choose_cluster(p: Purifier, x):
    """k* per image: the cluster nearest the robust latent, over all clusters of all classes."""
    return clusters_lib.nearest_cluster(p.latent(x), p.clusters, p.options.distance)


def _supports(p: Purifier, k, patches):
    """OMP supports and values of every patch, image i coded with dictionary k[i]."""
    return resynthesis.code_per_image(p.dictionaries, p.grams, k, patches, p.options.sparsity,
                                   p.options.image_chunk)


def _rebuild(p: Purifier, low, k, support, values, shape):
    o = p.options
    return low + resynthesis.rebuild_per_image(p.dictionaries, k, support, values, shape,
                                            o.patch_size, o.stride, o.image_chunk)


def _purify_with_choices(p: Purifier, x):
    """(purified images, chosen clusters, OMP supports): the choices BPDA holds fixed."""
    low, high = _split(p, x)
    k = choose_cluster(p, x)
    patches = patch_lib._extract(high, p.options.patch_size, p.options.stride)
    support, values = _supports(p, k, patches)
    out = jnp.clip(_rebuild(p, low, k, support, values, x.shape[1:]), 0.0, 1.0).astype(x.dtype)
    return out, k, support


@functools.partial(jax.jit, static_argnames=("return_cluster",))
def _purify(p: Purifier, x, return_cluster: bool = False):
    out, k, _ = _purify_with_choices(p, x)
    return (out, k) if return_cluster else out


def check_input(p: Purifier, x) -> None:
    """What every public entry point refuses, in one line: not an NHWC float batch of this
    purifier's size, an empty batch, values outside [0, 1], NaN or infinity (the values only
    when x is concrete: under `jit` or `grad` only its shape and dtype are known)."""
    check_images(x, "images")
    h, w = p.options.image_size
    check(tuple(x.shape[1:3]) == (h, w),
          f"images are {x.shape[1]}x{x.shape[2]} but this purifier was built for {h}x{w}")
    check(x.shape[0] >= 1, f"images is an empty batch (shape {tuple(x.shape)})")


@functools.lru_cache(maxsize=None)
def _purify_per_device(mesh, spec, return_cluster: bool):
    """_purify as one program run on every device's images (shard_map), the state replicated.

    Images are independent, so no device needs another's. Left to GSPMD, the batch-sharded jit
    gathered every image onto every device at the FFT of the frequency split and inside OMP's
    gathers, and both devices purified the whole batch."""
    out_specs = (spec, spec) if return_cluster else spec
    return jax.jit(jax.shard_map(functools.partial(_purify, return_cluster=return_cluster),
                                 mesh=mesh, in_specs=(P(), spec), out_specs=out_specs,
                                 check_vma=False))


def purify_unchecked(p: Purifier, x, *, return_cluster: bool = False):
    """`purify` without its input checks: for code that has checked its images already, or
    that calls purification inside its own `jit`/`grad` (attacks, evaluation). Images outside
    [0, 1] or holding NaN give meaningless output here, not an error."""
    mesh = parallel.rows_mesh(x)
    if mesh is not None and x.shape[0] % parallel.row_parts(x) == 0:
        return _purify_per_device(mesh, P(x.sharding.spec[0]), return_cluster)(p, x)
    return _purify(p, x, return_cluster=return_cluster)


def purify(p: Purifier, x, *, return_cluster: bool = False):
    """Purified images [N, H, W, 3] in [0, 1] (and the chosen cluster [N] if asked).

    Deterministic and pure; jitted. The images are checked first (`check_input`): a wrong
    rank, size or dtype, values outside [0, 1], NaN or infinity raise `SrdjaxError` (values
    only when concrete; traced inside another `jit`, shape and dtype alone are checked). A
    batch split over a mesh's devices (e.g. by `parallel.shard_batch`) is purified on every
    device separately; the result is split the same way. `purify_unchecked` skips the checks."""
    check_input(p, x)
    return purify_unchecked(p, x, return_cluster=return_cluster)


def purify_uint8(p: Purifier, images, mesh, batch_size: int, *, desc: str = "purify"):
    """Purify host uint8 images [N, H, W, 3] batch by batch over `mesh`: (purified uint8
    images, chosen cluster [N]), on every process. Each batch is padded to a multiple of the
    mesh, split over its devices (every process holds the same images) and gathered back; a
    progress bar shows on the main process when there is more than one batch."""
    from tqdm.auto import tqdm
    images = np.asarray(images)
    check(images.dtype == np.uint8 and images.ndim == 4,
          f"images must be uint8 [N, H, W, 3], got {images.dtype} of shape {images.shape}")
    check(batch_size > 0, f"batch size must be positive, got {batch_size}")
    batch = max(mesh.size, batch_size - batch_size % mesh.size)
    purified, chosen = [], []
    for start in tqdm(range(0, len(images), batch), desc=desc, unit="batch", leave=False,
                      disable=not parallel.is_main_process() or len(images) <= batch):
        xb, n = parallel.pad_to_multiple(images[start:start + batch], mesh.size)
        # uint8 / 255 lies in [0, 1] by construction: no need for purify's value checks.
        out, k = purify_unchecked(p, parallel.shard_global(mesh, xb.astype(np.float32) / 255.0),
                                  return_cluster=True)
        purified.append(np.round(parallel.to_host(out)[:n] * 255.0).astype(np.uint8))
        chosen.append(parallel.to_host(k)[:n])
    return np.concatenate(purified), np.concatenate(chosen)


# ---------------------------------------------------------------------------------------------
# The BPDA-differentiable version.

def _project_high(p: Purifier, k, support, high):
    """The high part rebuilt with the clusters k and OMP supports fixed: R(P_S(E(high))), with
    E the patch extraction, P_S each patch's orthogonal projection onto the span of its support's
    atoms (least squares on the support) and R the overlap average."""
    o = p.options
    patches = patch_lib._extract(high, o.patch_size, o.stride)
    values = resynthesis.values_on_support(p.dictionaries, p.grams, k, support, patches,
                                        o.image_chunk)
    return resynthesis.rebuild_per_image(p.dictionaries, k, support, values, high.shape[1:],
                                      o.patch_size, o.stride, o.image_chunk)


@jax.custom_vjp
def _linear_given_choices(p: Purifier, x, k, support):
    """purify with the cluster and OMP supports held fixed: linear in x (before the clip).

    Its vjp is written out: with R(Q) = Eᵀ(Q) / c (c: patches covering each pixel) and P_S
    symmetric, the high part's transpose is Eᵀ P_S E(g / c) = c · R(P_S(E(g / c))), the same
    fixed-support rebuild applied to g / c. Left to autodiff, the transpose of the rebuild's
    gathers ran at a tenth of the forward's speed on a CPU."""
    low, high = _split(p, x)
    return low + _project_high(p, k, support, high)


def _linear_fwd(p, x, k, support):
    return _linear_given_choices(p, x, k, support), (p, x, k, support)


def _linear_bwd(res, g):
    p, x, k, support = res
    o = p.options
    counts = jnp.asarray(patch_lib.patch_counts(x.shape[1:], o.patch_size, o.stride), g.dtype)
    g_high = counts * _project_high(p, k, support, g / counts)
    _, split_vjp = jax.vjp(functools.partial(_split, p), x)
    return (_zero_cotangent(p), split_vjp((g, g_high))[0], _zero_cotangent(k),
            _zero_cotangent(support))


_linear_given_choices.defvjp(_linear_fwd, _linear_bwd)


@jax.custom_vjp
def purify_bpda(p: Purifier, x):
    """`purify` in the forward pass; in the backward pass the exact gradient of purify with the
    cluster choice and OMP supports fixed, and straight-through for the clip."""
    return _purify(p, x)


def _bpda_fwd(p, x):
    out, k, support = _purify_with_choices(p, x)
    return out, (p, x, k, support)


def _bpda_bwd(res, g):
    return _linear_bwd(res, g)[:2]


def _zero_cotangent(tree):
    """The attack differentiates images, never the purifier's state (integer leaves need the
    float0 zero that JAX expects)."""

    def zero(leaf):
        if jnp.issubdtype(leaf.dtype, jnp.inexact):
            return jnp.zeros_like(leaf)
        return np.zeros(leaf.shape, jax.dtypes.float0)
    return jax.tree.map(zero, tree)


purify_bpda.defvjp(_bpda_fwd, _bpda_bwd)


def defense_logits(p: Purifier, classifier, x):
    """Logits of `classifier(purify(x))`, differentiable with the BPDA gradient.

    `classifier` maps images to logits (e.g. a bound model)."""
    return classifier(purify_bpda(p, x))


# ---------------------------------------------------------------------------------------------
# Loading from a train.py workdir.

def options_from_config(config) -> PurifyOptions:
    d, f = config.dictionaries, config.frequency
    return PurifyOptions(image_size=tuple(config.data.image_size), patch_size=d.patch_size,
                         stride=d.stride, sparsity=d.sparsity, split_method=f.method,
                         lam=float(f.lam), pad=f.pad, sigma=float(f.sigma),
                         distance=config.cluster.distance,
                         image_chunk=config.purify.image_chunk)
