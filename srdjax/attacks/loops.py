"""How attacks run: the per-sample `Best` bookkeeping, the loop machinery (host loops or one
compiled program, see LOOPS), the gradient of a per-sample objective, restarts, and `_compiled`,
which turns an attack's implementation into its jitted entry point."""
from __future__ import annotations

import contextvars
import functools
from typing import Callable, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jax.tree_util import Partial

from srdjax import parallel
from srdjax.attacks.losses import _objective
from srdjax.attacks.norms import NORMS, _per_sample, row_keys
from srdjax.checks import check, is_concrete


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
    reach: jax.Array | None     # success = predicted as reach; None: success = misclassified

    def objective(self, loss):
        return _objective(self.fn, loss, self.y, self.target, self.confidence, self.reach)


def _goal(fn, x, y, target, eps, confidence=jnp.inf, *, untargeted_success=False):
    """With a target, success means reaching it, or with `untargeted_success` (APGD-T) being
    misclassified."""
    return _Goal(fn, x, y, target, jnp.asarray(eps, x.dtype), jnp.asarray(confidence, jnp.float32),
                 None if untargeted_success else target)


def _as_pytree(fn):
    """`fn` as a pytree whose function part is static: a Partial as it is, else Partial(fn)."""
    return fn if isinstance(fn, Partial) else Partial(fn)


def _random_start(settings, consts, key):
    norm, = settings
    x, eps, ids = consts
    return NORMS[norm].init(row_keys(key, ids), x, eps)


def _restarts(run, x, key, restarts, random_start, norm, eps, ids):
    """Runs `run(start)` from `restarts` starts, keeping per sample the best result; image i's
    start r is drawn from fold_in(fold_in(key, r), ids[i])."""
    def body(r, best):
        start = (_apply(_random_start, (norm,), (x, eps, ids), jax.random.fold_in(key, r))
                 if random_start else x)
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


def _rows_like(values: np.ndarray, x):
    """Host rows [n, ...] placed on the devices as x's rows are (x's first axis split)."""
    sharding = getattr(x, "sharding", None)
    if not isinstance(sharding, NamedSharding):
        return jax.device_put(values, sharding) if sharding is not None else jnp.asarray(values)
    spec = P(*sharding.spec[:1])
    target = NamedSharding(sharding.mesh, spec)
    return jax.make_array_from_callback(values.shape, target, lambda index: values[index])


def _row_ids(ids, x):
    """Each image's id [N] (default 0..N-1) as int32, placed on the devices as x's rows."""
    if ids is None:
        ids = np.arange(x.shape[0], dtype=np.int32)
    if isinstance(ids, jax.Array) and is_concrete(ids) and not ids.is_fully_addressable:
        # A global array of a multi-process run: the caller placed it as x's rows; no process
        # can read it whole.
        return ids.astype(jnp.int32)
    if _HOST.get() and is_concrete(x) and is_concrete(ids):
        return _rows_like(np.asarray(ids, np.int32), x)
    return jnp.asarray(ids, jnp.int32)


def _active_rows(active: np.ndarray, parts: int = 1):
    """(rows, real): the indices of the True rows of `active`, padded by repeating the last one
    to a multiple of an eighth of the batch (itself a multiple of `parts`, the devices the rows
    are split over), so that re-batching to fewer and fewer rows compiles few shapes; padded
    copies of a row compute what it computes (draws are keyed by row id), and are dropped."""
    n = len(active)
    quantum = -(-max(1, -(-n // 8)) // parts) * parts
    idx = np.nonzero(active)[0]
    size = -(-idx.size // quantum) * quantum
    return np.concatenate([idx, np.full(size - idx.size, idx[-1])]).astype(np.int64), idx.size
