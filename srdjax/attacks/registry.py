"""The attacks by name, with the settings the evaluation uses."""
from __future__ import annotations

import functools
from typing import Callable

from srdjax.attacks.autopgd import apgd
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
    "square": functools.partial(square, n_queries=1000),
}


def attack_by_name(name: str, **overrides) -> Callable:
    """The attack registered as `name`, called as attack(logits_fn, x, y, *, eps, key); keyword
    `overrides` replace its settings (e.g. attack_by_name("pgd20", norm="l2", restarts=5))."""
    check(name in ATTACKS, f"unknown attack {name!r}; known attacks: {', '.join(ATTACKS)}")
    base = ATTACKS[name]
    return functools.partial(base.func, *base.args, **{**base.keywords, **overrides})
