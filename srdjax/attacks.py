"""Adversarial attacks built from small parts: FGSM, PGD (L∞/L2), CW, APGD and Square.

As in DeepMind's adversarial_robustness/jax, an attack is an initialiser (a random start in the
ball), a step (the ascent direction of the norm), a projection (onto the ε-ball ∩ [0, 1]) and a
per-sample loss, composed and run in `jax.lax.fori_loop`, with `stop_gradient` on the result. The
same pieces serve training (`pgd_on_loss` inside a train step) and evaluation.

Every public attack is `attack(logits_fn, x, y, *, eps, key, ...)` -> adversarial images of x's
shape and dtype, inside the ε-ball around x and inside [0, 1]. `logits_fn` is any jax function
images -> logits, a bare model or a whole defense (with BPDA for its gradient). Everything is per
sample (samples never mix; `logits_fn` must treat samples independently, e.g. BatchNorm in eval
mode), so a batch sharded over devices is attacked where it lies.

Jitting: called with concrete arrays, an attack runs one compiled function cached on `logits_fn`
(by identity, so keep one function object rather than a fresh lambda per call) and on the static
settings; ε, step sizes, keys and images are traced, so new values do not recompile. On a CPU
(`LOOPS = "auto"`) it instead runs its loop from the host, one compiled step per iteration,
cached the same way (see LOOPS below for why). What a
static `logits_fn` closes over is compiled in as constants: a model whose weights change in place
(an NNX model during training) would be attacked with stale weights. Pass such weights as traced
arguments with `jax.tree_util.Partial(apply, params)` (new weights, no recompile), or call the
attack inside your own `jit`, where it inlines into the caller's trace (as a train step does).
"""
from __future__ import annotations

import contextvars
import functools
import math
from typing import Callable, NamedTuple

import chex
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jax.tree_util import Partial

from srdjax import parallel
from srdjax.checks import SrdjaxError, check, check_images, check_labels, is_concrete

# ------------------------------------------------------------ losses (larger = more adversarial)


def _logit_of(logits, labels):
    return jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]


def _best_other(logits, labels):
    """The largest logit among the classes other than `labels`."""
    mask = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.bool_)
    return jnp.max(jnp.where(mask, -jnp.inf, logits), axis=-1)


def ce_loss(logits, labels):
    return jax.nn.logsumexp(logits, axis=-1) - _logit_of(logits, labels)


def margin_loss(logits, labels, confidence=jnp.inf):
    """Carlini-Wagner: best wrong logit minus true logit, capped at `confidence`."""
    return jnp.minimum(_best_other(logits, labels) - _logit_of(logits, labels), confidence)


def dlr_loss(logits, labels):
    """Difference of logits ratio (Croce & Hein 2020): shift- and scale-invariant margin."""
    top = jnp.sort(logits, axis=-1)[:, ::-1]
    scale = top[:, 0] - top[:, 2] + 1e-12
    return (_best_other(logits, labels) - _logit_of(logits, labels)) / scale


def targeted_ce_loss(logits, target):
    return -ce_loss(logits, target)


def targeted_margin_loss(logits, target, confidence=jnp.inf):
    return jnp.minimum(_logit_of(logits, target) - _best_other(logits, target), confidence)


def targeted_dlr_loss(logits, labels, target):
    top = jnp.sort(logits, axis=-1)[:, ::-1]
    scale = top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + 1e-12
    return (_logit_of(logits, target) - _logit_of(logits, labels)) / scale


LOSSES = ("ce", "margin", "dlr")


def _objective(fn, loss, labels, target, confidence=jnp.inf):
    """x_adv -> (per-sample loss, per-sample success) for the chosen loss and goal; with
    loss="given", `fn` itself returns the per-sample loss and nothing counts as success."""
    def objective(x_adv):
        if loss == "given":
            value = fn(x_adv)
            chex.assert_shape(value, (x_adv.shape[0],))
            return value, jnp.zeros(value.shape, jnp.bool_)
        logits = fn(x_adv)
        chex.assert_shape(logits, (labels.shape[0], None))
        if loss == "dlr" and logits.shape[-1] < (3 if target is None else 4):
            raise SrdjaxError(f"the dlr loss needs at least {3 if target is None else 4} classes, "
                              f"got logits of shape {logits.shape}")
        predicted = jnp.argmax(logits, axis=-1)
        if target is None:
            value = {"ce": ce_loss, "dlr": dlr_loss,
                     "margin": functools.partial(margin_loss, confidence=confidence)}[loss]
            return value(logits, labels), predicted != labels
        value = {"ce": lambda z: targeted_ce_loss(z, target),
                 "dlr": lambda z: targeted_dlr_loss(z, labels, target),
                 "margin": lambda z: targeted_margin_loss(z, target, confidence)}[loss]
        return value(logits), predicted == target
    return objective


# ------------------------------------------------------------ norms: start, step, projection


def _per_sample(v, like):
    """Reshapes per-sample values [N] to broadcast against images [N, ...]."""
    return jnp.reshape(v, v.shape + (1,) * (like.ndim - v.ndim))


def _l2_size(v):
    return jnp.sqrt(jnp.sum(jnp.square(v), axis=tuple(range(1, v.ndim)), keepdims=True))


def _linf_project(x_adv, x, eps):
    return jnp.clip(jnp.clip(x_adv, x - eps, x + eps), 0.0, 1.0)


def _linf_init(key, x, eps):
    return _linf_project(x + jax.random.uniform(key, x.shape, x.dtype, -1.0, 1.0) * eps, x, eps)


def _l2_project(x_adv, x, eps):
    # Clipping to [0, 1] after the ball projection never leaves the ball, since x is in the box.
    delta = x_adv - x
    delta = delta * jnp.minimum(1.0, eps / (_l2_size(delta) + 1e-12))
    return jnp.clip(x + delta, 0.0, 1.0)


def _l2_init(key, x, eps):
    k_dir, k_rad = jax.random.split(key)
    direction = jax.random.normal(k_dir, x.shape, x.dtype)
    direction = direction / (_l2_size(direction) + 1e-12)
    # Uniform in the ball: radius eps * U^(1/d).
    radius = eps * jax.random.uniform(k_rad, (x.shape[0],), x.dtype) ** (1.0 / x[0].size)
    return _l2_project(x + _per_sample(radius, x) * direction, x, eps)


class Norm(NamedTuple):
    init: Callable      # (key, x, eps) -> random start in the ball ∩ [0, 1]
    direction: Callable  # gradient -> steepest-ascent direction of unit size in the norm
    project: Callable   # (x_adv, x, eps) -> point in the ball ∩ [0, 1]


NORMS = {
    "linf": Norm(_linf_init, jnp.sign, _linf_project),
    "l2": Norm(_l2_init, lambda g: g / (_l2_size(g) + 1e-12), _l2_project),
}


# ------------------------------------------------------------ the PGD loop and its bookkeeping


@flax.struct.dataclass
class Best:
    """Per sample, the best point so far: a success beats a failure, then higher loss wins.
    A point whose loss is not finite never wins (a NaN iterate must not be returned)."""
    x: jax.Array
    loss: jax.Array
    success: jax.Array

    @classmethod
    def empty(cls, x):
        n = x.shape[0]
        return cls(x, jnp.full((n,), -jnp.inf, jnp.float32), jnp.zeros((n,), jnp.bool_))

    def update(self, x, loss, success):
        loss = loss.astype(self.loss.dtype)
        finite = jnp.isfinite(loss)
        success = success & finite
        better = finite & ((success & ~self.success)
                           | ((success == self.success) & (loss > self.loss)))
        return Best(jnp.where(_per_sample(better, x), x, self.x),
                    jnp.where(better, loss, self.loss), self.success | success)

    def merge(self, other):
        return self.update(other.x, other.loss, other.success)


# How attack loops run. Inside a caller's trace (a train step, a sharded evaluation program) they
# are part of that program: `parallel.fori_loop`, unrolled on a CPU up to UNROLL_MAX iterations.
# Called with concrete arrays, an attack runs its loops from the host, one jitted step per
# iteration ("host"), or as one jitted program ("fused"). XLA's CPU backend runs loop bodies
# several times slower than the same ops at top level (jax-ml/jax#12868; PGD-10 on the quick
# config's CNN, 100 images: 7.5 s as a fori_loop, 1.6 s unrolled) and compiles long unrolled
# loops slowly (20 steps through purify: minutes), so "auto" means host loops on a CPU and fused
# programs on GPUs and TPUs, where a loop costs nothing and a dispatch does.
UNROLL_MAX = 20
LOOPS = "auto"     # "auto" | "host" | "fused"
_HOST = contextvars.ContextVar("srdjax_attack_host_loops", default=False)


def _use_host_loops() -> bool:
    check(LOOPS in ("auto", "host", "fused"),
          f"srdjax.attacks.LOOPS must be 'auto', 'host' or 'fused', got {LOOPS!r}")
    return LOOPS == "host" or (LOOPS == "auto" and jax.default_backend() == "cpu")


class _Step(NamedTuple):
    """A loop body as data: `rule(settings, consts, i, carry)`. `rule` and the hashable
    `settings` are static and `consts` a pytree of arrays, so one jitted step serves every
    iteration and every call with the same shapes."""
    rule: Callable
    settings: tuple
    consts: object

    def __call__(self, i, carry):
        return self.rule(self.settings, self.consts, i, carry)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _jit_apply(rule, settings, consts, *args):
    return rule(settings, consts, *args)


def _split_leaf(leaves):
    """The first of `leaves` split along its first axis over a mesh of several devices."""
    return next((leaf for leaf in leaves if parallel.rows_mesh(leaf) is not None), None)


@functools.lru_cache(maxsize=None)
def _per_device_rule(rule, settings, treedef, specs, mesh):
    """rule as one program run on every device's part of the batch (every result is per
    sample). Plain jit over the sharded batch (GSPMD) was slower through purify: PGD-10 on 100
    images, purify → baseline, 24.1 s against 19.4 s in an ad-hoc timing on 2 CPU devices."""
    def per_device(*leaves):
        consts, args = jax.tree.unflatten(treedef, leaves)
        return rule(settings, consts, *args)
    return jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=specs,
                                 out_specs=P(mesh.axis_names[0]), check_vma=False))


def _host_apply(rule, settings, consts, *args):
    leaves, treedef = jax.tree.flatten((consts, args))
    split = _split_leaf(leaves)
    if split is None:
        return _jit_apply(rule, settings, consts, *args)
    mesh, batch = split.sharding.mesh, split.shape[0]
    n_consts = len(jax.tree.leaves(consts))

    def spec(index, leaf):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh == mesh:
            return sharding.spec
        # Loop carries made on the host (e.g. Best.empty) are per sample: split them too.
        per_sample = index >= n_consts and jnp.ndim(leaf) >= 1 and leaf.shape[0] == batch
        return P(mesh.axis_names[0]) if per_sample else P()

    specs = tuple(spec(i, leaf) for i, leaf in enumerate(leaves))
    return _per_device_rule(rule, settings, treedef, specs, mesh)(*leaves)


def _apply(rule, settings, consts, *args):
    """rule(settings, consts, *args): jitted on its own in host mode, inline otherwise."""
    if _HOST.get():
        return _host_apply(rule, settings, consts, *args)
    return rule(settings, consts, *args)


def _loop(n: int, body, carry):
    """`n` iterations of body(i, carry): from the host in host mode (a `_Step` jitted once; any
    other body, which must only compose `_apply`s, `_loop`s and cheap ops, called as it is), else
    as one loop of the traced program."""
    if _HOST.get() and all(is_concrete(leaf) for leaf in jax.tree.leaves(carry)):
        for i in range(n):
            i = jnp.asarray(i, jnp.int32)
            carry = (_host_apply(body.rule, body.settings, body.consts, i, carry)
                     if isinstance(body, _Step) else body(i, carry))
        return carry
    # (fori_loop keeps a weak reference to its body, which a _Step, a tuple, cannot give.)
    return parallel.fori_loop(n, lambda i, c: body(i, c), carry, unroll_max=UNROLL_MAX)


def _value_and_grad(objective):
    """x -> ((per-sample loss, success), gradient of each sample's loss w.r.t. its own input)."""
    def summed(x):
        loss, success = objective(x)
        return jnp.sum(loss), (loss, success)
    grad_fn = jax.value_and_grad(summed, has_aux=True)

    def call(x):
        (_, aux), grad = grad_fn(x)
        return aux, grad
    return call


class _Goal(NamedTuple):
    """What a gradient attack maximises and where: `_objective`'s arguments and the ball."""
    fn: Callable
    x: jax.Array
    y: jax.Array | None
    target: jax.Array | None
    eps: jax.Array
    confidence: jax.Array

    def objective(self, loss):
        return _objective(self.fn, loss, self.y, self.target, self.confidence)


def _goal(fn, x, y, target, eps, confidence=jnp.inf):
    return _Goal(fn, x, y, target, jnp.asarray(eps, x.dtype), jnp.asarray(confidence, jnp.float32))


def _as_pytree(fn):
    """`fn` as a pytree whose function part is static: a Partial as it is, else Partial(fn)."""
    return fn if isinstance(fn, Partial) else Partial(fn)


def _pgd_body(settings, consts, i, carry):
    loss, norm = settings
    goal, step_size = consts
    nrm = NORMS[norm]
    x_adv, best = carry
    (value, success), grad = _value_and_grad(goal.objective(loss))(x_adv)
    best = best.update(x_adv, value, success)
    return nrm.project(x_adv + step_size * nrm.direction(grad), goal.x, goal.eps), best


def _pgd_last(settings, goal, carry):
    x_adv, best = carry
    return best.update(x_adv, *goal.objective(settings[0])(x_adv))


def _pgd_run(goal, start, step_size, steps, loss, norm):
    """One PGD run from `start`; returns the best point visited (the start included)."""
    settings = (loss, norm)
    carry = _loop(steps, _Step(_pgd_body, settings, (goal, step_size)),
                  (start, Best.empty(goal.x)))
    return _apply(_pgd_last, settings, goal, carry)


def _restarts(run, x, key, restarts, random_start, norm, eps):
    """Runs `run(start)` from `restarts` starts, keeping per sample the best result."""
    nrm = NORMS[norm]

    def body(r, best):
        start = nrm.init(jax.random.fold_in(key, r), x, eps) if random_start else x
        return best.merge(run(start))
    best = _loop(restarts, body, Best.empty(x))
    return jax.lax.stop_gradient(best.x.astype(x.dtype))


# ------------------------------------------------------------ compiled entry points


def _compiled(impl, static):
    """Calls `impl(fn, ...)`: inlined when called inside another trace; with concrete arrays,
    from the host with jitted steps (host loops, see LOOPS), or as one jitted program with `fn`
    static (cached by identity) or traced when it is a `jax.tree_util.Partial`."""
    by_identity = jax.jit(impl, static_argnames=("fn",) + static)
    by_value = jax.jit(impl, static_argnames=static)

    def call(fn, *args, **kwargs):
        if not all(is_concrete(leaf) for leaf in jax.tree.leaves((fn, args, kwargs))):
            return impl(fn, *args, **kwargs)
        if _use_host_loops():
            token = _HOST.set(True)
            try:
                return impl(_as_pytree(fn), *args, **kwargs)
            finally:
                _HOST.reset(token)
        return (by_value if isinstance(fn, Partial) else by_identity)(fn, *args, **kwargs)
    return call


def _fgsm_rule(settings, goal):
    nrm = NORMS[settings[0]]
    (_, _), grad = _value_and_grad(goal.objective("ce"))(goal.x)
    return nrm.project(goal.x + goal.eps * nrm.direction(grad), goal.x, goal.eps)


def _fgsm_impl(fn, x, y, target, eps, *, norm):
    adv = _apply(_fgsm_rule, (norm,), _goal(fn, x, y, target, eps))
    return jax.lax.stop_gradient(adv.astype(x.dtype))


def _pgd_impl(fn, x, y, target, eps, step_size, confidence, key, *, steps, norm, loss, restarts,
              random_start):
    goal = _goal(fn, x, y, target, eps, confidence)
    step_size = jnp.asarray(step_size, x.dtype)
    run = lambda start: _pgd_run(goal, start, step_size, steps, loss, norm)
    return _restarts(run, x, key, restarts, random_start, norm, goal.eps)


_fgsm = _compiled(_fgsm_impl, ("norm",))
_pgd = _compiled(_pgd_impl, ("steps", "norm", "loss", "restarts", "random_start"))


# ------------------------------------------------------------ boundary checks


def _check_number(value, name, minimum=0.0):
    if is_concrete(value):
        v = float(np.asarray(value))
        check(np.ndim(value) == 0 and math.isfinite(v) and v >= minimum,
              f"{name} must be a finite number >= {minimum:g}, got {value!r}")


def _check_count(value, name):
    check(isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1,
          f"{name} must be an integer >= 1, got {value!r}")


def _check_choice(value, choices, name):
    check(value in choices, f"unknown {name} {value!r}; expected one of {sorted(choices)}")


def _check_key(key):
    check(key is not None, "key must be a jax.random key, got None")


def _check_inputs(logits_fn, x, y, eps, target=None, norm="linf"):
    check(callable(logits_fn), f"logits_fn must be a callable images -> logits, got "
                               f"{type(logits_fn).__name__}")
    check_images(x, "images", channels=None)
    check_labels(y, jnp.shape(x)[0], name="labels")
    if target is not None:
        check_labels(target, jnp.shape(x)[0], name="target labels")
    _check_number(eps, "eps")
    _check_choice(norm, NORMS, "norm")


# ------------------------------------------------------------ FGSM, PGD, CW


def fgsm(logits_fn, x, y, *, eps, key=None, norm="linf", target=None):
    """One step of size eps along the sign (L∞) or normalised (L2) gradient of the CE loss
    (Goodfellow et al. 2015); toward `target` when given. `key` is unused (kept for the common
    call signature)."""
    _check_inputs(logits_fn, x, y, eps, target, norm)
    return _fgsm(logits_fn, x, y, target, eps, norm=norm)


def pgd(logits_fn, x, y, *, eps, key, steps=20, step_size=None, norm="linf", loss="ce",
        restarts=1, random_start=True, target=None, confidence=float("inf")):
    """Projected gradient ascent on `loss` (Madry et al. 2018) under the L∞ or L2 ball.

    step_size defaults to 2.5 * eps / steps. Each of `restarts` runs starts at a random point of the
    ball (or at x without `random_start`); per sample the result is the best point visited over
    all runs: a successful one (misclassified, or classified as `target`) if any, else the one
    with the highest loss.
    """
    _check_inputs(logits_fn, x, y, eps, target, norm)
    _check_key(key)
    _check_count(steps, "steps")
    _check_count(restarts, "restarts")
    _check_choice(loss, LOSSES, "loss")
    step_size = 2.5 * eps / steps if step_size is None else step_size
    _check_number(step_size, "step_size")
    return _pgd(logits_fn, x, y, target, eps, step_size, confidence, key, steps=steps, norm=norm,
                loss=loss, restarts=restarts, random_start=random_start)


def cw(logits_fn, x, y, *, eps, key, steps=30, step_size=None, confidence=50.0, norm="linf",
       restarts=1, random_start=True, target=None):
    """PGD on the Carlini-Wagner margin loss (best wrong logit minus true logit, capped at
    `confidence`): the 'CW∞' attack of Madry et al. and the robustness benchmarks."""
    return pgd(logits_fn, x, y, eps=eps, key=key, steps=steps, step_size=step_size, norm=norm,
               loss="margin", restarts=restarts, random_start=random_start, target=target,
               confidence=confidence)


def pgd_on_loss(loss_fn, x, *, eps, key, steps=10, step_size=None, norm="linf",
                random_start=True):
    """Maximises an arbitrary per-sample loss `loss_fn(x_adv) -> [N]` by PGD in the eps-ball.

    The building block for adversarial training with a custom loss and for attacks on internal
    quantities (e.g. pushing a latent toward a wrong cluster). Returns per sample the visited
    point of highest loss, with stop_gradient.
    """
    check(callable(loss_fn), f"loss_fn must be a callable images -> [N] losses, got "
                             f"{type(loss_fn).__name__}")
    check_images(x, "images", channels=None)
    _check_number(eps, "eps")
    _check_key(key)
    _check_choice(norm, NORMS, "norm")
    _check_count(steps, "steps")
    step_size = 2.5 * eps / steps if step_size is None else step_size
    _check_number(step_size, "step_size")
    return _pgd(loss_fn, x, None, None, eps, step_size, jnp.inf, key, steps=steps, norm=norm,
                loss="given", restarts=1, random_start=random_start)


# ------------------------------------------------------------ APGD (Croce & Hein 2020)


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


def _apgd_impl(fn, x, y, target, eps, key, *, steps, norm, loss, restarts, random_start, alpha,
               rho):
    goal = _goal(fn, x, y, target, eps)
    run = lambda start: _apgd_run(goal, start, steps, (loss, norm, alpha, rho))
    return _restarts(run, x, key, restarts, random_start, norm, goal.eps)


_apgd = _compiled(_apgd_impl, ("steps", "norm", "loss", "restarts", "random_start", "alpha", "rho"))


def apgd(logits_fn, x, y, *, eps, key, steps=100, loss="ce", norm="linf", restarts=1,
         random_start=True, target=None, alpha=0.75, rho=0.75):
    """Auto-PGD (Croce & Hein 2020, Algorithm 1) with the CE or DLR loss.

    Step size starts at 2 eps; momentum weight alpha = 0.75; at the checkpoints of
    `apgd_checkpoints(steps)` the per-sample step is halved and the iterate reset to the best
    point when fewer than rho = 0.75 of the steps since the last checkpoint raised the loss, or
    when neither the step nor the best loss changed since then. Per sample the result is a
    successful point if one was visited, else the point of highest loss. (Condition 1 uses the
    paper's strict '<'; AutoAttack's code uses '<='.)
    """
    _check_inputs(logits_fn, x, y, eps, target, norm)
    _check_key(key)
    _check_count(steps, "steps")
    _check_count(restarts, "restarts")
    _check_choice(loss, ("ce", "dlr"), "loss")
    check(0 < alpha <= 1 and 0 < rho <= 1, f"alpha and rho must lie in (0, 1], got {alpha}, {rho}")
    return _apgd(logits_fn, x, y, target, eps, key, steps=steps, norm=norm, loss=loss,
                 restarts=restarts, random_start=random_start, alpha=float(alpha), rho=float(rho))


# ------------------------------------------------------------ Square (Andriushchenko et al. 2020)

# Fraction of the budget used (in 1/10000) -> divisor of p_init, the original schedule.
_P_SCHEDULE = ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64),
               (6000, 128), (8000, 256), (10000, 512))


def square_sizes(n_queries: int, p_init: float, height: int, width: int) -> np.ndarray:
    """Side of the square changed at each query after the first: sqrt(p * H * W), p halving on the
    original schedule, at least 1 and less than the image side."""
    sizes = []
    for it in range(n_queries - 1):
        t = int(it / n_queries * 10000)
        p = p_init / next(div for bound, div in _P_SCHEDULE if t <= bound)
        sizes.append(min(max(int(round(math.sqrt(p * height * width))), 1), min(height, width) - 1))
    return np.asarray(sizes, np.int32).reshape(-1)


class _SquareGoal(NamedTuple):
    fn: Callable
    x: jax.Array
    y: jax.Array
    target: jax.Array | None
    eps: jax.Array
    key: jax.Array
    sizes: jax.Array      # the window side of each proposal
    ids: jax.Array        # each row's index in the batch: its random draws are keyed by it


# Host loops re-batch Square every this many queries to the rows not yet fooled: a fooled row
# (margin <= 0) never changes again, so querying it is wasted (most of the cost on a CPU once
# half the batch is fooled). Draws are keyed per row, so the images are those of one batch.
SQUARE_COMPACT_EVERY = 50


def _square_margin(g: _SquareGoal, u):
    """Below zero = success; the attack minimises it."""
    logits = g.fn(u)
    chex.assert_shape(logits, (g.x.shape[0], None))
    if g.target is None:
        return _logit_of(logits, g.y) - _best_other(logits, g.y)
    return _best_other(logits, g.target) - _logit_of(logits, g.target)


def _square_init(settings, g, key):
    # Start: vertical stripes of +-eps, kept only where they beat the clean image.
    x = g.x
    _, _, w, c = x.shape
    signs = jax.vmap(lambda r: jax.random.rademacher(jax.random.fold_in(key, r), (1, w, c),
                                                     x.dtype))(g.ids)
    stripes = jnp.clip(x + g.eps * signs, 0.0, 1.0)
    m_clean, m_stripes = _square_margin(g, x), _square_margin(g, stripes)
    use = m_stripes < m_clean
    return jnp.where(_per_sample(use, x), stripes, x), jnp.where(use, m_stripes, m_clean)


def _square_body(settings, g, i, carry):
    best, m_best = carry
    x, eps = g.x, g.eps
    n, h, w, c = x.shape
    rows = jnp.arange(h)[None, :, None, None]
    cols = jnp.arange(w)[None, None, :, None]
    channel_bits = jnp.arange(min(c, 30))
    s = g.sizes[i]
    step_key = jax.random.fold_in(g.key, i)

    def draws(row):
        k_top, k_left, k_sign, k_flip = jax.random.split(jax.random.fold_in(step_key, row), 4)
        return (jax.random.randint(k_top, (), 0, h - s + 1),
                jax.random.randint(k_left, (), 0, w - s + 1),
                jax.random.rademacher(k_sign, (c,), x.dtype),
                jax.random.randint(k_flip, (), 1, 2 ** channel_bits.size))

    top, left, signs, pattern = jax.vmap(draws)(g.ids)
    top, left = top[:, None, None, None], left[:, None, None, None]
    window = (rows >= top) & (rows < top + s) & (cols >= left) & (cols < left + s)
    signs = signs[:, None, None, :]
    proposal = lambda sg: jnp.where(window, jnp.clip(x + eps * sg, 0.0, 1.0), best)
    # A draw that leaves the window as it is wastes a query: redraw among the other sign
    # patterns (flip a random non-empty subset of channels), as the original's rejection loop.
    same = jnp.all(jnp.where(window, jnp.abs(proposal(signs) - best) < 1e-7, True),
                   axis=(1, 2, 3))
    flips = 1 - 2 * ((pattern[:, None] >> channel_bits) & 1)
    flips = jnp.pad(flips, ((0, 0), (0, c - channel_bits.size)), constant_values=1)
    signs = jnp.where(_per_sample(same, signs), signs * flips[:, None, None, :], signs)
    candidate = proposal(signs)
    m_new = _square_margin(g, candidate)
    accept = (m_new < m_best) & (m_best > 0)
    return (jnp.where(_per_sample(accept, x), candidate, best),
            jnp.where(accept, m_new, m_best))


def _rows_like(values: np.ndarray, x):
    """Host rows [n, ...] placed on the devices as x's rows are (x's first axis split)."""
    sharding = getattr(x, "sharding", None)
    if not isinstance(sharding, NamedSharding):
        return jax.device_put(values, sharding) if sharding is not None else jnp.asarray(values)
    spec = P(*sharding.spec[:1])
    target = NamedSharding(sharding.mesh, spec)
    return jax.make_array_from_callback(values.shape, target, lambda index: values[index])


def _square_host(g: _SquareGoal, carry, n_steps: int):
    """The query loop from the host, re-batched to the unfooled rows every SQUARE_COMPACT_EVERY
    queries (sizes rounded up to eighths of the batch, so few shapes compile; padding repeats a
    row, whose copies evolve identically). One process only: the rows are gathered on the host."""
    n, parts = g.x.shape[0], parallel.row_parts(g.x)
    quantum = -(-max(1, -(-n // 8)) // parts) * parts
    host = {name: np.asarray(getattr(g, name)) for name in ("x", "y", "target", "ids")
            if getattr(g, name) is not None}
    best, margin = np.array(carry[0]), np.array(carry[1])
    rows, real, sub_g = np.arange(n), n, g
    i = 0
    while i < n_steps:
        for j in range(i, min(i + SQUARE_COMPACT_EVERY, n_steps)):
            carry = _host_apply(_square_body, (), sub_g, jnp.asarray(j, jnp.int32), carry)
        i = min(i + SQUARE_COMPACT_EVERY, n_steps)
        best[rows[:real]] = np.asarray(carry[0])[:real]
        margin[rows[:real]] = np.asarray(carry[1])[:real]
        active = np.nonzero(margin > 0)[0]
        if i >= n_steps or active.size == 0:
            break
        size = -(-active.size // quantum) * quantum
        if size >= len(rows):
            continue
        rows, real = np.concatenate([active, np.full(size - active.size, active[-1])]), active.size
        sub_g = g._replace(**{name: _rows_like(v[rows], g.x) for name, v in host.items()})
        carry = (_rows_like(best[rows], g.x), _rows_like(margin[rows], g.x))
    return _rows_like(best, g.x)


def _square_impl(fn, x, y, target, eps, key, *, n_queries, p_init):
    n, h, w, _ = x.shape
    k_init, k_loop = jax.random.split(key)
    # One spare entry so that a budget of one query still traces the (never run) loop body.
    sizes = jnp.asarray(np.append(square_sizes(n_queries, p_init, h, w), 1))
    host = _HOST.get() and is_concrete(x)
    ids = (_rows_like(np.arange(n, dtype=np.int32), x) if host
           else jnp.arange(n, dtype=jnp.int32))
    g = _SquareGoal(fn, x, y, target, jnp.asarray(eps, x.dtype), k_loop, sizes, ids)
    carry = _apply(_square_init, (), g, k_init)
    if host and jax.process_count() == 1:
        best = _square_host(g, carry, n_queries - 1)
    else:
        best, _ = _loop(n_queries - 1, _Step(_square_body, (), g), carry)
    return jax.lax.stop_gradient(best.astype(x.dtype))


_square = _compiled(_square_impl, ("n_queries", "p_init"))


def square(logits_fn, x, y, *, eps, key, n_queries=1000, p_init=0.8, target=None):
    """L∞ Square attack: gradient-free random search with the margin loss.

    Starts from vertical stripes of +-eps (one query; kept per sample only if it lowers the margin
    of the clean image, which costs one more query), then proposes per sample a square window of
    side sqrt(p * H * W) set to x +- eps with one random sign per channel, accepted if it lowers
    the margin; samples already misclassified (or at `target`) stop changing. p starts at p_init
    (0.05 in the paper, 0.8 in AutoAttack's tuning for CIFAR-10, the default here) and halves on
    the original schedule. `n_queries` counts the start and the proposals.
    """
    _check_inputs(logits_fn, x, y, eps, target)
    _check_key(key)
    _check_count(n_queries, "n_queries")
    check(0 < p_init <= 1, f"p_init must lie in (0, 1], got {p_init!r}")
    shape = jnp.shape(x)
    check(min(shape[1], shape[2]) >= 2, f"square needs images of at least 2x2 pixels, got {shape}")
    return _square(logits_fn, x, y, target, eps, key, n_queries=n_queries, p_init=float(p_init))


# ------------------------------------------------------------ registry

ATTACKS = {
    "fgsm": functools.partial(fgsm),
    "pgd20": functools.partial(pgd, steps=20, restarts=1),
    "pgd100": functools.partial(pgd, steps=100, restarts=2),
    "cw": functools.partial(cw, steps=30),
    "apgd-ce": functools.partial(apgd, loss="ce", steps=100),
    "apgd-dlr": functools.partial(apgd, loss="dlr", steps=100),
    "square": functools.partial(square, n_queries=1000),
}


def attack_by_name(name: str, **overrides) -> Callable:
    """The attack registered as `name`, called as attack(logits_fn, x, y, *, eps, key); keyword
    `overrides` replace its settings (e.g. attack_by_name("pgd20", norm="l2", restarts=5))."""
    check(name in ATTACKS, f"unknown attack {name!r}; known attacks: {', '.join(ATTACKS)}")
    base = ATTACKS[name]
    return functools.partial(base.func, *base.args, **{**base.keywords, **overrides})
