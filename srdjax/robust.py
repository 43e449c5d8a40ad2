"""Stage 4: the robust model — adversarial training with the latent pulled to its cluster.

For a training image x of class y whose clean baseline latent fell in cluster k(x):

    x_adv = attack(g, x, y)                   (inside the training loop, every step)
    loss  = CE(g(x_adv), y) + λ · d(z_g(x_adv), N_k(x))

per sample: every image is pulled toward *its own* cluster (uGuard pulled a whole batch toward
the first sample's class; ../shared/METHOD.md). With λ = 0 this is plain adversarial training
(Madry et al.), the comparison model `pgd_at`, trained with the same network, data, attack and
budget.

The attack inside the loop (`robust.attack`) is one of
    "pgd"      PGD with `attack_steps` steps from a random start (Madry et al. 2018);
    "fgsm_rs"  one signed-gradient step of `step_size` (1.25 ε) from a uniform start in the
               ε-ball, projected back onto it (Wong et al. 2020, "fast is better than free");
    "n_fgsm"   one signed-gradient step of `step_size` (ε) from uniform noise of half-width
               `noise` (2 ε), NOT projected back onto the ε-ball: up to 3 ε (de Jorge et al.
               2022), which keeps single-step training from catastrophic overfitting without
               the early stop FGSM-RS needs.
Single-step training can still overfit catastrophically (robust accuracy collapses within an
epoch); `CollapseGuard` watches PGD accuracy on held-out training images after every epoch.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from srdjax import attacks, parallel, training
from srdjax.checks import check
from srdjax.models import apply_model

ATTACKS = ("pgd", "fgsm_rs", "n_fgsm")


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


def _signed_step(loss_fn, start, step_size):
    """start + step_size · sign(∇ loss_fn(start)); per-sample losses are summed, so each image
    moves along its own gradient."""
    grad = jax.grad(lambda v: jnp.sum(loss_fn(v)))(start)
    return start + step_size * jnp.sign(grad)


def fgsm_rs(loss_fn, x, *, eps, step_size, key):
    """FGSM with a random start (Wong et al. 2020): δ0 ~ U[−ε, ε], one step of `step_size`
    along sign ∇, projected onto the ε-ball ∩ [0, 1]. L∞ only."""
    start = jnp.clip(x + jax.random.uniform(key, x.shape, x.dtype, -eps, eps), 0.0, 1.0)
    x_adv = _signed_step(loss_fn, start, step_size)
    return jax.lax.stop_gradient(jnp.clip(jnp.clip(x_adv, x - eps, x + eps), 0.0, 1.0))


def n_fgsm(loss_fn, x, *, noise, step_size, key):
    """N-FGSM (de Jorge et al. 2022): η ~ U[−noise, noise], one step of `step_size` along
    sign ∇ at x + η, clipped to [0, 1] only — never projected back onto the ε-ball, so
    ‖x_adv − x‖∞ ≤ noise + step_size."""
    start = jnp.clip(x + jax.random.uniform(key, x.shape, x.dtype, -noise, noise), 0.0, 1.0)
    return jax.lax.stop_gradient(jnp.clip(_signed_step(loss_fn, start, step_size), 0.0, 1.0))


def training_attack(section, eps: float, step_size: float, noise: float):
    """(loss_fn, x, key) -> x_adv: the config's attack with its budget in [0, 1] units."""
    if section.attack == "fgsm_rs":
        return lambda f, x, key: fgsm_rs(f, x, eps=eps, step_size=step_size, key=key)
    if section.attack == "n_fgsm":
        return lambda f, x, key: n_fgsm(f, x, noise=noise, step_size=step_size, key=key)
    steps = int(section.attack_steps)
    return lambda f, x, key: attacks.pgd_on_loss(f, x, eps=eps, key=key, steps=steps,
                                                 step_size=step_size)


def make_robust_loss(graphdef, section, cluster_set, eps: float, step_size: float,
                     noise: float = 0.0):
    """The per-batch loss for `training.make_train_step`; extras carry each image's cluster."""
    lam, kind, smoothing = float(section.latent_weight), section.distance, section.label_smoothing
    attack = training_attack(section, eps, step_size, noise)

    def loss_fn(params, stats, x, y, extras, key):
        # The attack sees the current weights but is not differentiated through: the model
        # is trained on the adversarial images, not on how they were found (Madry et al.).
        frozen = jax.lax.stop_gradient(params)

        def objective(x_adv):
            logits, _, _ = apply_model(graphdef, frozen, stats, x_adv)
            return training.cross_entropy(logits, y)

        x_adv = attack(objective, x, key)
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


def check_section(section) -> tuple[float, float, float]:
    """ε, step size and N-FGSM noise in [0, 1] pixel units from the config's /255 values."""
    check(section.eps >= 0, f"robust.eps must be >= 0, got {section.eps}")
    check(section.attack in ATTACKS,
          f"robust.attack must be one of {ATTACKS}, got {section.attack!r}")
    check(section.attack_steps >= 1, f"robust.attack_steps must be >= 1, got "
                                     f"{section.attack_steps}")
    check(section.step_size > 0, f"robust.step_size must be > 0, got {section.step_size}")
    noise = float(section.get("noise", 2 * section.eps))
    check(noise >= 0, f"robust.noise must be >= 0, got {noise}")
    check(section.latent_weight >= 0, f"robust.latent_weight must be >= 0, got "
                                      f"{section.latent_weight}")
    check(section.distance in ("sigma", "mahalanobis"),
          f"robust.distance must be 'sigma' or 'mahalanobis', got {section.distance!r}")
    check(int(section.get("holdout_per_class", 0)) >= 0,
          f"robust.holdout_per_class must be >= 0, got {section.get('holdout_per_class')}")
    check(0 < float(section.get("collapse_drop", 0.2)) <= 1,
          f"robust.collapse_drop must be in (0, 1], got {section.get('collapse_drop')}")
    return section.eps / 255.0, section.step_size / 255.0, noise / 255.0


def training_assignments(assignment: np.ndarray) -> np.ndarray:
    """Every training image needs a cluster, also those the cluster stage left out
    (misclassified ones): those were assigned to their own class's nearest cluster."""
    check(np.all(assignment >= 0), "every training image needs a cluster assignment")
    return assignment.astype(np.int32)


# ------------------------------------------------------------ catastrophic-overfitting check


@functools.lru_cache(maxsize=8)
def make_pgd_check(graphdef, eps: float, step_size: float, steps: int):
    """Jitted (params, batch_stats, x, y, key) -> (clean accuracy, PGD accuracy) in eval mode:
    the watch on catastrophic overfitting (Wong et al. 2020 used PGD on a training batch)."""

    def accuracy(params, stats, x, y, key):
        logits_fn = lambda v: apply_model(graphdef, params, stats, v)[0]
        x_adv = attacks.pgd(logits_fn, x, y, eps=eps, key=key, steps=steps,
                            step_size=step_size)
        clean = jnp.mean(logits_fn(x).argmax(-1) == y)
        return clean, jnp.mean(logits_fn(x_adv).argmax(-1) == y)

    return jax.jit(accuracy)


class CollapseGuard:
    """Catastrophic-overfitting check after each epoch: PGD accuracy on a fixed set of held-out
    training images. It fires when that accuracy falls more than `drop` below its best so far
    or under `floor`; training then stops and the model of the best epoch is kept (Wong et al.
    2020's early stopping). The best epoch's weights are held on the host (after a resume, the
    best of the epochs run since)."""

    def __init__(self, drop: float = 0.2, floor: float = 0.0):
        self.drop, self.floor = float(drop), float(floor)
        self.best_acc, self.best_epoch, self.best_weights = -1.0, None, None
        self.fired_at: int | None = None

    def update(self, epoch: int, acc: float, weights=None) -> bool:
        """Record `epoch`'s held-out PGD accuracy; True when training should stop."""
        if acc > self.best_acc:
            self.best_acc, self.best_epoch = float(acc), int(epoch)
            self.best_weights = None if weights is None else jax.device_get(weights)
        collapsed = acc < self.best_acc - self.drop or acc < self.floor
        if collapsed and self.fired_at is None:
            self.fired_at = int(epoch)
        return collapsed

    def summary(self) -> dict:
        return {"holdout_best_pgd_acc": self.best_acc, "holdout_best_epoch": self.best_epoch,
                "collapse_at_epoch": self.fired_at, "rolled_back": self.fired_at is not None}


def overfitting_watch(graphdef, section, eps: float, x_held, y_held, key, mesh, log):
    """`stages.train_classifier`'s watch: (per-epoch held-out clean and PGD accuracy, the stop
    rule of a `CollapseGuard`, and the weights kept: the best epoch's after a collapse)."""
    check_fn = make_pgd_check(graphdef, eps, float(section.get("check_step_size", 2.0)) / 255.0,
                              int(section.get("check_steps", 10)))
    guard = CollapseGuard(section.get("collapse_drop", 0.2), section.get("collapse_floor", 0.0))

    def more(state):
        clean, adv = check_fn(state.params, state.batch_stats, x_held, y_held, key)
        return {"holdout_clean_acc": float(clean), "holdout_pgd_acc": float(adv)}

    def stop(epoch, state, row):
        return guard.update(epoch, row["holdout_pgd_acc"],
                            {"params": state.params, "batch_stats": state.batch_stats})

    def final(state):
        summary = {**guard.summary(), "n_holdout": int(y_held.shape[0])}
        if guard.fired_at is None or guard.best_weights is None:
            return state.params, state.batch_stats, {**summary, "rolled_back": False}
        log(f"held-out PGD accuracy collapsed at epoch {guard.fired_at}; keeping epoch "
            f"{guard.best_epoch} ({guard.best_acc:.3f})")
        best = parallel.replicate(mesh, guard.best_weights)
        return best["params"], best["batch_stats"], summary

    return more, stop, final
