"""The attacks by name; the AutoAttack ones with the official standard version's settings."""
from __future__ import annotations

import functools
from typing import Callable

from srdjax.attacks.autopgd import apgd, apgd_targeted
from srdjax.attacks.fab import fab_targeted
from srdjax.attacks.gradient import cw, fgsm, pgd
from srdjax.attacks.square_attack import square
from srdjax.checks import check


ATTACKS = {
    "fgsm": functools.partial(fgsm),
    "pgd20": functools.partial(pgd, steps=20, restarts=1),
    "pgd100": functools.partial(pgd, steps=100, restarts=2),
    "cw": functools.partial(cw, steps=30),
    "apgd-ce": functools.partial(apgd, loss="ce", steps=100),
    "apgd-dlr": functools.partial(apgd, loss="dlr", steps=100),
    "apgd-t": functools.partial(apgd_targeted, steps=100, n_target_classes=9),
    "fab-t": functools.partial(fab_targeted, steps=100, n_target_classes=9),
    "square": functools.partial(square, n_queries=5000, p_init=0.8),
}


def attack_by_name(name: str, **overrides) -> Callable:
    """The attack registered as `name`, called as attack(logits_fn, x, y, *, eps, key); keyword
    `overrides` replace its settings (e.g. attack_by_name("pgd20", norm="l2", restarts=5))."""
    check(name in ATTACKS, f"unknown attack {name!r}; known attacks: {', '.join(ATTACKS)}")
    base = ATTACKS[name]
    return functools.partial(base.func, *base.args, **{**base.keywords, **overrides})
