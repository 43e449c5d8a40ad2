"""AutoAttack (Croce & Hein 2020), the standard version, in JAX: APGD-CE, APGD-T, FAB-T and Square
run as a cascade, each attack only on the images that every earlier one failed to break.

    x_adv, broken_by = autoattack(logits_fn, x, y, eps=8 / 255, key=jax.random.key(0))
    robust_accuracy = (broken_by == -1).mean()

The settings are those of the official code's standard version (fra31/auto-attack,
`autoattack.py`, set_version("standard")): APGD-CE 100 steps, 1 restart; APGD-T 100 steps, 9
target classes, 1 restart each; FAB-T 100 steps, 9 target classes; Square 5,000 queries,
p_init 0.8. An image counts as broken when the model misclassifies the attack's output, as in
the official code.

Called with concrete arrays, each attack runs on the rows still unbroken only, gathered on the
host and padded to a multiple of an eighth of the batch (few distinct shapes, so few compiled
programs). Traced inside a caller's jit (or over several processes), every attack runs on every
row and its result is merged by mask. Both give the same per-image result: every attack keys
image i's random draws by (key, ids[i]), so an image's outcome does not depend on its batch.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from srdjax import parallel
from srdjax.attacks.autopgd import apgd, apgd_targeted
from srdjax.attacks.fab import fab_targeted
from srdjax.attacks.inputs import _check_ids, _check_inputs, _check_key
from srdjax.attacks.loops import _active_rows, _as_pytree, _rows_like
from srdjax.attacks.square_attack import square
from srdjax.checks import check, is_concrete

STANDARD_SUITE = ("apgd-ce", "apgd-t", "fab-t", "square")
VERSIONS = ("standard",)

# The official standard version's settings of each attack of the suite.
STANDARD_SETTINGS = {
    "apgd-ce": dict(steps=100, restarts=1, loss="ce"),
    "apgd-t": dict(steps=100, n_target_classes=9),
    "fab-t": dict(steps=100, n_target_classes=9),
    "square": dict(n_queries=5000, p_init=0.8),
}
_FUNCTIONS = {"apgd-ce": apgd, "apgd-t": apgd_targeted, "fab-t": fab_targeted, "square": square}


@jax.jit
def _predict(fn, x):
    return jnp.argmax(fn(x), axis=-1).astype(jnp.int32)


def _suite(n_classes: int, overrides):
    """(name, function, settings) of each attack; with fewer than 10 classes the targeted attacks
    take every other class as a target (the official code would index past the classes)."""
    out = []
    for name in STANDARD_SUITE:
        settings = {**STANDARD_SETTINGS[name], **(overrides or {}).get(name, {})}
        if "n_target_classes" in settings:
            settings["n_target_classes"] = min(settings["n_target_classes"], n_classes - 1)
        out.append((name, _FUNCTIONS[name], settings))
    return out


def autoattack(logits_fn, x, y, *, eps, norm="linf", version="standard", key, ids=None,
               overrides=None):
    """Standard AutoAttack on the images x [N, H, W, C] in [0, 1] with labels y [N].

    Returns (x_adv, broken_by): broken_by[i] is the index in STANDARD_SUITE of the first attack
    that broke image i, -1 if image i is still classified correctly after the whole suite, and
    -2 if it was misclassified clean (not attacked). x_adv[i] is that attack's image, else x[i].
    Robust accuracy = mean(broken_by == -1). `norm` is "linf" or "l2"; attack j draws with
    fold_in(key, j) and image i by its id (`ids`, default 0..N-1). `overrides`
    ({"square": {"n_queries": 1000}}, ...) replace standard settings: the result is then not
    standard AutoAttack.
    """
    check(version in VERSIONS, f"unknown AutoAttack version {version!r}; srdjax implements "
                               f"{', '.join(VERSIONS)}")
    _check_inputs(logits_fn, x, y, eps, None, norm)
    _check_key(key)
    n = jnp.shape(x)[0]
    _check_ids(ids, n)
    for name in overrides or {}:
        check(name in STANDARD_SUITE, f"unknown attack {name!r} in overrides; expected one of "
                                      f"{', '.join(STANDARD_SUITE)}")
    n_classes = jax.eval_shape(logits_fn, jax.ShapeDtypeStruct(jnp.shape(x), x.dtype)).shape[-1]
    check(n_classes >= 4, f"AutoAttack's targeted DLR loss needs at least 4 classes, got logits "
                          f"with {n_classes}")
    suite = _suite(n_classes, overrides)
    ids = np.arange(n, dtype=np.int32) if ids is None else ids
    fn = _as_pytree(logits_fn)
    concrete = all(is_concrete(leaf) for leaf in jax.tree.leaves((fn, x, y, eps, key, ids)))
    if concrete and jax.process_count() == 1:
        return _on_remaining_rows(fn, x, y, eps, norm, key, ids, suite)
    return _on_every_row(fn, x, y, eps, norm, key, jnp.asarray(ids), suite)


def _on_every_row(fn, x, y, eps, norm, key, ids, suite):
    broken = jnp.where(_predict(fn, x) == y, -1, -2)
    x_adv = x
    for j, (_, attack, settings) in enumerate(suite):
        out = attack(fn, x, y, eps=eps, key=jax.random.fold_in(key, j), norm=norm, ids=ids,
                     **settings)
        fooled = (_predict(fn, out) != y) & (broken == -1)
        x_adv = jnp.where(fooled[:, None, None, None], out, x_adv)
        broken = jnp.where(fooled, j, broken)
    return x_adv, broken


def _on_remaining_rows(fn, x, y, eps, norm, key, ids, suite):
    x_host, y_host, ids_host = np.asarray(x), np.asarray(y), np.asarray(ids, np.int32)
    broken = np.where(np.asarray(_predict(fn, x)) == y_host, -1, -2).astype(np.int32)
    x_adv = x_host.copy()
    parts = parallel.row_parts(x)
    for j, (_, attack, settings) in enumerate(suite):
        remaining = broken == -1
        if not remaining.any():
            break
        rows, real = _active_rows(remaining, parts)
        put = lambda v: _rows_like(v[rows], x)
        out = attack(fn, put(x_host), put(y_host), eps=eps, key=jax.random.fold_in(key, j),
                     norm=norm, ids=put(ids_host), **settings)
        fooled = np.asarray(_predict(fn, out))[:real] != y_host[rows[:real]]
        hit = rows[:real][fooled]
        broken[hit] = j
        x_adv[hit] = np.asarray(out)[:real][fooled]
    return _rows_like(x_adv, x), jnp.asarray(broken)
