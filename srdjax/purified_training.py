"""Stage `purified_at`: adversarial training of the classifier behind the purifier, through it.

The robust model, clusters and dictionaries stay as trained (they make the purifier P); the
classifier g that reads P's output is fine-tuned on purified adversarial images, each attack
made end to end through the whole defense:

    x_adv = attack(x' ↦ CE(g(P(x')), y) + β · margin(x'), x)    (BPDA gradient through P)
    loss  = CE(g(P(x_adv)), y)

`margin` is the selector attack's objective on P's cluster choice (distance of the robust latent
to the nearest cluster of the true class minus that to the nearest of any other class, per
latent dimension; positive once P rebuilds with a wrong class's dictionary), so the attack also
pushes the choice to a wrong cluster and g learns to read the purifications a wrong choice makes.
This is the one family of purifier + adversarial training that has gained over adversarial
training alone in published work: train against the whole pipeline (ADBM, arXiv 2408.00315).

The attack and its budget are `robust.training_attack`'s (FGSM-RS, N-FGSM or PGD) with the
`purified_at` section's settings. The images of a batch are independent, so the attack and the
purification run on every device's images separately (`shard_map`): left to GSPMD, the batch's
purification would be gathered onto every device.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from srdjax import parallel, purify_variants, robust, training
from srdjax.checks import check
from srdjax.models import apply_model
from srdjax.purifier import purify_bpda

INIT = ("robust", "pgd_at", "baseline")


def check_section(section) -> tuple[float, float, float]:
    """ε, step size and N-FGSM noise in [0, 1] pixel units (robust.check_section's rules), and
    the fields only this stage has."""
    check(section.init in INIT, f"purified_at.init must be one of {INIT}, got {section.init!r}")
    check(section.selector_weight >= 0, f"purified_at.selector_weight must be >= 0, got "
                                        f"{section.selector_weight}")
    check(section.attack in robust.ATTACKS,
          f"purified_at.attack must be one of {robust.ATTACKS}, got {section.attack!r}")
    check(section.step_size > 0, f"purified_at.step_size must be > 0, got {section.step_size}")
    return section.eps / 255.0, section.step_size / 255.0, float(section.noise) / 255.0


def make_adversary(graphdef, section, eps: float, step_size: float, noise: float):
    """(purifier, params, batch_stats, x, y, key) -> (x_adv, P(x_adv)) for one device's images:
    the section's attack on CE(g(P(x))) + β · margin with the BPDA gradient through P, g in
    evaluation mode (its weights frozen), then the purification g trains on."""
    beta = float(section.selector_weight)
    attack = robust.training_attack(section, eps, step_size, noise)

    def adversary(purifier, params, stats, x, y, key):
        def objective(v):
            logits, _, _ = apply_model(graphdef, params, stats, purify_bpda(purifier, v))
            value = training.cross_entropy(logits, y)
            if beta > 0:
                value = value + beta * purify_variants.nearest_margin(purifier, y, v)
            return value

        x_adv = attack(objective, x, key)
        return x_adv, jax.lax.stop_gradient(purify_bpda(purifier, x_adv))

    return adversary


def make_purified_loss(graphdef, section, purifier, mesh, eps: float, step_size: float,
                       noise: float = 0.0):
    """The per-batch loss for `training.make_train_step`: cross-entropy of g on the purified
    adversarial images. The adversary runs per device (each device's images, its own key)."""
    smoothing = float(section.label_smoothing)
    adversary = make_adversary(graphdef, section, eps, step_size, noise)

    def per_device(p, params, stats, x, y, key):
        key = jax.random.fold_in(key, jax.lax.axis_index(parallel.DATA))
        return adversary(p, params, stats, x, y, key)

    data = P(parallel.DATA)
    # The purifier goes in as an argument (replicated), not as a closed-over constant: arrays
    # laid out on the mesh cannot be indexed inside the per-device program.
    sharded = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(), P(), data, data, P()),
                            out_specs=(data, data), check_vma=False)

    def loss_fn(params, stats, x, y, extras, key):
        frozen = jax.lax.stop_gradient(params)
        _, purified = sharded(purifier, frozen, stats, x, y, key)
        logits, _, stats = apply_model(graphdef, params, stats, purified, train=True)
        ce = training.cross_entropy(logits, y, smoothing)
        metrics = {"acc": (logits.argmax(-1) == y).mean(), "ce": ce.mean()}
        return ce.mean(), (stats, metrics)

    return loss_fn
