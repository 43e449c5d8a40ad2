"""The method as a chain of stages, each (config, previous stage's checkpoint) → checkpoint.

    baseline → cluster → dictionaries → robust (+ pgd_at, the λ = 0 comparison) → evaluate

`run(config)` runs the stages the config names, in order, skipping those whose checkpoint is
complete; every stage reads what it needs from the stages before it in the same workdir.
"""
from __future__ import annotations

import json
from pathlib import Path

import jax
import ml_collections
from tqdm.auto import tqdm

from srdjax import parallel
from srdjax.checkpoints import StageStore, atomic_write_json
from srdjax.checks import SrdjaxError, check
from srdjax.data import Dataset, load_dataset
from srdjax.models import apply_model, create_model, split_model
from srdjax import training

# The config sections each stage's result depends on (its fingerprint).
DEPENDS = {
    "baseline": ("seed", "data", "model", "baseline"),
}
DEPENDS["cluster"] = DEPENDS["baseline"] + ("cluster",)
DEPENDS["dictionaries"] = DEPENDS["cluster"] + ("frequency", "dictionaries")
DEPENDS["robust"] = DEPENDS["cluster"] + ("robust",)
DEPENDS["pgd_at"] = DEPENDS["baseline"] + ("robust",)


class Context:
    """What every stage shares: the config, the mesh, the workdir and loaded datasets."""

    def __init__(self, config: ml_collections.ConfigDict, mesh=None):
        self.config = config
        self.mesh = parallel.make_mesh() if mesh is None else mesh
        self.workdir = Path(config.workdir).expanduser().resolve()
        self._data: dict[str, Dataset] = {}

    def dataset(self, split: str) -> Dataset:
        if split not in self._data:
            self._data[split] = load_dataset(self.config.data, split, self.config.seed)
        return self._data[split]

    def store(self, stage: str) -> StageStore:
        sections = {k: self.config.get(k) for k in DEPENDS[stage]}
        return StageStore(self.workdir, stage, sections)

    def log(self, message: str) -> None:
        if parallel.is_main_process():
            tqdm.write(message)


def build_model(config):
    dtype = {"float32": None, "bfloat16": "bfloat16"}.get(config.model.get("dtype", "float32"))
    return create_model(config.model.name, config.model.num_classes, config.seed,
                        dtype=dtype, **config.model.kwargs.to_dict())


def load_classifier(ctx: Context, stage: str):
    """(graphdef, params, batch_stats) of a finished classifier stage, replicated on the mesh."""
    graphdef, params, stats = split_model(build_model(ctx.config))
    target = parallel.replicate(ctx.mesh, {"params": params, "batch_stats": stats})
    final = ctx.store(stage).load_final(target)
    return graphdef, final["params"], final["batch_stats"]


def train_classifier(ctx: Context, stage: str, section, loss_builder, init=None,
                     extras: dict | None = None, stop_after_steps=None):
    """Shared body of the baseline and robust stages. `loss_builder(graphdef)` returns the
    per-batch loss for `training.make_train_step`; `init` optionally gives starting
    (params, batch_stats), e.g. the baseline's for the robust model."""
    cfg, mesh = ctx.config, ctx.mesh
    store = ctx.store(stage)
    store.check_compatible()
    train_ds, test_ds = ctx.dataset("train"), ctx.dataset("test")
    check(section.epochs >= 1, f"{stage}.epochs must be >= 1, got {section.epochs}")
    graphdef, params, stats = split_model(build_model(cfg))
    if init is not None:
        params, stats = init
    total = section.epochs * (len(train_ds) // section.batch_size)
    tx = training.make_optimizer(section, total)
    state = parallel.replicate(mesh, training.init_state(params, stats, tx))
    step = training.make_train_step(graphdef, tx, loss_builder(graphdef), mesh,
                                    crop_pad=cfg.data.crop_pad, flip=cfg.data.flip)
    predict = training.make_predict(graphdef, mesh)
    eval_bs = cfg.get("eval_batch_size", 500)

    def evaluate(state):
        logits, _ = training.predict_dataset(predict, state.params, state.batch_stats, test_ds,
                                             mesh, eval_bs)
        return {"test_acc": training.accuracy(logits, test_ds.y)}

    state, summary = training.fit(store, state, step, evaluate, train_ds, extras or {}, mesh,
                                  epochs=section.epochs, batch_size=section.batch_size,
                                  seed=cfg.seed, desc=stage, stop_after_steps=stop_after_steps)
    if stop_after_steps is not None and "stopped_at" in summary:
        return None
    # The stage's result is the model alone: later stages need no optimizer state.
    store.save_final({"params": state.params, "batch_stats": state.batch_stats})
    tta = training.make_predict(graphdef, mesh, flip_tta=True)
    logits, _ = training.predict_dataset(tta, state.params, state.batch_stats, test_ds, mesh,
                                         eval_bs)
    summary = {**summary, "test_acc_flip_tta": training.accuracy(logits, test_ds.y),
               "n_test": len(test_ds), "n_train": len(train_ds),
               "params": sum(p.size for p in jax.tree.leaves(state.params))}
    store.mark_done(summary)
    ctx.log(f"[{stage}] test accuracy {summary['test_acc']:.4f} "
            f"(flip TTA {summary['test_acc_flip_tta']:.4f}) on {len(test_ds)} test images")
    return summary


def run_baseline(ctx: Context, stop_after_steps=None):
    section = ctx.config.baseline

    def loss_builder(graphdef):
        def loss_fn(params, stats, x, y, extras, key):
            logits, _, stats = apply_model(graphdef, params, stats, x, train=True)
            loss = training.cross_entropy(logits, y, section.label_smoothing).mean()
            acc = (logits.argmax(-1) == y).mean()
            return loss, (stats, {"acc": acc})
        return loss_fn

    return train_classifier(ctx, "baseline", section, loss_builder,
                            stop_after_steps=stop_after_steps)


STAGES = {
    "baseline": run_baseline,
}


def validate_config(config) -> None:
    for name in config.stages:
        if name not in STAGES:
            raise SrdjaxError(f"unknown stage {name!r} in config.stages; "
                              f"expected some of {list(STAGES)}")
    check(str(config.workdir), "config.workdir must be set")
    from srdjax.models import MODELS
    check(config.model.name in MODELS,
          f"unknown model {config.model.name!r}; expected one of {sorted(MODELS)}")
    check(config.model.num_classes >= 2,
          f"model.num_classes must be >= 2, got {config.model.num_classes}")
    for name in config.stages:
        section = config.get(name)
        if section is not None and "batch_size" in section:
            check(section.batch_size > 0,
                  f"{name}.batch_size must be positive, got {section.batch_size}")


def run(config, mesh=None, stop_after_steps: int | None = None) -> dict:
    """Run the config's stages in order; returns each stage's summary."""
    validate_config(config)
    ctx = Context(config, mesh)
    if parallel.is_main_process():
        ctx.workdir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(ctx.workdir / "config.json", config.to_dict())
    summaries = {}
    for name in config.stages:
        store = ctx.store(name)
        store.check_compatible()
        if store.is_done():
            ctx.log(f"[{name}] complete in {store.dir}; skipping")
            summaries[name] = store.summary()
            continue
        ctx.log(f"[{name}] running on {ctx.mesh.size} device(s)")
        result = STAGES[name](ctx, stop_after_steps=stop_after_steps)
        if result is None:
            ctx.log(f"[{name}] stopped early at step {stop_after_steps}")
            break
        summaries[name] = result
    if parallel.is_main_process():
        atomic_write_json(ctx.workdir / "summary.json", summaries)
    return summaries


def load_config(workdir) -> ml_collections.ConfigDict:
    """The config a workdir was made with (saved by `run`)."""
    path = Path(workdir).expanduser() / "config.json"
    if not path.exists():
        raise SrdjaxError(f"{workdir} is not an srdjax checkpoint directory (no config.json)")
    return ml_collections.ConfigDict(json.loads(path.read_text()))
