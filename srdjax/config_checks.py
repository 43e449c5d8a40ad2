"""Every field a config may set, with its type and range: a whole config is checked before a
command does any work or writes anything (configs/common.py documents each field).

    check_config(config)   # SrdjaxError naming the first bad field, what it holds, what is expected

A field not listed here is refused as unknown (a typo would otherwise be ignored silently).
Fields marked optional may be absent (configs/imagenet10.py adds them); `model.kwargs` is free
(the model's constructor checks it). The `evaluate` section's values are checked further by
`evaluation.Settings`, which knows the attack and defense names.
"""
from __future__ import annotations

import math
from typing import Any, Callable

from srdjax.checks import SrdjaxError, check

STAGE_NAMES = ("baseline", "cluster", "dictionaries", "robust", "pgd_at", "purify",
               "purified_at")


# A rule takes (dotted name, value) and raises SrdjaxError if the value is wrong.
Rule = Callable[[str, Any], None]


def _type_name(value) -> str:
    return type(value).__name__


def integer(lo: int | None = None, hi: int | None = None) -> Rule:
    def rule(name, value):
        ok = isinstance(value, int) and not isinstance(value, bool)
        check(ok, f"config.{name} must be an integer, got {value!r} ({_type_name(value)})")
        check((lo is None or value >= lo) and (hi is None or value <= hi),
              f"config.{name} must be {_bounds(lo, hi)}, got {value}")
    return rule


def number(lo: float | None = None, hi: float | None = None, *, above: bool = False) -> Rule:
    """A float (or int); `above`: strictly greater than lo."""
    def rule(name, value):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        check(ok, f"config.{name} must be a number, got {value!r} ({_type_name(value)})")
        check(math.isfinite(value), f"config.{name} must be finite, got {value}")
        low_ok = lo is None or (value > lo if above else value >= lo)
        check(low_ok and (hi is None or value <= hi),
              f"config.{name} must be {_bounds(lo, hi, above)}, got {value}")
    return rule


def _bounds(lo, hi, above: bool = False) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if above else '['}{lo}, {hi}]"
    if lo is not None:
        return f"{'>' if above else '>='} {lo}"
    return f"<= {hi}"


def boolean(name, value):
    check(isinstance(value, bool), f"config.{name} must be True or False, got {value!r}")


def text(*choices: str, empty: bool = True) -> Rule:
    def rule(name, value):
        check(isinstance(value, str), f"config.{name} must be a string, got {value!r}")
        if choices:
            check(value in choices,
                  f"config.{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
        check(empty or value.strip(), f"config.{name} must not be empty")
    return rule


def sequence(item: Rule, length: int | None = None, *, nonempty: bool = False) -> Rule:
    """A tuple or list (JSON gives lists back) whose items all pass `item`; a lone string or
    number also counts as a one-item sequence when no length is fixed (--config.a=x)."""
    def rule(name, value):
        if length is None and isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = (value,)
        check(isinstance(value, (tuple, list)),
              f"config.{name} must be a tuple, got {value!r} ({_type_name(value)})")
        check(length is None or len(value) == length,
              f"config.{name} must hold {length} values, got {len(value)}: {tuple(value)}")
        check(not nonempty or len(value) > 0, f"config.{name} must not be empty")
        for i, v in enumerate(value):
            item(f"{name}[{i}]", v)
    return rule


def _stages(name, value):
    sequence(text())(name, value)
    value = (value,) if isinstance(value, str) else value
    check(len(value) > 0, f"config.{name} must name at least one stage of {list(STAGE_NAMES)}")
    for stage in value:
        check(stage in STAGE_NAMES, f"unknown stage {stage!r} in config.stages; expected some "
                                    f"of {list(STAGE_NAMES)}")


def free(name, value):
    """Anything (checked where it is used)."""


def _model_name(name, value):
    from srdjax.models import MODELS
    check(value in MODELS, f"unknown model {value!r}; expected one of {sorted(MODELS)}")


def _training(**extra) -> dict:
    """The fields shared by the baseline and robust sections (training.make_optimizer)."""
    return {"epochs": integer(1), "batch_size": integer(1), "lr": number(0, above=True),
            "momentum": number(0, 1), "nesterov": boolean, "weight_decay": number(0),
            "schedule": text("onecycle", "cyclic", "cosine", "constant"), "warmup_fraction": number(0, 1),
            "label_smoothing": number(0, 1), **extra}


_COUNT = integer(1)
_STEPS = integer(1)

SCHEMA: dict[str, Any] = {
    "seed": integer(0, 2**31 - 1),
    "workdir": text(empty=False),
    "stages": _stages,
    "eval_batch_size": integer(1),
    "resolution": integer(8),                           # optional (imagenet10)
    "data": {
        "source": text("npz", "tfds", "folder"),
        "name": text(empty=False),
        "data_dir": text(),
        "tfds_name": text(),
        "download": boolean,
        "train_per_class": integer(0),
        "test_per_class": integer(0),
        "crop_pad": integer(0),
        "flip": boolean,
        "image_size": sequence(integer(8), 2),
        "test_fraction": number(0, 1, above=True),      # optional (folder source)
        "classes": sequence(text(empty=False)),         # optional (folder source)
        "tfds_train_split": text(),                     # optional
        "tfds_test_split": text(),                      # optional
    },
    "model": {
        "name": _model_name,
        "num_classes": integer(2),
        "dtype": text("float32", "bfloat16"),
        "kwargs": free,
    },
    "baseline": _training(),
    "cluster": {
        "k_max": integer(1),
        "criterion": text("silhouette", "bic"),
        "threshold": number(-1, 1),
        "only_correct": boolean,
        "n_init": integer(1),
        "covariance": boolean,
        "shrinkage": number(0, 1),
        "min_std_fraction": number(0),
        "distance": text("sigma", "mahalanobis"),
    },
    "frequency": {
        "method": text("tikhonov", "gaussian"),
        "lam": number(0, above=True),
        "pad": integer(0),
        "sigma": number(0, above=True),
    },
    "dictionaries": {
        "patch_size": integer(1),
        "stride": integer(1),
        "n_atoms": integer(1),
        "sparsity": integer(1),
        "n_iter": integer(1),
        "max_patches_per_cluster": integer(1),
        "method": text("ksvd", "mod"),
    },
    "robust": _training(
        attack=text("pgd", "fgsm_rs", "n_fgsm"), eps=number(0, 255),
        step_size=number(0, 255, above=True), attack_steps=_STEPS, noise=number(0, 255),
        holdout_per_class=integer(0), check_steps=_STEPS,
        check_step_size=number(0, 255, above=True), collapse_drop=number(0, 1),
        collapse_floor=number(0, 1), latent_weight=number(0),
        distance=text("sigma", "mahalanobis")),
    "purify": {
        "image_chunk": integer(0),
    },
    "purified_at": _training(   # optional (older saved configs lack it): purified_training
        attack=text("pgd", "fgsm_rs", "n_fgsm"), eps=number(0, 255),
        step_size=number(0, 255, above=True), attack_steps=_STEPS, noise=number(0, 255),
        selector_weight=number(0), init=text("robust", "pgd_at", "baseline")),
    "evaluate": {   # value ranges and names: evaluation.Settings
        "test_per_class": integer(0), "curve_per_class": integer(0),
        "defenses": sequence(text(), nonempty=True), "attacks": sequence(text(), nonempty=True),
        "norm": text("linf", "l2"), "eps": number(), "eps_list": sequence(number()),
        "curve_attack": text(), "batch_size": _COUNT, "seed": integer(0),
        "jpeg_quality": integer(1, 100), "bit_depth": integer(1, 16),
        "blur_sigma": number(0, above=True), "pgd20_steps": _STEPS, "pgd100_steps": _STEPS,
        "pgd100_restarts": _COUNT, "apgd_steps": _STEPS, "n_target_classes": _COUNT,
        "fab_steps": _STEPS, "square_queries": _STEPS, "compare": text(empty=False),
        "transfer_steps": _STEPS, "selector_steps": _STEPS, "surrogate_steps": _STEPS,
        "surrogate_top": _COUNT, "surrogate_temperature": number(0, above=True),
        "eot_samples": _COUNT, "unbounded_max": number(0, 1), "output": text(empty=False),
        "resume": boolean, "subset": text("report", "screen"), "report_per_class": integer(0),
        "purify": {   # optional (older saved configs lack it): purify_variants.Variant
            "choice": text("nearest", "reconstruction", "top_classes"), "top": integer(1, 1000),
            "lam": number(0), "sparsity": integer(0),
        },
    },
    "distributed": {
        "coordinator": text(),
        "num_processes": integer(0),
        "process_id": integer(-1),
    },
}

# May be absent from a config (every other field of SCHEMA must be present).
OPTIONAL = {"resolution", "purified_at", "data.test_fraction", "data.classes",
            "data.tfds_train_split", "data.tfds_test_split", "model.dtype", "evaluate",
            "distributed", "evaluate.purify", "evaluate.subset", "evaluate.report_per_class"}


def _items(section) -> dict:
    if hasattr(section, "items"):
        return dict(section.items())
    raise SrdjaxError(f"expected a config section, got {section!r}")


def _walk(schema: dict, section, prefix: str) -> None:
    values = _items(section)
    for key in values:
        if key not in schema:
            where = f"config.{prefix}" if prefix else "the config"
            raise SrdjaxError(f"unknown field config.{prefix}{key} in {where.rstrip('.')}; "
                              f"known fields: {', '.join(sorted(schema))}")
    for key, rule in schema.items():
        name = prefix + key
        if key not in values:
            check(name in OPTIONAL, f"config.{name} is missing (see configs/common.py)")
            continue
        if isinstance(rule, dict):
            check(hasattr(values[key], "items"),
                  f"config.{name} must be a section (a ConfigDict), got {values[key]!r}")
            _walk(rule, values[key], name + ".")
        else:
            rule(name, values[key])


def check_config(config) -> None:
    """Every field of `config`: known, of the right type, in range; then the rules that tie
    fields together. Raises SrdjaxError naming the first bad field."""
    _walk(SCHEMA, config, "")
    d = config.dictionaries
    h, w = config.data.image_size
    check(d.patch_size <= min(h, w), f"config.dictionaries.patch_size {d.patch_size} is larger "
                                     f"than the images ({h}x{w})")
    check(d.sparsity <= d.n_atoms, f"config.dictionaries.sparsity ({d.sparsity}) must be <= "
                                   f"n_atoms ({d.n_atoms})")
    dim = d.patch_size * d.patch_size * 3
    check(d.sparsity <= dim, f"config.dictionaries.sparsity ({d.sparsity}) must be <= the patch "
                             f"dimension patch_size²·3 = {dim}")
    check("purified_at" not in config.stages or config.get("purified_at") is not None,
          "config.stages names purified_at but the config has no purified_at section (see "
          "configs/common.py)")
    r = config.robust
    check(r.distance != "mahalanobis" or config.cluster.covariance,
          "config.robust.distance='mahalanobis' needs config.cluster.covariance=True")
    check(config.cluster.distance != "mahalanobis" or config.cluster.covariance,
          "config.cluster.distance='mahalanobis' needs config.cluster.covariance=True")
    check(config.data.source != "folder" or config.data.data_dir,
          "config.data.source='folder' needs config.data.data_dir")
    dist = config.get("distributed")
    if dist is not None and dist.num_processes:
        check(dist.process_id < dist.num_processes,
              f"config.distributed.process_id ({dist.process_id}) must be < num_processes "
              f"({dist.num_processes})")
