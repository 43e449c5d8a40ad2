"""FAB-T: the targeted Fast Adaptive Boundary attack (Croce & Hein 2020), L∞ and L2, as
AutoAttack's standard version runs it.

For a target class t (the classes ranked 2..10 by the clean logits, in that order), each step
linearises the boundary f = logit_t - logit_y at the iterate x1, projects both x1 and the clean
image x0 onto that hyperplane inside the box [0, 1] (the smallest perturbation in the norm), and
moves to a mix of the two projections, overshooting by eta and leaning toward x0 by
alpha = min(|d1| / (|d1| + |d0|), alpha_max). Once an iterate is misclassified it is kept if it is
the closest to x0 so far and the iterate steps back toward x0 by beta. FAB minimises the
perturbation: an image counts as broken by a target when its closest misclassified iterate lies
within eps; the next target is tried only on the images still unbroken.

Standard settings: 100 steps, one run per target (no random start: AutoAttack's restarts after
the first start at a random point at eps / 2), alpha_max = 0.1, eta = 1.05, beta = 0.9. The two
projections are one water-filling problem: with the sign chosen so the iterate must decrease
w·z by c, coordinate i moves toward its useful box edge by min(λ, room_i) (L∞) or
min(μ|w_i|, room_i) (L2), and the level is the smallest one reaching c (the box edge everywhere
when none does, as the official code does).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from srdjax import parallel
from srdjax.attacks.inputs import _check_count, _check_inputs, _check_key
from srdjax.attacks.loops import _HOST, _apply, _compiled, _loop, _rows_like, _Step
from srdjax.attacks.norms import _per_sample
from srdjax.checks import SrdjaxError, check, is_concrete

# ------------------------------------------------------------ projection onto a hyperplane ∩ box


def _fill_level(v, q, c):
    """Per row, the smallest level λ >= 0 with sum_i v_i min(λ, q_i) >= c (v, q >= 0; q may be
    inf where v = 0); inf where even λ = max q falls short. Rows of v, q: [n, D]; c: [n]."""
    q, v = jax.lax.sort((q, v), dimension=1, num_keys=1)
    n = q.shape[0]
    below = jnp.cumsum(jnp.where(v > 0, v * q, 0.0), axis=1)    # sum of the j <= k, saturated
    suffix = jnp.flip(jnp.cumsum(jnp.flip(v, 1), axis=1), 1)     # sum of v_j, j >= k
    above = jnp.concatenate([suffix[:, 1:], jnp.zeros((n, 1), v.dtype)], axis=1)
    reached = below + jnp.where(above > 0, q * above, 0.0)      # the sum at level q_(k)
    k = jnp.sum(reached < c[:, None], axis=1)                    # levels that fall short
    rows = jnp.arange(n)
    saturated = jnp.where(k > 0, below[rows, jnp.maximum(k - 1, 0)], 0.0)
    free = suffix[rows, jnp.minimum(k, q.shape[1] - 1)]
    level = jnp.maximum((c - saturated) / jnp.where(free > 0, free, 1.0), 0.0)
    return jnp.where(k >= q.shape[1], jnp.inf, level)


def _oriented(t, w, b):
    """w with the sign for which t must decrease w·z, the decrease c >= 0 needed, and each
    coordinate's room to move in its useful direction (to 0 where w > 0, to 1 where w < 0)."""
    gap = jnp.sum(w * t, axis=1) - b
    w = w * jnp.where(gap >= 0, 1.0, -1.0).astype(w.dtype)[:, None]
    return w, jnp.abs(gap), jnp.where(w < 0, 1.0 - t, t)


def project_linf(t, w, b):
    """Per row, the smallest-L∞ d with w·(t + d) = b and t + d in [0, 1] ([n, D] rows; b [n]);
    where no such d exists, the move to the box corner that gets closest (the official code's
    answer)."""
    w, c, room = _oriented(t, w, b)
    level = _fill_level(jnp.abs(w), room, c)
    return -jnp.sign(w) * jnp.minimum(level[:, None], room)


def project_l2(t, w, b):
    """Per row, the smallest-L2 d with w·(t + d) = b and t + d in [0, 1]; where none exists, the
    move to the closest box corner. As the official code, coordinates with |w| <= 1e-8 stay."""
    w, c, room = _oriented(t, w, b)
    live = jnp.abs(w) > 1e-8
    size = jnp.where(live, jnp.abs(w), 1.0)
    level = _fill_level(jnp.where(live, w * w, 0.0), jnp.where(live, room / size, jnp.inf), c)
    return jnp.where(live, -jnp.sign(w) * jnp.minimum(level[:, None] * size, room), 0.0)


PROJECTIONS = {"linf": project_linf, "l2": project_l2}


def _size(d, norm):
    """Per-row norm of [n, ...] arrays."""
    flat = jnp.reshape(d, (d.shape[0], -1))
    if norm == "linf":
        return jnp.max(jnp.abs(flat), axis=1)
    return jnp.sqrt(jnp.sum(jnp.square(flat), axis=1))


def fab_step(x1, x0, w, b, *, norm, alpha_max=0.1, eta=1.05):
    """One FAB move from the iterate x1 (clean image x0) toward the hyperplane w·z = b: rows of
    [n, D]. Biased toward x0 by alpha = clip(|d1| / (|d1| + |d0|), 0, alpha_max), overshooting
    by eta, clipped to [0, 1]."""
    d = PROJECTIONS[norm](jnp.concatenate([x1, x0]), jnp.concatenate([w, w]),
                          jnp.concatenate([b, b]))
    d1, d0 = jnp.split(d, 2)
    a1, a0 = (jnp.maximum(_size(v, norm), 1e-8)[:, None] for v in (d1, d0))
    alpha = jnp.clip(a1 / (a1 + a0), 0.0, alpha_max)
    return jnp.clip((x1 + eta * d1) * (1 - alpha) + (x0 + eta * d0) * alpha, 0.0, 1.0)


def fab_targets(logits, n_target_classes):
    """The target classes of each row: its classes ranked 2..n_target_classes + 1 by logit."""
    return jnp.argsort(-logits, axis=-1)[:, 1:n_target_classes + 1]


# ------------------------------------------------------------ the attack loop


class _FabGoal(NamedTuple):
    fn: Callable
    x: jax.Array
    y: jax.Array
    target: jax.Array
    eps: jax.Array
    key: jax.Array
    ids: jax.Array        # each row's id: its random starts are keyed by it


def _predicted(fn, x):
    return jnp.argmax(fn(x), axis=-1)


def _fab_body(settings, g, i, carry):
    norm, alpha_max, eta, beta = settings
    x1, best, res = carry
    logits, pullback = jax.vjp(g.fn, x1)
    labels = jnp.arange(logits.shape[-1])
    # d(logit_t - logit_y): one pullback of the summed difference (rows are independent).
    cotangent = ((labels == g.target[:, None]).astype(logits.dtype)
                 - (labels == g.y[:, None]).astype(logits.dtype))
    (grad,) = pullback(cotangent)
    diff = jnp.sum(logits * cotangent, axis=-1)
    flat = lambda v: jnp.reshape(v, (v.shape[0], -1))
    w = flat(grad).astype(x1.dtype)
    b = jnp.sum(w * flat(x1), axis=1) - diff.astype(x1.dtype)
    x_new = fab_step(flat(x1), flat(g.x), w, b, norm=norm, alpha_max=alpha_max, eta=eta)
    x_new = jnp.reshape(x_new, x1.shape)
    adversarial = _predicted(g.fn, x_new) != g.y
    size = _size(x_new - g.x, norm)
    closer = adversarial & (size < res)
    best = jnp.where(_per_sample(closer, best), x_new, best)
    res = jnp.where(closer, size, res)
    x_new = jnp.where(_per_sample(adversarial, x_new), g.x + (x_new - g.x) * beta, x_new)
    return x_new, best, res


def _fab_start(settings, g, run):
    """Run `run`'s start: x0 for a target's first run, else a random point at eps / 2 in the norm
    (AutoAttack's restarts), drawn per row from fold_in(fold_in(key, run), id)."""
    norm = settings[0]
    key = jax.random.fold_in(g.key, run)

    def one(row_id, x0):
        k = jax.random.fold_in(key, row_id)
        if norm == "linf":
            t = jax.random.uniform(k, x0.shape, x0.dtype, -1.0, 1.0)
        else:
            t = jax.random.normal(k, x0.shape, x0.dtype)
        return t / jnp.maximum(_size(t[None], norm)[0], 1e-12)

    noise = jax.vmap(one)(g.ids, g.x)
    start = jnp.clip(g.x + 0.5 * g.eps * noise, 0.0, 1.0)
    return jnp.where(run % settings[-1] == 0, g.x, start)


def _fab_verdict(settings, g, best, res):
    """Per row, the closest misclassified iterate and whether it lies within eps (res is its
    distance, as computed when it was found misclassified; inf if none was)."""
    broken = res <= g.eps
    return jnp.where(_per_sample(broken, best), best, g.x), broken


def _fab_run(g, run, settings, steps):
    """One FAB run on goal g; returns (x_adv, broken) per row."""
    start = _apply(_fab_start, settings, g, run)
    res = jnp.full((g.x.shape[0],), jnp.inf, g.x.dtype)
    _, best, res = _loop(steps, _Step(_fab_body, settings[:4], g), (start, start, res))
    return _apply(_fab_verdict, settings, g, best, res)


def _fab_clean(settings, consts, x):
    fn, y = consts
    logits = fn(x)
    if settings[0] > logits.shape[-1] - 1:
        raise SrdjaxError(f"n_target_classes must be at most the number of classes - 1 = "
                          f"{logits.shape[-1] - 1}, got {settings[0]}")
    return fab_targets(logits, settings[0]), jnp.argmax(logits, axis=-1) == y


def _fab_host(g, targets, done, settings, steps, runs):
    """The targets in order from the host, each run only on the rows still unbroken: the batch
    shrinks when they fit in half of it (to a multiple of an eighth of it), so at most four
    shapes compile; padding repeats a row, whose copies evolve identically."""
    n, parts = g.x.shape[0], parallel.row_parts(g.x)
    quantum = -(-max(1, -(-n // 8)) // parts) * parts
    host = {name: np.asarray(getattr(g, name)) for name in ("x", "y", "ids")}
    targets, done, out = np.asarray(targets), np.array(done), np.array(g.x)
    size = n
    for run in range(targets.shape[1] * runs):
        active = np.nonzero(~done)[0]
        if active.size == 0:
            break
        if -(-active.size // quantum) * quantum <= size // 2:
            size = -(-active.size // quantum) * quantum
        rows = np.concatenate([active, np.full(size - active.size, active[-1])])
        sub = g._replace(target=_rows_like(targets[rows, run // runs], g.x),
                         **{name: _rows_like(v[rows], g.x) for name, v in host.items()})
        adv, broken = (np.asarray(a)[:active.size] for a in _fab_run(sub, run, settings, steps))
        out[active[broken]] = adv[broken]
        done[active[broken]] = True
    return _rows_like(out, g.x)


def _fab_impl(fn, x, y, eps, key, ids, *, norm, steps, n_target_classes, restarts, alpha_max,
              eta, beta):
    targets, correct = _apply(_fab_clean, (n_target_classes,), (fn, y), x)
    settings = (norm, alpha_max, eta, beta, restarts)
    g = _FabGoal(fn, x, y, targets[:, 0], jnp.asarray(eps, x.dtype), key, ids)
    if _HOST.get() and is_concrete(x) and jax.process_count() == 1:
        return jax.lax.stop_gradient(_fab_host(g, targets, ~correct, settings, steps, restarts))

    def body(run, carry):
        out, done = carry
        sub = g._replace(target=jnp.take(targets, run // restarts, axis=1))
        adv, broken = _fab_run(sub, run, settings, steps)
        new = broken & ~done
        return jnp.where(_per_sample(new, out), adv, out), done | new

    out, _ = _loop(n_target_classes * restarts, body, (x, ~correct))
    return jax.lax.stop_gradient(out.astype(x.dtype))


_fab = _compiled(_fab_impl, ("norm", "steps", "n_target_classes", "restarts", "alpha_max",
                             "eta", "beta"))


def fab_targeted(logits_fn, x, y, *, eps, key, norm="linf", steps=100, n_target_classes=9,
                 restarts=1, alpha_max=0.1, eta=1.05, beta=0.9, ids=None):
    """FAB-T (see the module docstring): per image, the closest misclassified point FAB finds for
    the first target (classes ranked 2..n_target_classes + 1 by the clean logits) with one
    within eps, else x (also for images misclassified clean). `ids` (default 0..n-1) key the
    random starts of restarts after the first per image, so an image's result does not depend
    on its batch; with the standard restarts=1 nothing is random."""
    _check_inputs(logits_fn, x, y, eps, None, norm)
    _check_key(key)
    for value, name in ((steps, "steps"), (n_target_classes, "n_target_classes"),
                        (restarts, "restarts")):
        _check_count(value, name)
    check(0 <= alpha_max <= 1 and eta > 0 and 0 < beta <= 1,
          f"FAB needs alpha_max in [0, 1], eta > 0 and beta in (0, 1], got {alpha_max}, {eta}, "
          f"{beta}")
    n = jnp.shape(x)[0]
    if ids is None:
        ids = np.arange(n, dtype=np.int32)
        ids = _rows_like(ids, x) if is_concrete(x) else jnp.asarray(ids)
    check(jnp.shape(ids) == (n,), f"ids must have shape ({n},), got {jnp.shape(ids)}")
    return _fab(logits_fn, x, y, eps, key, ids, norm=norm, steps=steps,
                n_target_classes=n_target_classes, restarts=restarts,
                alpha_max=float(alpha_max), eta=float(eta), beta=float(beta))
