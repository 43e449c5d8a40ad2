"""Stage 4: the robust model — adversarial training with the latent pulled to its cluster.

For a training image x of class y whose clean baseline latent fell in cluster k(x):

    x_adv = PGD(g, x, y)                      (inside the training loop, every step)
    loss  = CE(g(x_adv), y) + λ · d(z_g(x_adv), N_k(x))

per sample: every image is pulled toward *its own* cluster (uGuard pulled a whole batch toward
the first sample's class; ../shared/METHOD.md). With λ = 0 this is plain PGD adversarial
training (Madry et al.), the comparison model `pgd_at`, trained with the same network, data,
attack and budget.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from srdjax import attacks, training
from srdjax.checks import check
from srdjax.models import apply_model


def latent_loss(z, cluster_set, assigned, kind: str = "sigma"):
    """d(z_i, N_{assigned_i}) / dim per sample: [N].

    The distances of `srdjax.clusters` (σ-normalised or Mahalanobis) divided by the latent
    dimension, so a point typical of its cluster scores about 1 whatever the network's width
    and λ = 0.3 weighs it against the cross-entropy as uGuard's does; summed over 128 or 512
    dimensions it would outweigh the classification loss a hundredfold."""
    mu = cluster_set.means[assigned]
    diff = z - mu
    if kind == "sigma":
        d = jnp.sum((diff / cluster_set.stds[assigned]) ** 2, axis=-1)
    else:
        d = jnp.einsum("bd,bde,be->b", diff, cluster_set.precisions[assigned], diff)
    return d / z.shape[-1]


def make_robust_loss(graphdef, section, cluster_set, eps: float, step_size: float):
    """The per-batch loss for `training.make_train_step`; extras carry each image's cluster."""
    lam, kind, smoothing = float(section.latent_weight), section.distance, section.label_smoothing
    steps = int(section.attack_steps)

    def loss_fn(params, stats, x, y, extras, key):
        # The attack sees the current weights but is not differentiated through: the model
        # is trained on the adversarial images, not on how they were found (Madry et al.).
        frozen = jax.lax.stop_gradient(params)

        def objective(x_adv):
            logits, _, _ = apply_model(graphdef, frozen, stats, x_adv)
            return training.cross_entropy(logits, y)

        x_adv = attacks.pgd_on_loss(objective, x, eps=eps, key=key, steps=steps,
                                    step_size=step_size)
        logits, z, stats = apply_model(graphdef, params, stats, x_adv, train=True)
        ce = training.cross_entropy(logits, y, smoothing)
        metrics = {"acc": (logits.argmax(-1) == y).mean(), "ce": ce.mean()}
        loss = ce
        if lam > 0:
            d = latent_loss(z, cluster_set, extras["cluster"], kind)
            loss = ce + lam * d
            metrics["latent_distance"] = d.mean()
        return loss.mean(), (stats, metrics)

    return loss_fn


def check_section(section) -> tuple[float, float]:
    """ε and step size in [0, 1] pixel units from the config's /255 values."""
    check(section.eps >= 0, f"robust.eps must be >= 0, got {section.eps}")
    check(section.attack_steps >= 1, f"robust.attack_steps must be >= 1, got "
                                     f"{section.attack_steps}")
    check(section.latent_weight >= 0, f"robust.latent_weight must be >= 0, got "
                                      f"{section.latent_weight}")
    check(section.distance in ("sigma", "mahalanobis"),
          f"robust.distance must be 'sigma' or 'mahalanobis', got {section.distance!r}")
    check(section.attack == "pgd", f"robust.attack must be 'pgd' (PGD inside the loop), got "
                                   f"{section.attack!r}")
    return section.eps / 255.0, section.step_size / 255.0


def training_assignments(assignment: np.ndarray) -> np.ndarray:
    """Every training image needs a cluster, also those the cluster stage left out
    (misclassified ones): those were assigned to their own class's nearest cluster."""
    check(np.all(assignment >= 0), "every training image needs a cluster assignment")
    return assignment.astype(np.int32)
