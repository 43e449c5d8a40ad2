"""The method as a chain of stages, each (config, previous stage's checkpoint) → checkpoint.

    baseline → cluster → dictionaries → robust (+ pgd_at, the λ = 0 comparison) → evaluate
                                          └→ purified_at (optional: the classifier behind the
                                             purifier, adversarially trained through it)

`run(config)` runs the stages the config names, in order, skipping those whose checkpoint is
complete; every stage reads what it needs from the stages before it in the same workdir.
This is the one module that knows the stages and their order, so every stage's (short) run
function lives here, which puts it a little over 400 lines.
"""
from __future__ import annotations

import json
from pathlib import Path

import jax
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from srdjax import clusters, config_checks, dictionary, frequency, imageio, parallel, robust
from srdjax import purified_training
from srdjax import purifier as purifier_lib
from srdjax import data as data_lib
from srdjax import patches as patch_lib
from srdjax.checkpoints import StageStore, atomic_write_json
from srdjax.checks import SrdjaxError, check, check_output_dir
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
DEPENDS["purify"] = DEPENDS["dictionaries"] + ("robust", "purify")
DEPENDS["purified_at"] = DEPENDS["purify"] + ("purified_at",)


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
                     extras: dict | None = None, stop_after_steps=None, train_ds=None,
                     watch=None):
    """Shared body of the baseline and robust stages. `loss_builder(graphdef)` returns the
    per-batch loss for `training.make_train_step`; `init` optionally gives starting
    (params, batch_stats), e.g. the baseline's for the robust model; `train_ds` replaces the
    training split (the robust stages hold some images out). `watch(graphdef)`, when given,
    returns (evaluate, stop, final): more per-epoch measurements (state -> dict),
    `training.fit`'s stop rule, and (state -> (params, batch_stats, summary)) choosing the
    weights the stage keeps."""
    cfg, mesh = ctx.config, ctx.mesh
    store = ctx.store(stage)
    store.check_compatible()
    train_ds = ctx.dataset("train") if train_ds is None else train_ds
    test_ds = ctx.dataset("test")
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
    more, stop, final = watch(graphdef) if watch is not None else (None, None, None)

    def evaluate(state):
        logits, _ = training.predict_dataset(predict, state.params, state.batch_stats, test_ds,
                                             mesh, eval_bs)
        return {"test_acc": training.accuracy(logits, test_ds.y),
                **(more(state) if more is not None else {})}

    state, summary = training.fit(store, state, step, evaluate, train_ds, extras or {}, mesh,
                                  epochs=section.epochs, batch_size=section.batch_size,
                                  seed=cfg.seed, desc=stage, stop_after_steps=stop_after_steps,
                                  stop=stop)
    if stop_after_steps is not None and "stopped_at" in summary:
        return None
    params, stats = state.params, state.batch_stats
    if final is not None:
        params, stats, kept = final(state)
        summary = {**summary, **kept}
    # The stage's result is the model alone: later stages need no optimizer state.
    store.save_final({"params": params, "batch_stats": stats})
    tta = training.make_predict(graphdef, mesh, flip_tta=True)
    logits, _ = training.predict_dataset(tta, params, stats, test_ds, mesh, eval_bs)
    summary = {**summary, "test_acc_flip_tta": training.accuracy(logits, test_ds.y),
               "n_test": len(test_ds), "n_train": len(train_ds),
               "params": sum(p.size for p in jax.tree.leaves(params))}
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


def _train_latents(ctx: Context, stage: str):
    """Logits and latents of every training image (no augmentation) under a classifier stage."""
    graphdef, params, stats = load_classifier(ctx, stage)
    predict = training.make_predict(graphdef, ctx.mesh)
    return training.predict_dataset(predict, params, stats, ctx.dataset("train"), ctx.mesh,
                                    ctx.config.eval_batch_size, desc=f"{stage} latents")


def run_cluster(ctx: Context, stop_after_steps=None):
    """Stage 2: adaptive k-means of each class's baseline latents."""
    cfg, section = ctx.config, ctx.config.cluster
    store = ctx.store("cluster")
    logits, latents = _train_latents(ctx, "baseline")
    labels = ctx.dataset("train").y
    mask = (logits.argmax(-1) == labels) if section.only_correct else None
    # σ floor relative to the latents' overall spread: a cluster of a few near-identical
    # points must not get a near-zero σ, whose σ-normalised distances (and the robust stage's
    # gradients) would explode.
    min_std = float(section.min_std_fraction * latents.std(0).mean())
    cluster_set, assignment, info = clusters.fit_clusters(
        jax.random.key(cfg.seed), latents, labels, cfg.model.num_classes, k_max=section.k_max,
        criterion=section.criterion, threshold=section.threshold, mask=mask, min_std=min_std,
        covariance=section.covariance, shrinkage=section.shrinkage, n_init=section.n_init,
        mesh=ctx.mesh)
    assignment = np.asarray(assignment)
    # Images left out of the fit (misclassified ones) still need a cluster for the robust
    # stage: the nearest one of their own class.
    own = np.asarray(clusters.assign(cluster_set, latents, labels, section.distance))
    full = np.where(assignment >= 0, assignment, own).astype(np.int32)
    store.save_final({"clusters": _clusters_to_tree(cluster_set),
                      "assignment": np.asarray(assignment, np.int32), "full_assignment": full})
    k_per_class = np.bincount(np.asarray(cluster_set.class_ids),
                              minlength=cfg.model.num_classes).tolist()
    summary = {"k_per_class": k_per_class, "n_clusters": int(sum(k_per_class)),
               "n_clustered": int(np.sum(assignment >= 0)), "criterion": info["criterion"],
               "samples_per_class": info["samples"].tolist(),
               "scores_per_k": np.where(np.isnan(info["scores"]), None,
                                        np.round(info["scores"], 5)).tolist()}
    store.mark_done(summary)
    ctx.log(f"[cluster] k per class {k_per_class} ({summary['n_clusters']} clusters)")
    return summary


def _clusters_to_tree(cluster_set) -> dict:
    """A ClusterSet as a dict of arrays (absent optional fields left out) for orbax."""
    return {k: np.asarray(v) for k, v in vars(cluster_set).items() if v is not None}


def _clusters_from_tree(tree) -> "clusters.ClusterSet":
    return clusters.ClusterSet(**{k: jax.numpy.asarray(v) for k, v in tree.items()})


def load_clusters(ctx: Context):
    """(ClusterSet, assignment of fitted images (-1: left out), assignment of every image)."""
    tree = ctx.store("cluster").load_final()
    return (_clusters_from_tree(tree["clusters"]), np.asarray(tree["assignment"]),
            np.asarray(tree["full_assignment"]))


def frequency_options(config) -> dict:
    f = config.frequency
    return dict(method=f.method, lam=f.lam, pad=f.pad, sigma=f.sigma)


def high_frequency(ctx: Context, x_u8: np.ndarray, chunk: int = 1000) -> np.ndarray:
    """H(x) = x − L(x) of uint8 images, as float32, computed a chunk at a time."""
    opts = frequency_options(ctx.config)
    out = [np.asarray(frequency.split(np.asarray(x_u8[i:i + chunk], np.float32) / 255.0,
                                      **opts)[1])
           for i in range(0, len(x_u8), chunk)]
    return np.concatenate(out) if out else np.zeros((0,) + x_u8.shape[1:], np.float32)


def load_dictionaries(ctx: Context) -> np.ndarray:
    return np.asarray(ctx.store("dictionaries").load_final()["dictionaries"])


def run_dictionaries(ctx: Context, stop_after_steps=None):
    """Stage 3: one dictionary of high-frequency patches per cluster."""
    cfg, section = ctx.config, ctx.config.dictionaries
    store = ctx.store("dictionaries")
    cluster_set, assignment, _ = load_clusters(ctx)
    train = ctx.dataset("train")
    keep = np.flatnonzero(assignment >= 0)
    high = high_frequency(ctx, train.x[keep])
    dictionaries, histories = dictionary.learn_cluster_dictionaries(
        jax.random.key(cfg.seed + 1), high, assignment[keep], int(cluster_set.means.shape[0]),
        patch_size=section.patch_size, stride=section.stride, n_atoms=section.n_atoms,
        sparsity=section.sparsity, n_iter=section.n_iter,
        max_patches_per_cluster=section.max_patches_per_cluster, method=section.method,
        mesh=ctx.mesh)
    store.save_final({"dictionaries": np.asarray(dictionaries, np.float32)})
    errors = [float(h[-1]) if len(h) else None for h in histories]
    summary = {"n_dictionaries": len(errors), "final_relative_error": errors}
    store.mark_done(summary)
    ctx.log(f"[dictionaries] {len(errors)} dictionaries; relative error "
            f"{np.nanmean([e for e in errors if e is not None]):.3f} (mean)")
    return summary


def twin_section(config, latent_weight: float):
    """The `robust` section one twin trains with: the config's, with its latent weight (the
    robust model's λ, or 0 for pgd_at): the only field in which the twins differ."""
    section = config.robust.copy_and_resolve_references()
    section.latent_weight = latent_weight
    return section


def _run_robust(ctx: Context, stage: str, latent_weight: float, stop_after_steps=None):
    """Stage 4 (`robust`), and with λ = 0 the adversarial-training comparison model
    (`pgd_at`): the same network, data, attack and budget, both initialised from the baseline
    (which keeps the robust latent in the space the clusters were fitted in), both watched for
    catastrophic overfitting on the same held-out training images."""
    section = twin_section(ctx.config, latent_weight)
    eps, step_size, noise = robust.check_section(section)
    _, params, stats = load_classifier(ctx, "baseline")
    train = ctx.dataset("train")
    per_class = int(section.get("holdout_per_class", 0))
    held = (data_lib.class_balanced_subset(train.y, per_class, ctx.config.seed)
            if per_class else np.zeros(0, np.int64))
    keep = np.setdiff1d(np.arange(len(train)), held)
    extras, cluster_set = {}, None
    if latent_weight > 0:
        cluster_set, _, full = load_clusters(ctx)
        cluster_set = parallel.replicate(ctx.mesh, cluster_set)
        extras = {"cluster": robust.training_assignments(full)[keep]}

    def loss_builder(graphdef):
        return robust.make_robust_loss(graphdef, section, cluster_set, eps, step_size, noise)

    def watch(graphdef):
        if not per_class:
            return None, None, None
        x_held, y_held = parallel.shard_global(ctx.mesh, train.x[held].astype(np.float32) / 255,
                                               train.y[held])
        return robust.overfitting_watch(graphdef, section, eps, x_held, y_held,
                                        jax.random.key(ctx.config.seed), ctx.mesh,
                                        lambda m: ctx.log(f"[{stage}] {m}"))

    return train_classifier(ctx, stage, section, loss_builder, init=(params, stats),
                            extras=extras, stop_after_steps=stop_after_steps,
                            train_ds=train.take(keep), watch=watch)


def run_robust(ctx: Context, stop_after_steps=None):
    return _run_robust(ctx, "robust", ctx.config.robust.latent_weight, stop_after_steps)


def run_pgd_at(ctx: Context, stop_after_steps=None):
    return _run_robust(ctx, "pgd_at", 0.0, stop_after_steps)


def run_purified_at(ctx: Context, stop_after_steps=None):
    """The classifier behind the purifier, fine-tuned from `purified_at.init`'s weights on
    purified adversarial images, each attack made through the whole defense
    (`srdjax.purified_training`); the purifier itself (robust model, clusters, dictionaries)
    stays as trained. Evaluated as the defense `srd_purified_at`."""
    section = ctx.config.purified_at
    eps, step_size, noise = purified_training.check_section(section)
    _, params, stats = load_classifier(ctx, section.init)
    purifier = build_purifier(ctx)

    def loss_builder(graphdef):
        return purified_training.make_purified_loss(graphdef, section, purifier, ctx.mesh,
                                                    eps, step_size, noise)

    def watch(graphdef):
        # The weights kept are the last epoch's; the summary adds what the stage is for: the
        # accuracy of purify → this classifier on the test set.
        def final(state):
            test, bs = ctx.dataset("test"), ctx.config.eval_batch_size
            purified, _ = purifier_lib.purify_uint8(purifier, test.x, ctx.mesh, bs)
            predict = training.make_predict(graphdef, ctx.mesh)
            logits, _ = training.predict_dataset(predict, state.params, state.batch_stats,
                                                 Dataset(purified, test.y, test.classes),
                                                 ctx.mesh, bs)
            acc = training.accuracy(logits, test.y)
            ctx.log(f"[purified_at] purify → purified_at: {acc:.4f} on the test images")
            return state.params, state.batch_stats, {"purified_test_acc": acc}
        return None, None, final

    return train_classifier(ctx, "purified_at", section, loss_builder, init=(params, stats),
                            stop_after_steps=stop_after_steps, watch=watch)


def build_purifier(ctx: Context) -> purifier_lib.Purifier:
    """The purifier of a workdir whose stages are done: its robust model, clusters and
    dictionaries, replicated on the mesh like the model's parameters."""
    graphdef, params, stats = load_classifier(ctx, "robust")
    cluster_set, _, _ = load_clusters(ctx)
    cluster_set = parallel.replicate(ctx.mesh, cluster_set)
    dictionaries = parallel.replicate(ctx.mesh, jax.numpy.asarray(load_dictionaries(ctx)))
    return purifier_lib.make_purifier(graphdef, params, stats, cluster_set, dictionaries,
                                      purifier_lib.options_from_config(ctx.config))


def run_purify(ctx: Context, stop_after_steps=None):
    """Stage 5 on the test set: purify every test image and report what it does to the
    baseline and robust classifiers, and how often the chosen cluster is of the true class."""
    store = ctx.store("purify")
    test = ctx.dataset("test")
    purifier = build_purifier(ctx)
    bs = ctx.config.eval_batch_size
    purified, chosen = purifier_lib.purify_uint8(purifier, test.x, ctx.mesh, bs,
                                                 desc="purify test set")
    summary = {"n_test": len(test),
               "cluster_of_true_class": float(np.mean(
                   np.asarray(purifier.clusters.class_ids)[chosen] == test.y))}
    as_ds = Dataset(purified, test.y, test.classes)
    for stage in ("baseline", "robust"):
        graphdef, params, stats = load_classifier(ctx, stage)
        predict = training.make_predict(graphdef, ctx.mesh)
        for label, ds in (("raw", test), ("purified", as_ds)):
            logits, _ = training.predict_dataset(predict, params, stats, ds, ctx.mesh, bs)
            summary[f"{stage}_{label}_acc"] = training.accuracy(logits, test.y)
    if parallel.is_main_process():
        store.dir.mkdir(parents=True, exist_ok=True)
        imageio.save_grid(store.dir / "grid.png", test.x[:8], purified[:8])
    store.mark_done(summary)
    ctx.log("[purify] " + ", ".join(f"{k}={v:.4f}" for k, v in summary.items()
                                    if isinstance(v, float)))
    return summary


STAGES = {
    "baseline": run_baseline,
    "cluster": run_cluster,
    "dictionaries": run_dictionaries,
    "robust": run_robust,
    "pgd_at": run_pgd_at,
    "purify": run_purify,
    "purified_at": run_purified_at,
}


def validate_config(config) -> None:
    """The whole config, before any work or write: every field known, typed and in range
    (srdjax.config_checks), and the dictionaries' patches tiling the images (a resolution they
    do not tile fails now, not an hour into training)."""
    config_checks.check_config(config)
    h, w = config.data.image_size
    patch_lib._grid(int(h), int(w), config.dictionaries.patch_size, config.dictionaries.stride)


def _preflight(ctx: Context) -> None:
    """What a run checks before it writes anything into the workdir: the workdir can be written,
    every stage's checkpoints (if any) come from this config and match their checksums, and, if
    a stage is left to run, its model can be built and its data read. A refused run leaves the
    workdir as it was."""
    check_output_dir(ctx.workdir, "config.workdir")
    for name in ctx.config.stages:
        ctx.store(name).check_compatible()
    for name in STAGES:  # what this run may read: every stage saved in the workdir
        if (ctx.workdir / name).is_dir():
            ctx.store(name).verify()
    pending = [n for n in ctx.config.stages if not ctx.store(n).is_done()]
    if not pending:
        return
    from flax import nnx
    nnx.eval_shape(lambda: build_model(ctx.config))  # bad model.kwargs, without the weights
    ctx.dataset("test")
    if set(pending) - {"purify"}:
        ctx.dataset("train")


def run(config, mesh=None, stop_after_steps: int | None = None) -> dict:
    """Run the config's stages in order; returns each stage's summary."""
    validate_config(config)
    ctx = Context(config, mesh)
    _preflight(ctx)
    if parallel.is_main_process():
        ctx.workdir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(ctx.workdir / "config.json", config.to_dict())
    summaries = {}
    for name in config.stages:
        store = ctx.store(name)
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
    if not path.is_file():
        raise SrdjaxError(f"{workdir} is not an srdjax checkpoint directory (no config.json)")
    try:
        saved = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SrdjaxError(f"{path} is unreadable ({type(e).__name__}: {str(e)[:80]}); it is "
                          f"the config this workdir was trained with: restore it, or retrain "
                          f"into a new workdir") from None
    check(isinstance(saved, dict) and all(k in saved for k in ("data", "model", "cluster")),
          f"{path} is not an srdjax config (no data/model/cluster sections)")
    return ml_collections.ConfigDict(saved)


def class_names(config) -> tuple[str, ...]:
    return load_dataset(config.data, "test", config.seed).classes
