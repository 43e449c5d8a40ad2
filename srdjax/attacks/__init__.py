"""Adversarial attacks built from small parts: FGSM, PGD (L∞/L2), CW, APGD-CE/DLR/T, FAB-T,
Square, and AutoAttack's standard suite (`autoattack`).

One module per idea: `losses` (CE, margin, DLR, targeted DLR), `norms` (start, step,
projection), `loops` (how an attack's loop runs, and `Best`), `inputs` (argument checks),
`gradient` (FGSM, PGD, CW), `autopgd` (APGD, APGD-T), `fab` (FAB-T), `square_attack` and
`square_l2` (Square), `suite` (AutoAttack's standard suite as a cascade: `autoattack`) and
`registry` (the attacks by name). `whole_defense` (the attacks on a whole defense: BPDA, the
cluster selector, the surrogate, EOT) is above the purifier and is not imported here:
`import srdjax.attacks.whole_defense` explicitly.

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
cached the same way (see `loops.LOOPS` for why). What a
static `logits_fn` closes over is compiled in as constants: a model whose weights change in place
(an NNX model during training) would be attacked with stale weights. Pass such weights as traced
arguments with `jax.tree_util.Partial(apply, params)` (new weights, no recompile), or call the
attack inside your own `jit`, where it inlines into the caller's trace (as a train step does).
"""
from __future__ import annotations

import sys
import types

from srdjax.attacks import loops as _loops
from srdjax.attacks import square_attack as _square_attack
from srdjax.attacks.suite import STANDARD_SUITE, autoattack
from srdjax.attacks.autopgd import (ApgdState, apgd, apgd_checkpoints, apgd_targeted,
                                    apgd_targets)
from srdjax.attacks.fab import fab_targeted
from srdjax.attacks.gradient import cw, fgsm, pgd, pgd_on_loss
from srdjax.attacks.loops import LOOPS, UNROLL_MAX, Best
from srdjax.attacks.losses import (LOSSES, ce_loss, dlr_loss, margin_loss, targeted_ce_loss,
                                   targeted_dlr_loss, targeted_margin_loss)
from srdjax.attacks.norms import NORMS, Norm
from srdjax.attacks.registry import ATTACKS, attack_by_name
from srdjax.attacks.square_attack import SQUARE_COMPACT_EVERY, square, square_sizes

__all__ = ["ATTACKS", "ApgdState", "Best", "LOOPS", "LOSSES", "NORMS", "Norm",
           "SQUARE_COMPACT_EVERY", "STANDARD_SUITE", "autoattack", "UNROLL_MAX", "apgd", "apgd_checkpoints", "apgd_targeted",
           "apgd_targets", "attack_by_name", "ce_loss", "cw", "dlr_loss", "fab_targeted", "fgsm",
           "margin_loss", "pgd", "pgd_on_loss", "square", "square_sizes", "targeted_ce_loss",
           "targeted_dlr_loss", "targeted_margin_loss"]

# Settings read at call time by the module that uses them; setting them here sets them there.
_SETTINGS = {"LOOPS": _loops, "UNROLL_MAX": _loops, "SQUARE_COMPACT_EVERY": _square_attack}


class _Package(types.ModuleType):
    def __setattr__(self, name, value):
        if name in _SETTINGS:
            setattr(_SETTINGS[name], name, value)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
