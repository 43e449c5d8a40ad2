"""Purify-time variants of the purification defense (the purifier ablation): how the dictionary
is chosen, and the frequency cut-off and OMP sparsity used when purifying, with the trained
dictionaries, clusters and robust model unchanged.

  nearest         the paper: the cluster nearest the robust latent (`srdjax.purifier`).
  reconstruction  the dictionary of lowest reconstruction error over every cluster of every
                  class (`cluster_choice.purify_by_reconstruction`).
  top_classes     the classifier's probabilities averaged over the rebuilds with the nearest
                  cluster of each of the `top` classes nearest the robust latent
                  (`cluster_choice.top_class_log_probs`); the defense outputs log-probabilities.

`Variant` also holds the Tikhonov λ and the OMP sparsity (0: as trained), applied to a loaded
purifier by `apply`.

For each choice: `defense_logits` (as deployed); `attack_logits`, the same values with the exact
gradient given the discrete choices -- the chosen clusters and OMP's supports held fixed, the
linear map `purifier._linear_given_choices` differentiated, the clip straight-through: BPDA as
`purify_bpda` gives it for `nearest` (for `top_classes`, the mean of the softmax over the
rebuilds, each with that gradient); `selector_margin`, positive exactly when the variant's own
choice leaves the true class, which the selector attack maximises; `true_choice`. Nothing here
draws random numbers, so no variant needs EOT.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from srdjax import cluster_choice
from srdjax import clusters as clusters_lib
from srdjax import patches as patch_lib
from srdjax import purifier as purifier_lib
from srdjax.checks import check

CHOICES = ("nearest", "reconstruction", "top_classes")


@dataclasses.dataclass(frozen=True)
class Variant:
    """A purify-time setting (hashable: it selects compiled programs). `top` counts only for
    top_classes; lam = 0 and sparsity = 0 mean as trained."""
    choice: str = "nearest"
    top: int = 1
    lam: float = 0.0
    sparsity: int = 0

    def __post_init__(self):
        check(self.choice in CHOICES, f"unknown purify choice {self.choice!r}; expected one of "
                                      f"{', '.join(CHOICES)}")
        check(isinstance(self.top, int) and self.top >= 1,
              f"purify top must be an integer >= 1, got {self.top!r}")
        check(isinstance(self.lam, (int, float)) and self.lam >= 0,
              f"purify lam must be >= 0 (0: as trained), got {self.lam!r}")
        check(isinstance(self.sparsity, int) and self.sparsity >= 0,
              f"purify sparsity must be an integer >= 0 (0: as trained), got {self.sparsity!r}")

    @classmethod
    def from_config(cls, section) -> "Variant":
        """From a config's `evaluate.purify` (None: the paper's purify, as trained)."""
        if section is None:
            return cls()
        choice = section["choice"]
        return cls(choice, int(section["top"]) if choice == "top_classes" else 1,
                   float(section["lam"]), int(section["sparsity"]))

    def describe(self) -> dict:
        return dataclasses.asdict(self)


NEAREST = Variant()


def apply(p: purifier_lib.Purifier, v: Variant) -> tuple[purifier_lib.Purifier, Variant]:
    """(p with v's λ and sparsity, v with both as used): the dictionaries stay as trained."""
    o = p.options
    n_atoms, dim = p.dictionaries.shape[1:]
    check(not v.lam or o.split_method == "tikhonov",
          f"purify lam {v.lam} needs the tikhonov split; this purifier uses {o.split_method!r}")
    check(v.sparsity <= min(n_atoms, dim),
          f"purify sparsity {v.sparsity} exceeds the dictionaries' {n_atoms} atoms or the patch "
          f"dimension {dim}")
    if v.choice == "top_classes":
        n_classes = len(np.unique(np.asarray(p.clusters.class_ids)))
        check(v.top <= n_classes, f"purify top {v.top} exceeds the purifier's {n_classes} classes")
    options = dataclasses.replace(o, lam=float(v.lam or o.lam), sparsity=v.sparsity or o.sparsity)
    used = dataclasses.replace(v, lam=options.lam, sparsity=options.sparsity)
    return p.replace(options=options), used


# ------------------------------------------------------------------------------ purify, held


def _purify_given(p, x, k):
    """(x purified with cluster k [N] per image, OMP's supports)."""
    low, high = purifier_lib._split(p, x)
    patches = patch_lib._extract(high, p.options.patch_size, p.options.stride)
    support, values = purifier_lib._supports(p, k, patches)
    out = purifier_lib._rebuild(p, low, k, support, values, x.shape[1:])
    return jnp.clip(out, 0.0, 1.0).astype(x.dtype), support


@jax.custom_vjp
def purify_given_bpda(p, x, k):
    """x purified with cluster k [N]; its gradient is the exact one of the linear map with k
    and OMP's supports fixed, straight-through for the clip (`purify_bpda`'s, for any k)."""
    return _purify_given(p, x, k)[0]


def _given_fwd(p, x, k):
    out, support = _purify_given(p, x, k)
    return out, (p, x, k, support)


def _given_bwd(res, g):
    return purifier_lib._linear_bwd(res, g)[:3]


purify_given_bpda.defvjp(_given_fwd, _given_bwd)


def _top_log_probs_held(p, classifier, x, top: int):
    ks = jax.lax.stop_gradient(cluster_choice.top_class_clusters(p, x, top))
    probs = [jax.nn.softmax(classifier(purify_given_bpda(p, x, ks[:, t])), axis=-1)
             for t in range(top)]
    return jnp.log(sum(probs) / top)


def defense_logits(v: Variant, p, classifier, x):
    """The purification defense of variant `v` as deployed."""
    if v.choice == "reconstruction":
        return classifier(cluster_choice.purify_by_reconstruction(p, x)[0])
    if v.choice == "top_classes":
        return cluster_choice.top_class_log_probs(p, classifier, x, v.top)
    return classifier(purifier_lib.purify(p, x))


def attack_logits(v: Variant, p, classifier, x):
    """`defense_logits`' values with the exact gradient given the discrete choices (BPDA)."""
    if v.choice == "reconstruction":
        k = jax.lax.stop_gradient(cluster_choice.purify_by_reconstruction(p, x)[1])
        return classifier(purify_given_bpda(p, x, k))
    if v.choice == "top_classes":
        return _top_log_probs_held(p, classifier, x, v.top)
    return classifier(purifier_lib.purify_bpda(p, x))


# ------------------------------------------------------------------------------ the choice


def latent_distances(p, x):
    """Squared distance [N, K] of each image's robust latent to every cluster, per latent dim."""
    z = p.latent(x)
    return clusters_lib.cluster_distances(z, p.clusters, p.options.distance) / z.shape[-1]


def nearest_margin(p, y, x):
    """(distance to the nearest cluster of class y) − (to the nearest of any other class)."""
    d = latent_distances(p, x)
    own = p.clusters.class_ids[None, :] == y[:, None]
    return (jnp.min(jnp.where(own, d, jnp.inf), axis=1)
            - jnp.min(jnp.where(own, jnp.inf, d), axis=1))


def reconstruction_margin(p, y, x):
    """(lowest reconstruction error of a class-y dictionary) − (lowest of any other class's),
    each rebuild with OMP's supports chosen at x and held fixed, so the errors are
    differentiable. Positive exactly when `reconstruction` chooses a wrong class."""
    low, high = purifier_lib._split(p, x)
    patches = patch_lib._extract(jax.lax.stop_gradient(high), p.options.patch_size,
                                 p.options.stride)
    n = x.shape[0]

    def error(k):
        kk = jnp.full((n,), k, jnp.int32)
        support = jax.lax.stop_gradient(purifier_lib._supports(p, kk, patches)[0])
        rebuilt = purifier_lib._linear_given_choices(p, x, kk, support) - low
        return jnp.sum((high - rebuilt) ** 2, axis=(1, 2, 3))

    errors = jax.lax.map(error, jnp.arange(p.dictionaries.shape[0], dtype=jnp.int32)).T
    own = p.clusters.class_ids[None, :] == y[:, None]
    return (jnp.min(jnp.where(own, errors, jnp.inf), axis=1)
            - jnp.min(jnp.where(own, jnp.inf, errors), axis=1))


def top_classes_margin(p, y, x, *, top: int):
    """(distance to class y's nearest cluster) − (the `top`-th smallest of the other classes'
    nearest-cluster distances). Positive exactly when `top` other classes lie nearer, so the
    true class is left out of the top-k rebuilds; top = 1 is `nearest_margin`."""
    d = latent_distances(p, x)
    ids = p.clusters.class_ids
    k = ids.shape[0]
    same = ids[:, None] == ids[None, :]                                   # [K, K]
    class_min = jnp.min(jnp.where(same[None], d[:, :, None], jnp.inf), axis=1)  # [N, K]
    first = ~jnp.any(same & (jnp.arange(k)[:, None] < jnp.arange(k)[None, :]), axis=0)
    own = ids[None, :] == y[:, None]
    others = jnp.where(first[None, :] & ~own, class_min, jnp.inf)
    return jnp.min(jnp.where(own, d, jnp.inf), axis=1) - jnp.sort(others, axis=1)[:, top - 1]


@functools.lru_cache(maxsize=None)
def selector_margin(v: Variant):
    """margin(p, y, x) -> [N] of `v`'s own choice (one function object per variant, so jitted
    attack steps taking it compile once)."""
    if v.choice == "reconstruction":
        return reconstruction_margin
    if v.choice == "top_classes":
        return functools.partial(top_classes_margin, top=v.top)
    return nearest_margin


def true_choice(v: Variant, p, x, y):
    """Per image: does `v`'s choice keep the true class (for top_classes: among the top)?"""
    ids = p.clusters.class_ids
    if v.choice == "reconstruction":
        return ids[cluster_choice.purify_by_reconstruction(p, x)[1]] == y
    if v.choice == "top_classes":
        return jnp.any(ids[cluster_choice.top_class_clusters(p, x, v.top)] == y[:, None], axis=1)
    return ids[purifier_lib.choose_cluster(p, x)] == y
