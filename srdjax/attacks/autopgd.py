"""Auto-PGD (Croce & Hein 2020) as AutoAttack's code runs it: APGD-CE, APGD-DLR and APGD-T.

Followed line by line from the official implementation (fra31/auto-attack,
`autoattack/autopgd_base.py`), where it differs from the paper:
- start: L∞ x + eps·t/‖t‖∞ with t uniform in [-1, 1]^d, L2 x + eps·t/‖t‖₂ with t
  Gaussian (a point on the sphere), then clipped to [0, 1];
- checkpoints from the code's integer counters (`apgd_checkpoints`), not the paper's ceil(p_j N);
- condition 1 halves the step when the loss rose in at most (`<=`, the paper says `<`) rho·k of
  the k steps since the last checkpoint, where each step's loss is compared with the previous
  iterate's (not the best point's), and the first step with 0 (the code reads its unfilled last
  row of losses);
- the result per image: the last iterate that was misclassified, else x itself (`best_loss`
  returns the highest-loss point instead, as the code's `perturb(best_loss=True)`); images
  misclassified clean are not attacked (x returned); a run counts success as misclassification,
  targeted runs included;
- restarts: per image the first restart that succeeds.
Random draws are keyed per image (`ids`), where the code draws one batch from a seeded torch
generator: the same distribution, and an image's result does not depend on its batch.
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from srdjax.attacks.inputs import (_check_choice, _check_count, _check_ids, _check_inputs,
                                   _check_key)
from srdjax.attacks.loops import _apply, _compiled, _goal, _loop, _row_ids, _Step, _value_and_grad
from srdjax.attacks.norms import NORMS, _l2_size, _per_sample, row_keys
from srdjax.checks import check


def apgd_checkpoints(steps: int) -> list[int]:
    """The iterations (1-based) after which APGD may halve its step, from the official code's
    counters: a first window of max(int(0.22 N), 1) steps, each next one shorter by
    max(int(0.03 N), 1) down to max(int(0.06 N), 1). For N = 100: 22, 41, 57, 70, 80, 87, 93, 99."""
    k = max(int(0.22 * steps), 1)
    k_min, decrease = max(int(0.06 * steps), 1), max(int(0.03 * steps), 1)
    points, i = [], 0
    while i + k <= steps:
        i += k
        points.append(i)
        k = max(k - decrease, k_min)
    return points


def _start(settings, consts, key):
    """The official random start: on the ball's surface along a uniform (L∞) or Gaussian (L2)
    direction, clipped to [0, 1]."""
    norm, = settings
    x, eps, ids = consts
    if norm == "linf":
        t = jax.vmap(lambda k: jax.random.uniform(k, x.shape[1:], x.dtype, -1.0, 1.0))(
            row_keys(key, ids))
        size = jnp.max(jnp.abs(t), axis=tuple(range(1, x.ndim)), keepdims=True)
    else:
        t = jax.vmap(lambda k: jax.random.normal(k, x.shape[1:], x.dtype))(row_keys(key, ids))
        size = _l2_size(t)
    return jnp.clip(x + eps * t / (size + 1e-12), 0.0, 1.0)


@flax.struct.dataclass
class ApgdState:
    x_adv: jax.Array         # current iterate x^(k)
    x_prev: jax.Array        # the iterate the last step started from, for the momentum term
    grad: jax.Array          # gradient at x_adv
    loss_prev: jax.Array     # loss of the last iterate, which the next step's loss is compared to
    step: jax.Array          # per-image step size eta
    x_best: jax.Array        # highest-loss point so far (where a halving goes back to)
    loss_best: jax.Array
    grad_best: jax.Array
    increases: jax.Array     # steps since the last checkpoint whose loss beat the previous one's
    loss_best_at_check: jax.Array
    reduced_at_check: jax.Array
    adv: jax.Array           # the last misclassified iterate (x_adv's start until there is one)
    fooled: jax.Array


def _apgd_init(settings, goal, start):
    loss_name, _, _, _, steps = settings
    (loss0, success0), grad0 = _value_and_grad(goal.objective(loss_name))(start)
    n = start.shape[0]
    # The code compares the first step's loss with row -1 of its table of losses: still 0 then,
    # except for a 1-step run, where it is that step's own loss (never "raised").
    first = jnp.full((n,), jnp.inf if steps == 1 else 0.0, loss0.dtype)
    return ApgdState(start, start, grad0, first, jnp.full((n,), 2.0, loss0.dtype) * goal.eps,
                     start, loss0, grad0, jnp.zeros((n,), jnp.int32), loss0,
                     jnp.ones((n,), jnp.bool_), start, success0)


def _apgd_body(settings, consts, i, s):
    loss_name, norm, alpha, rho, _ = settings
    goal, at_check, length = consts
    nrm, x, eps = NORMS[norm], goal.x, goal.eps
    # The first step has no momentum; later ones mix alpha of the new step with 1 - alpha of
    # the previous move.
    a = jnp.where(i == 0, 1.0, alpha)
    z = nrm.project(s.x_adv + _per_sample(s.step, x) * nrm.direction(s.grad), x, eps)
    x_new = nrm.project(s.x_adv + a * (z - s.x_adv) + (1 - a) * (s.x_adv - s.x_prev), x, eps)
    (loss, success), grad = _value_and_grad(goal.objective(loss_name))(x_new)
    improved = loss > s.loss_best
    x_best = jnp.where(_per_sample(improved, x), x_new, s.x_best)
    grad_best = jnp.where(_per_sample(improved, x), grad, s.grad_best)
    loss_best = jnp.where(improved, loss, s.loss_best)
    increases = s.increases + (loss > s.loss_prev)
    # Halve the step and go back to the best point when the loss rose in at most rho of the
    # steps since the last checkpoint (condition 1), or when neither the step nor the best loss
    # changed since then (condition 2).
    few_increases = increases <= rho * length[i]
    stalled = ~s.reduced_at_check & (s.loss_best_at_check >= loss_best)
    check_now = at_check[i]
    reduce = check_now & (few_increases | stalled)
    back = _per_sample(reduce, x)
    return ApgdState(
        x_adv=jnp.where(back, x_best, x_new), x_prev=s.x_adv,
        grad=jnp.where(back, grad_best, grad), loss_prev=loss,
        step=jnp.where(reduce, s.step / 2, s.step), x_best=x_best, loss_best=loss_best,
        grad_best=grad_best, increases=jnp.where(check_now, 0, increases),
        loss_best_at_check=jnp.where(check_now, loss_best, s.loss_best_at_check),
        reduced_at_check=jnp.where(check_now, reduce, s.reduced_at_check),
        adv=jnp.where(_per_sample(success, x), x_new, s.adv), fooled=s.fooled | success)


def _apgd_run(goal, start, steps, settings):
    """One APGD run from `start`: its final state (adv, fooled, x_best, loss_best are read)."""
    points = apgd_checkpoints(steps)
    at_check = np.zeros(steps, bool)
    length = np.ones(steps, np.float32)
    for prev, w in zip([0] + points[:-1], points):
        at_check[w - 1], length[w - 1] = True, w - prev
    state = _apply(_apgd_init, settings, goal, start)
    step = _Step(_apgd_body, settings, (goal, jnp.asarray(at_check), jnp.asarray(length)))
    return _loop(steps, step, state)


def _keep_first(settings, carry, state):
    """Per image, the first run's success (or, with best_loss, the strictly higher loss)."""
    best_loss, = settings
    out, score = carry
    if best_loss:
        take = state.loss_best > score
        return (jnp.where(_per_sample(take, out), state.x_best, out),
                jnp.where(take, state.loss_best, score))
    take = state.fooled & (score == 0)
    return jnp.where(_per_sample(take, out), state.adv, out), jnp.where(take, 1.0, score)


def _clean_correct(settings, consts):
    fn, x, y = consts
    return jnp.argmax(fn(x), axis=-1) == y


def _finish(x, carry, correct, best_loss):
    out = carry[0] if best_loss else jnp.where(_per_sample(correct, x), carry[0], x)
    return jax.lax.stop_gradient(out.astype(x.dtype))


def _apgd_impl(fn, x, y, target, eps, key, ids, *, steps, norm, loss, restarts, alpha, rho,
               best_loss):
    goal = _goal(fn, x, y, target, eps)
    ids = _row_ids(ids, x)
    settings = (loss, norm, alpha, rho, steps)

    def body(r, carry):
        start = _apply(_start, (norm,), (x, goal.eps, ids), jax.random.fold_in(key, r))
        return _apply(_keep_first, (best_loss,), carry, _apgd_run(goal, start, steps, settings))

    n = x.shape[0]
    carry = (x, jnp.full((n,), -jnp.inf if best_loss else 0.0, jnp.float32))
    carry = _loop(restarts, body, carry)
    return _finish(x, carry, _apply(_clean_correct, (), (fn, x, y)), best_loss)


_apgd = _compiled(_apgd_impl, ("steps", "norm", "loss", "restarts", "alpha", "rho", "best_loss"))


def _check_apgd(logits_fn, x, y, eps, key, target, norm, steps, alpha, rho, ids):
    _check_inputs(logits_fn, x, y, eps, target, norm)
    _check_key(key)
    _check_count(steps, "steps")
    _check_ids(ids, jnp.shape(x)[0])
    check(0 < alpha <= 1 and 0 < rho <= 1, f"alpha and rho must lie in (0, 1], got {alpha}, {rho}")


def apgd(logits_fn, x, y, *, eps, key, steps=100, loss="ce", norm="linf", restarts=1,
         target=None, alpha=0.75, rho=0.75, best_loss=False, ids=None):
    """Auto-PGD with the CE or DLR loss (APGD-CE, APGD-DLR), as the official code runs it (see
    the module docstring): step 2·eps, momentum alpha = 0.75, the step halved at
    `apgd_checkpoints(steps)` under conditions 1 (rho = 0.75) and 2.

    Per image the result is the last misclassified iterate of the first restart that found one,
    else x (with `best_loss=True`: the point of highest loss over the restarts). With `target`
    (an extension) the loss is the targeted one (CE toward it, or targeted DLR) and success
    means reaching the target; `apgd_targeted` is APGD-T. `ids` (default 0..N-1) key each
    image's random draws.
    """
    _check_apgd(logits_fn, x, y, eps, key, target, norm, steps, alpha, rho, ids)
    _check_count(restarts, "restarts")
    _check_choice(loss, ("ce", "dlr"), "loss")
    return _apgd(logits_fn, x, y, target, eps, key, ids, steps=steps, norm=norm, loss=loss,
                 restarts=restarts, alpha=float(alpha), rho=float(rho),
                 best_loss=bool(best_loss))


def _clean_order(settings, consts):
    """Per image, the classes sorted by clean logit (ascending, stably, as torch's sort)."""
    fn, x = consts
    return jnp.argsort(fn(x), axis=-1, stable=True).astype(jnp.int32)


def _apgd_t_impl(fn, x, y, eps, key, ids, *, steps, norm, n_target_classes, alpha, rho):
    ids = _row_ids(ids, x)
    order = _apply(_clean_order, (), (fn, x))
    settings = ("dlr", norm, alpha, rho, steps)

    def body(t, carry):
        # Target t: the class ranked t + 2 by the clean logits (the code's sort(...)[:, -(t+2)]).
        target = jnp.take(order, order.shape[1] - 2 - t, axis=1)
        goal = _goal(fn, x, y, target, eps, untargeted_success=True)
        start = _apply(_start, (norm,), (x, goal.eps, ids), jax.random.fold_in(key, t))
        return _apply(_keep_first, (False,), carry, _apgd_run(goal, start, steps, settings))

    carry = (x, jnp.zeros((x.shape[0],), jnp.float32))
    carry = _loop(n_target_classes, body, carry)
    correct = jnp.take(order, order.shape[1] - 1, axis=1) == y
    return _finish(x, carry, correct, False)


_apgd_t = _compiled(_apgd_t_impl, ("steps", "norm", "n_target_classes", "alpha", "rho"))


def apgd_targets(logits_fn, x, n_target_classes=9):
    """The targets APGD-T (and FAB-T) try, in order: per image [N, n_target_classes] the classes
    ranked 2, 3, ... by the clean logits."""
    order = np.asarray(_clean_order((), (logits_fn, x)))
    return order[:, ::-1][:, 1:n_target_classes + 1]


def apgd_targeted(logits_fn, x, y, *, eps, key, norm="linf", steps=100, n_target_classes=9,
                  alpha=0.75, rho=0.75, ids=None):
    """APGD-T (Croce & Hein 2020): one APGD run on the targeted DLR loss per target class, the
    classes ranked 2 .. n_target_classes + 1 by the clean logits (`apgd_targets`), one restart
    each as in AutoAttack's standard version; per image the result of the first target that
    misclassifies it, else x. Needs at least n_target_classes + 1 classes and 4."""
    _check_apgd(logits_fn, x, y, eps, key, None, norm, steps, alpha, rho, ids)
    _check_count(n_target_classes, "n_target_classes")
    n_classes = jax.eval_shape(logits_fn, jax.ShapeDtypeStruct(jnp.shape(x), x.dtype)).shape[-1]
    check(n_classes >= max(n_target_classes + 1, 4),
          f"apgd_targeted needs at least max(n_target_classes + 1, 4) = "
          f"{max(n_target_classes + 1, 4)} classes, got logits with {n_classes}")
    return _apgd_t(logits_fn, x, y, eps, key, ids, steps=steps, norm=norm,
                   n_target_classes=n_target_classes, alpha=float(alpha), rho=float(rho))
