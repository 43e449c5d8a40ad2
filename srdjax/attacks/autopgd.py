"""Auto-PGD (Croce & Hein 2020): PGD with momentum and a step size halved at checkpoints."""
from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from srdjax.attacks.inputs import (_check_choice, _check_count, _check_ids, _check_inputs,
                                   _check_key)
from srdjax.attacks.loops import (Best, _apply, _compiled, _goal, _loop, _restarts, _row_ids,
                                  _Step, _value_and_grad)
from srdjax.attacks.norms import NORMS, _per_sample
from srdjax.checks import check


def apgd_checkpoints(steps: int) -> list[int]:
    """Iterations w_j = ceil(p_j * steps) at which APGD may halve its step:
    p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)."""
    p = [0.0, 0.22]
    while p[-1] < 1.0:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    points = []
    for pj in p[1:]:
        w = math.ceil(round(pj * steps, 9))
        if w <= steps and (not points or w > points[-1]):
            points.append(w)
    return points


@flax.struct.dataclass
class ApgdState:
    x_adv: jax.Array         # current iterate x^(k)
    x_prev: jax.Array        # x^(k-1), for the momentum term
    grad: jax.Array          # gradient at x_adv
    loss: jax.Array          # loss at x_adv
    step: jax.Array          # per-sample step size eta
    x_max: jax.Array         # highest-loss point so far (the restart point)
    loss_max: jax.Array
    grad_max: jax.Array
    increases: jax.Array     # steps since the last checkpoint that raised the loss
    loss_max_at_check: jax.Array
    reduced_at_check: jax.Array
    out: Best                # what is returned: a success if any, else highest loss


def _apgd_init(settings, goal, start):
    loss, _, _, _ = settings
    (loss0, success0), grad0 = _value_and_grad(goal.objective(loss))(start)
    n = start.shape[0]
    return ApgdState(start, start, grad0, loss0, jnp.full((n,), 2.0, loss0.dtype) * goal.eps,
                     start, loss0, grad0, jnp.zeros((n,), jnp.int32), loss0,
                     jnp.ones((n,), jnp.bool_), Best.empty(goal.x).update(start, loss0, success0))


def _apgd_body(settings, consts, i, s):
    loss_name, norm, alpha, rho = settings
    goal, at_check, length = consts
    nrm, x, eps = NORMS[norm], goal.x, goal.eps
    # The first step has no momentum; later ones mix alpha of the new step with 1 - alpha of
    # the previous move.
    a = jnp.where(i == 0, 1.0, alpha)
    z = nrm.project(s.x_adv + _per_sample(s.step, x) * nrm.direction(s.grad), x, eps)
    x_new = nrm.project(s.x_adv + a * (z - s.x_adv) + (1 - a) * (s.x_adv - s.x_prev), x, eps)
    (loss, success), grad = _value_and_grad(goal.objective(loss_name))(x_new)
    improved = loss > s.loss_max
    x_max = jnp.where(_per_sample(improved, x), x_new, s.x_max)
    grad_max = jnp.where(_per_sample(improved, x), grad, s.grad_max)
    loss_max = jnp.where(improved, loss, s.loss_max)
    increases = s.increases + (loss > s.loss)
    # Halve the step and go back to the best point when too few steps raised the loss
    # (condition 1), or when neither step nor best loss changed since the last checkpoint.
    few_increases = increases < rho * length[i]
    stalled = ~s.reduced_at_check & (s.loss_max_at_check >= loss_max)
    reduce = at_check[i] & (few_increases | stalled)
    back = _per_sample(reduce, x)
    return ApgdState(
        x_adv=jnp.where(back, x_max, x_new), x_prev=s.x_adv,
        grad=jnp.where(back, grad_max, grad), loss=jnp.where(reduce, loss_max, loss),
        step=jnp.where(reduce, s.step / 2, s.step), x_max=x_max, loss_max=loss_max,
        grad_max=grad_max, increases=jnp.where(at_check[i], 0, increases),
        loss_max_at_check=jnp.where(at_check[i], loss_max, s.loss_max_at_check),
        reduced_at_check=jnp.where(at_check[i], reduce, s.reduced_at_check),
        out=s.out.update(x_new, loss, success))


def _apgd_run(goal, start, steps, settings):
    points = apgd_checkpoints(steps)
    at_check = np.zeros(steps, bool)
    length = np.ones(steps, np.float32)
    for prev, w in zip([0] + points[:-1], points):
        at_check[w - 1], length[w - 1] = True, w - prev
    state = _apply(_apgd_init, settings, goal, start)
    step = _Step(_apgd_body, settings, (goal, jnp.asarray(at_check), jnp.asarray(length)))
    return _loop(steps, step, state).out


def _apgd_impl(fn, x, y, target, eps, key, ids, *, steps, norm, loss, restarts, random_start,
               alpha, rho):
    goal = _goal(fn, x, y, target, eps)
    run = lambda start: _apgd_run(goal, start, steps, (loss, norm, alpha, rho))
    return _restarts(run, x, key, restarts, random_start, norm, goal.eps, _row_ids(ids, x))


_apgd = _compiled(_apgd_impl, ("steps", "norm", "loss", "restarts", "random_start", "alpha", "rho"))


def apgd(logits_fn, x, y, *, eps, key, steps=100, loss="ce", norm="linf", restarts=1,
         random_start=True, target=None, alpha=0.75, rho=0.75, ids=None):
    """Auto-PGD (Croce & Hein 2020, Algorithm 1) with the CE or DLR loss.

    Step size starts at 2 eps; momentum weight alpha = 0.75; at the checkpoints of
    `apgd_checkpoints(steps)` the per-sample step is halved and the iterate reset to the best
    point when fewer than rho = 0.75 of the steps since the last checkpoint raised the loss, or
    when neither the step nor the best loss changed since then. Per sample the result is a
    successful point if one was visited, else the point of highest loss. (Condition 1 uses the
    paper's strict '<'; AutoAttack's code uses '<='.)
    """
    _check_inputs(logits_fn, x, y, eps, target, norm)
    _check_ids(ids, jnp.shape(x)[0])
    _check_key(key)
    _check_count(steps, "steps")
    _check_count(restarts, "restarts")
    _check_choice(loss, ("ce", "dlr"), "loss")
    check(0 < alpha <= 1 and 0 < rho <= 1, f"alpha and rho must lie in (0, 1], got {alpha}, {rho}")
    return _apgd(logits_fn, x, y, target, eps, key, ids, steps=steps, norm=norm, loss=loss,
                 restarts=restarts, random_start=random_start, alpha=float(alpha), rho=float(rho))
