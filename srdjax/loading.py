"""A finished `train.py` workdir as a purifier, or as the whole defense images → logits.

    purifier = srdjax.load_purifier("runs/cifar10_quick")
    logits_fn = srdjax.load_defense("runs/cifar10_quick", classifier="robust")

Above `srdjax.stages`, which knows where each stage keeps its checkpoint; `srdjax.purifier`
below it holds the purification itself and knows nothing of workdirs.
"""
from __future__ import annotations

import jax

from srdjax import stages
from srdjax.checks import SrdjaxError
from srdjax.models import apply_model
from srdjax.purifier import Purifier, check_input, defense_logits

CLASSIFIERS = ("baseline", "robust", "purified_at")


def context(checkpoint_dir, mesh=None) -> stages.Context:
    """The stages' context of a workdir, with the config it was trained with."""
    config = stages.load_config(checkpoint_dir)
    config.workdir = str(checkpoint_dir)  # the directory may have moved since training
    return stages.Context(config, mesh)


def load_purifier(checkpoint_dir, mesh=None) -> Purifier:
    """The purifier of a finished `train.py` run: its robust model, clusters and dictionaries."""
    return stages.build_purifier(context(checkpoint_dir, mesh))


def load_defense(checkpoint_dir, classifier: str = "baseline", mesh=None):
    """The whole defense as one function images → logits (purify, then classify).

    The function checks its images like `purify` (NHWC floats in [0, 1] of the purifier's size,
    finite; values only when concrete) and then calls its jitted body, `fn.unchecked`, which
    code already inside `jit` or an attack loop may call directly. Its gradient is the BPDA
    gradient (see `purify_bpda`), so any gradient attack applies to it as it would to a bare
    model. `classifier` is "baseline", "robust" or "purified_at" (the classifier trained through
    the purifier, when the workdir has that stage)."""
    if classifier not in CLASSIFIERS:
        raise SrdjaxError(f"classifier must be one of {', '.join(map(repr, CLASSIFIERS))}, got "
                          f"{classifier!r}")
    ctx = context(checkpoint_dir, mesh)
    purifier = stages.build_purifier(ctx)
    graphdef, params, stats = stages.load_classifier(ctx, classifier)

    @jax.jit
    def unchecked(x):
        return defense_logits(purifier,
                              lambda im: apply_model(graphdef, params, stats, im)[0], x)

    def logits_fn(x):
        check_input(purifier, x)
        return unchecked(x)

    logits_fn.unchecked = unchecked
    logits_fn.purifier = purifier
    return logits_fn
