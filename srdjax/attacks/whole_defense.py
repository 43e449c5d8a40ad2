"""The attacks on a whole defense: the defense as one pytree with its BPDA gradient, and the
adaptive attacks on purification that target what BPDA alone walks past. (Above the purifier, so
`srdjax.attacks` does not import it: `import srdjax.attacks.whole_defense`.)

`Defense` is an input transform followed by a classifier. `defense_logits` is the defense as
deployed; `attack_logits` has the same values and the gradient an attacker uses: exact through
the blur, straight-through (BPDA, Athalye et al. 2018) through JPEG's and bit depth's rounding,
and `purify_bpda` through purification.

`purify_bpda` gives the exact gradient of purify *given* its discrete choices (the cluster k*
and OMP's supports), so a plain BPDA attack never sees that moving the input could switch the
cluster, which is where a clustering defense is weakest (RobustBench: ClusTR reported 74%,
AutoAttack found 0%). Two attacks aim at the choice itself:

  selector   PGD on the robust latent alone: maximise  d(z, nearest true-class cluster)
             − d(z, nearest wrong-class cluster),  positive once purify picks a cluster of a
             wrong class; the images are then scored on the whole defense.
  surrogate  PGD whose gradient comes from a smooth purify: soft weights
             softmax(−d_k / (T · dim z)) over the `top` nearest clusters mix the high parts
             rebuilt with each cluster's dictionary (OMP supports fixed at the current point,
             least squares on them exact), so the gradient also moves the cluster weights.
             Its value is the real defense's logits, so success is judged on the real thing.

A purification defense's `option` is a `purify_variants.Variant` (None: the paper's): how it
chooses the dictionary (nearest cluster, lowest reconstruction error, or the top-k classes'
rebuilds averaged), each with its own exact BPDA gradient given its choices, and the selector
attacking its own choice (`purify_variants.selector_margin`). The surrogate's gradient stays the
nearest-cluster soft purify for every variant; its value is the variant's deployed logits.

`eot_logits` averages a random defense over samples (Athalye et al. 2018's EOT). Purification
is deterministic, so the evaluation needs it for none of its defenses; it is there for defenses
that draw random numbers.

Which attack runs against which defense, in what order, is `srdjax.cascade`'s.
"""
from __future__ import annotations

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
from jax.tree_util import Partial

from srdjax import attacks
from srdjax import defenses as transforms
from srdjax import patches as patch_lib
from srdjax import purifier as purifier_lib
from srdjax import purify_variants
from srdjax.checks import check, check_images, check_labels
from srdjax.models import apply_model

@flax.struct.dataclass
class Classifier:
    """A trained network as a pytree: images -> logits."""
    graphdef: Any = flax.struct.field(pytree_node=False)
    params: Any
    batch_stats: Any

    def __call__(self, x):
        return apply_model(self.graphdef, self.params, self.batch_stats, x)[0]


@flax.struct.dataclass
class Defense:
    """`transform` (static, with its static `option`: JPEG quality, bits, blur σ, or for purify
    the `purify_variants.Variant`, None being the paper's) followed by `classifier`; `purifier`
    holds the purification state when transform == "purify"."""
    name: str = flax.struct.field(pytree_node=False)
    transform: str = flax.struct.field(pytree_node=False)
    option: Any = flax.struct.field(pytree_node=False)
    classifier: Classifier
    purifier: Any = None


def _transform(d: Defense, x, attacked: bool):
    if d.transform == "none":
        return x
    if d.transform == "blur":        # linear: its own gradient is exact
        return transforms.gaussian_blur(x, sigma=d.option)
    if d.transform == "purify":
        return (purifier_lib.purify_bpda if attacked else purifier_lib.purify)(d.purifier, x)
    fn = {"jpeg": functools.partial(transforms.jpeg, quality=d.option),
          "bit_depth": functools.partial(transforms.bit_depth, bits=d.option)}[d.transform]
    return transforms.bpda(fn)(x) if attacked else fn(x)   # rounding: straight-through


def _variant(d: Defense):
    return d.option if d.option is not None else purify_variants.NEAREST


def defense_logits(d: Defense, x):
    """The defense as deployed."""
    if d.transform == "purify":
        return purify_variants.defense_logits(_variant(d), d.purifier, d.classifier, x)
    return d.classifier(_transform(d, x, attacked=False))


def attack_logits(d: Defense, x):
    """The values of `defense_logits`, with the gradient an attacker uses."""
    if d.transform == "purify":
        return purify_variants.attack_logits(_variant(d), d.purifier, d.classifier, x)
    return d.classifier(_transform(d, x, attacked=True))


def selector_margin(p: purifier_lib.Purifier, y, x):
    """Per image: (distance to the nearest cluster of class y) − (distance to the nearest cluster
    of any other class). Positive exactly when purify would choose a wrong class's cluster."""
    return purify_variants.nearest_margin(p, y, x)


def selector_attack(p: purifier_lib.Purifier, x, y, *, eps, key, steps=100, norm="linf",
                    ids=None, variant=None):
    """Images in the ε-ball that push purification's choice off the true class: the visited
    point of largest `selector_margin` per image (for a `variant`, the margin of its own
    choice: `purify_variants.selector_margin`); random starts keyed by `ids`."""
    check_labels(y, jnp.shape(x)[0])
    margin = purify_variants.selector_margin(variant or purify_variants.NEAREST)
    return attacks.pgd_on_loss(Partial(margin, p, y), x, eps=eps, key=key, steps=steps,
                               norm=norm, ids=ids)


def chosen_class(p: purifier_lib.Purifier, x):
    """The class of the cluster purify chooses for each image [N]."""
    return p.clusters.class_ids[purifier_lib.choose_cluster(p, x)]


def soft_purify(p: purifier_lib.Purifier, x, *, top: int = 3, temperature: float = 1.0):
    """A smooth stand-in for purify: Σ_t w_t · purify_{k_t}(x) over the `top` nearest clusters
    k_t, w = softmax(−d / temperature) with d the per-dimension distances of
    `purify_variants.latent_distances`, each purify_k with OMP's supports chosen at x and held
    fixed (so linear in x). The clip is straight-through. As temperature → 0 (or top = 1) it is
    purify with the BPDA gradient."""
    check(isinstance(top, int) and top >= 1, f"surrogate top must be an integer >= 1, got {top!r}")
    check(temperature > 0, f"surrogate temperature must be > 0, got {temperature!r}")
    top = min(top, p.clusters.num_clusters)
    d = purify_variants.latent_distances(p, x)
    neg_d, nearest = jax.lax.top_k(-d, top)                                  # [N, top]
    weights = jax.nn.softmax(neg_d / temperature, axis=-1)
    # OMP picks its atoms at the current point; no gradient flows through the picks.
    _, high = purifier_lib._split(p, jax.lax.stop_gradient(x))
    patches = patch_lib._extract(high, p.options.patch_size, p.options.stride)
    mixed = 0.0
    for t in range(top):
        support, _ = purifier_lib._supports(p, nearest[:, t], patches)
        rebuilt = purifier_lib._linear_given_choices(p, x, nearest[:, t], support)
        mixed = mixed + weights[:, t, None, None, None] * rebuilt
    return mixed + jax.lax.stop_gradient(jnp.clip(mixed, 0.0, 1.0) - mixed)


def surrogate_logits(p: purifier_lib.Purifier, classifier, x, *, top: int, temperature: float):
    """The real defense's logits classifier(purify(x)) as the value, the gradient of
    classifier(soft_purify(x)). (stop_gradient(a) + (b − stop_gradient(b)) equals a exactly:
    the difference of a finite float with itself is 0.)"""
    return defense_surrogate_logits(Defense("srd", "purify", None, classifier, p), x, top=top,
                                    temperature=temperature)


def defense_surrogate_logits(d: Defense, x, *, top: int, temperature: float):
    """`surrogate_logits` for a purification defense of any variant: its deployed logits as
    the value, the nearest-cluster soft purify's gradient (the surrogate of every variant)."""
    real = jax.lax.stop_gradient(defense_logits(d, x))
    soft = d.classifier(soft_purify(d.purifier, x, top=top, temperature=temperature))
    return real + (soft - jax.lax.stop_gradient(soft))


def eot_logits(random_logits, samples: int, key):
    """x -> the mean of `random_logits(x, key_s)` over `samples` draws (EOT): attacks on it
    follow the expected gradient of a random defense.

    The draws' keys come from `key` and the bits of x, so every attack iterate sees fresh
    randomness while the function stays pure (the same x gives the same logits)."""
    check(isinstance(samples, int) and samples >= 1,
          f"eot_samples must be an integer >= 1, got {samples!r}")

    def logits_fn(x):
        bits = jax.lax.bitcast_convert_type(jax.lax.stop_gradient(x).astype(jnp.float32),
                                            jnp.uint32)
        base = jax.random.fold_in(key, jnp.sum(bits, dtype=jnp.uint32))
        keys = jax.random.split(base, samples)
        return jnp.mean(jax.vmap(lambda k: random_logits(x, k))(keys), axis=0)

    return logits_fn


def selector_success(p: purifier_lib.Purifier, x_adv, y):
    """Per image: does purify choose a cluster of a wrong class for x_adv?"""
    check_images(x_adv, "adversarial images")
    return chosen_class(p, x_adv) != y


# ------------------------------------------------------------------------------ dispatch


@functools.lru_cache(maxsize=None)
def _surrogate(top: int, temperature: float):
    """surrogate_logits with its static settings bound, one function object per setting (so
    jitted attack steps that take it as a Partial compile once)."""
    return functools.partial(surrogate_logits, top=top, temperature=temperature)


@functools.lru_cache(maxsize=None)
def _defense_surrogate(top: int, temperature: float):
    """defense_surrogate_logits with its static settings bound (see `_surrogate`)."""
    return functools.partial(defense_surrogate_logits, top=top, temperature=temperature)
