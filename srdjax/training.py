"""The one training loop both classifier stages use (baseline and robust).

A stage supplies a per-batch loss; this module supplies everything around it: the optimizer and
schedule, the jitted data-parallel step (batch sharded over the mesh, parameters replicated),
on-device augmentation, deterministic data order and RNG (batch order from (seed, epoch), step
key `fold_in(key, step)`), checkpoints every epoch and resumption from the last one, progress
bars, a JSON-lines log, and an accuracy-curve plot.
"""
from __future__ import annotations

import functools
import json
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from srdjax import parallel
from srdjax.checkpoints import StageStore, atomic_write_text
from srdjax.checks import check
from srdjax.data import Dataset, augment, epoch_indices, to_float
from srdjax.models import apply_model


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any


def make_optimizer(cfg, total_steps: int) -> optax.GradientTransformation:
    """SGD with (Nesterov) momentum, decoupled weight decay and a learning-rate schedule:
    "onecycle" (linear from lr/10 to lr over the warm-up, then linearly to 0), "cyclic" (the
    triangle of fast adversarial training, Wong et al. 2020: linear from 0 to lr over the
    warm-up, then linearly to 0), "cosine" (linear warm-up from 0, cosine decay) or "constant".
    The warm-up is `warmup_fraction` of `total_steps`."""
    check(cfg.lr > 0, f"train.lr must be positive, got {cfg.lr}")
    warmup = max(1, int(cfg.warmup_fraction * total_steps))
    if cfg.schedule == "onecycle":
        lr = optax.join_schedules([optax.linear_schedule(cfg.lr * 0.1, cfg.lr, warmup),
                                   optax.linear_schedule(cfg.lr, 0.0, total_steps - warmup)],
                                  [warmup])
    elif cfg.schedule == "cyclic":
        lr = optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup),
                                   optax.linear_schedule(cfg.lr, 0.0, total_steps - warmup)],
                                  [warmup])
    elif cfg.schedule == "cosine":
        lr = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warmup, total_steps)
    elif cfg.schedule == "constant":
        lr = optax.constant_schedule(cfg.lr)
    else:
        check(False, f"train.schedule must be onecycle, cyclic, cosine or constant, got "
                     f"{cfg.schedule!r}")
    return optax.chain(optax.add_decayed_weights(cfg.weight_decay),
                       optax.sgd(lr, momentum=cfg.momentum, nesterov=cfg.nesterov))


def init_state(params, batch_stats, tx) -> TrainState:
    return TrainState(jnp.zeros((), jnp.int32), params, batch_stats, tx.init(params))


def cross_entropy(logits, y, smoothing: float = 0.0):
    labels = optax.smooth_labels(jax.nn.one_hot(y, logits.shape[-1]), smoothing)
    return optax.softmax_cross_entropy(logits, labels)


def make_train_step(graphdef, tx, loss_fn: Callable, mesh, *, crop_pad: int, flip: bool):
    """A jitted step. `loss_fn(params, batch_stats, x, y, extras, key)` returns
    (mean loss, (new batch_stats, metrics dict)); x are augmented float images in [0, 1]."""

    def step(state: TrainState, x_u8, y, extras, key):
        key = jax.random.fold_in(key, state.step)
        k_aug, k_loss = jax.random.split(key)
        x = augment(k_aug, to_float(x_u8), crop_pad, flip)
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, (stats, metrics)), grads = grad_fn(state.params, state.batch_stats, x, y,
                                                  extras, k_loss)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, **metrics}
        return TrainState(state.step + 1, params, stats, opt_state), metrics

    repl, data = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    return jax.jit(step, in_shardings=(repl, data, data, data, repl),
                   out_shardings=(repl, repl), donate_argnums=0)


@functools.lru_cache(maxsize=32)
def make_predict(graphdef, mesh, flip_tta: bool = False):
    """Jitted (logits, latent) in eval mode; with `flip_tta` the logits average the image and
    its mirror (the latent is the unflipped image's). One function per (architecture, mesh), so
    the stages that predict with it share its compiled programs."""

    def predict(params, batch_stats, x_u8):
        x = to_float(x_u8)
        logits, latent, _ = apply_model(graphdef, params, batch_stats, x)
        if flip_tta:
            logits = 0.5 * (logits + apply_model(graphdef, params, batch_stats, x[:, :, ::-1])[0])
        return logits, latent

    repl, data = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    return jax.jit(predict, in_shardings=(repl, repl, data), out_shardings=(data, data))


def predict_dataset(predict, params, batch_stats, ds: Dataset, mesh, batch_size: int,
                    desc: str | None = None):
    """Logits and latents of a whole dataset as host numpy arrays, in dataset order."""
    batch_size = max(mesh.size, batch_size - batch_size % mesh.size)
    # A short last batch is padded to a full one: one program per batch size, not two.
    pad = batch_size if len(ds) > batch_size else mesh.size
    logits, latents = [], []
    for start in tqdm(range(0, len(ds), batch_size), desc=desc, leave=False,
                      disable=desc is None or not parallel.is_main_process()):
        xb, n = parallel.pad_to_multiple(ds.x[start:start + batch_size], pad)
        lo, z = predict(params, batch_stats, parallel.shard_global(mesh, xb))
        logits.append(parallel.to_host(lo)[:n])
        latents.append(parallel.to_host(z)[:n])
    return np.concatenate(logits), np.concatenate(latents)


def accuracy(logits: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(np.argmax(logits, -1) == y))


def _trim_log(path, max_step: int) -> None:
    """On resume, drop log lines from steps after the checkpoint being resumed."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= max_step]
    atomic_write_text(path, "".join(line + "\n" for line in keep))


def plot_curves(log_path, png_path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    if not rows:
        return
    ep = [r["epoch"] for r in rows]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for key, label in (("train_acc", "train (augmented)"), ("test_acc", "test")):
        if any(key in r for r in rows):
            ax.plot(ep, [r.get(key, np.nan) for r in rows], marker="o", label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = png_path.with_name(png_path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(png_path)


def fit(store: StageStore, state: TrainState, train_step, evaluate: Callable[[Any], dict],
        train_ds: Dataset, extras: dict, mesh, *, epochs: int, batch_size: int, seed: int,
        desc: str, stop_after_steps: int | None = None,
        stop: Callable[[int, TrainState, dict], bool] | None = None) -> tuple[TrainState, dict]:
    """Run `epochs` epochs of `train_step`, checkpointing after each, resuming from the latest.

    `extras` are per-example host arrays (e.g. cluster ids) batched alongside the images.
    `evaluate(state) -> dict` runs at the end of each epoch; `stop(epoch, state, row)`, when
    given, sees that epoch's log row after its checkpoint and ends training when it returns
    True (the row then has "stopped": True). `stop_after_steps` ends the run early after that
    many steps (tests use it to simulate a kill)."""
    parallel.check_batch_size(batch_size, mesh)
    check(batch_size <= len(train_ds),
          f"batch size {batch_size} exceeds the {len(train_ds)} training images")
    steps_per_epoch = len(train_ds) // batch_size
    total = epochs * steps_per_epoch
    log_path = store.dir / "metrics.jsonl"
    step0 = 0
    stopped, metrics_summary = False, {}
    if store.latest_step() is not None:
        state, meta = store.restore(state)
        step0 = int(state.step)
        stopped = bool(meta.get("stopped", False))  # `stop` ended the run before the kill
        metrics_summary = dict(meta) if stopped else {}
        if parallel.is_main_process():
            _trim_log(log_path, step0)
            tqdm.write(f"[{store.stage}] resuming from step {step0}/{total}")
    key = jax.random.key(seed)
    bar = tqdm(total=total, initial=step0, desc=desc, unit="step", dynamic_ncols=True,
               disable=not parallel.is_main_process())
    start_time = time.time()
    for epoch in range(step0 // steps_per_epoch, 0 if stopped else epochs):
        batches = epoch_indices(len(train_ds), batch_size, seed, epoch)
        sums: dict = {}
        # batches already trained before the resume point are skipped
        todo = [idx for b, idx in enumerate(batches) if epoch * steps_per_epoch + b >= step0]

        def put(idx):
            rows = idx[parallel.process_slice(batch_size)]
            xb, yb = parallel.shard_batch(mesh, train_ds.x[rows], train_ds.y[rows])
            return xb, yb, {k: parallel.shard_batch(mesh, v[rows]) for k, v in extras.items()}

        ready = put(todo[0]) if todo else None
        for i in range(len(todo)):
            state, m = train_step(state, *ready, key)
            ready = put(todo[i + 1]) if i + 1 < len(todo) else None  # while the step runs
            # Wait for this step before dispatching the next: one collective program in flight
            # at a time. With many steps queued, XLA's CPU all-reduce rendezvous hung (forced
            # host devices on 2 cores).
            for k, v in jax.device_get(m).items():
                sums[k] = sums.get(k, 0.0) + float(v)
            bar.update(1)
            if stop_after_steps is not None and int(state.step) >= stop_after_steps:
                bar.close()
                store.save(int(state.step), state, {"epoch": epoch})
                return state, {"stopped_at": int(state.step)}
        n = len(batches) - max(0, step0 - epoch * steps_per_epoch)
        row = {"epoch": epoch + 1, "step": int(state.step),
               **{f"train_{k}": float(v) / max(n, 1) for k, v in sums.items()},
               **evaluate(state), "time_s": round(time.time() - start_time, 1)}
        bar.set_postfix({k: f"{v:.3f}" for k, v in row.items()
                         if k in ("train_loss", "train_acc", "test_acc")})
        halt = stop is not None and bool(stop(epoch + 1, state, row))
        if halt:
            row["stopped"] = True
        store.save(int(state.step), state, row)
        if parallel.is_main_process():
            with open(log_path, "a") as f:
                f.write(json.dumps(row) + "\n")
        metrics_summary = row
        if halt:
            break
    bar.close()
    if parallel.is_main_process() and log_path.exists():
        plot_curves(log_path, store.dir / "curves.png", f"{store.stage} accuracy")
    return state, metrics_summary
