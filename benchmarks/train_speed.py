"""Seconds per training step of a config's baseline (and robust) stage, and the implied stage
time: python benchmarks/train_speed.py --config configs/cifar10_quick.py

Times `--steps` jitted steps on random uint8 batches after one warm-up (compile) step; the
stage time is steps_per_epoch × epochs × s/step (data loading is host-side indexing, included
in the real run but negligible). Run it on an otherwise idle machine.
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from srdjax import xla_env  # noqa: E402

xla_env.configure(compilation_cache=False)  # compile times are reported

import importlib.util  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import machine, write_json  # noqa: E402
from srdjax import parallel, robust, stages, training  # noqa: E402
from srdjax.models import apply_model, split_model  # noqa: E402


def time_steps(step, state, mesh, batch, steps, extras=None):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 10, batch).astype(np.int32)
    xb, yb = parallel.shard_batch(mesh, x, y)
    eb = {k: parallel.shard_batch(mesh, v[:batch]) for k, v in (extras or {}).items()}
    key = jax.random.key(0)
    t0 = time.perf_counter()
    state, m = step(state, xb, yb, eb, key)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        state, m = step(state, xb, yb, eb, key)
    jax.block_until_ready(m)
    return (time.perf_counter() - t0) / steps, compile_s


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/cifar10_quick.py")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--robust-steps", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/train_speed.json")
    args = ap.parse_args()
    spec = importlib.util.spec_from_file_location("cfg", args.config)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    mesh = parallel.make_mesh()
    graphdef, params, stats = split_model(stages.build_model(config))
    rows = {}
    n_train = 50000 if not config.data.train_per_class else 10 * config.data.train_per_class

    b = config.baseline
    tx = training.make_optimizer(b, 1000)

    def baseline_loss(params, stats, x, y, extras, key):
        logits, _, stats = apply_model(graphdef, params, stats, x, train=True)
        return training.cross_entropy(logits, y, b.label_smoothing).mean(), (stats, {})

    step = training.make_train_step(graphdef, tx, baseline_loss, mesh,
                                    crop_pad=config.data.crop_pad, flip=config.data.flip)
    fresh = jax.tree.map(jax.numpy.copy, (params, stats))
    state = parallel.replicate(mesh, training.init_state(*fresh, tx))
    s, c = time_steps(step, state, mesh, b.batch_size, args.steps)
    steps_total = (n_train // b.batch_size) * b.epochs
    rows["baseline"] = {"s_per_step": s, "compile_s": c, "batch": b.batch_size,
                        "steps": steps_total, "stage_minutes": steps_total * s / 60}

    r = config.robust
    eps, step_size, noise = robust.check_section(r)
    tx = training.make_optimizer(r, 1000)
    for name, lam in (("pgd_at", 0.0), ("robust", float(r.latent_weight))):
        section = r.copy_and_resolve_references()
        section.latent_weight = lam
        cs = None
        extras = {}
        if lam > 0:
            from srdjax import clusters
            k = 20
            d = jax.eval_shape(lambda: apply_model(graphdef, params, stats,
                                                   jax.numpy.zeros((1, 32, 32, 3)))[1]).shape[-1]
            cs = parallel.replicate(mesh, clusters.ClusterSet(
                means=jax.numpy.zeros((k, d)), stds=jax.numpy.ones((k, d)),
                class_ids=jax.numpy.arange(k) % 10, index_in_class=jax.numpy.arange(k) // 10,
                counts=jax.numpy.ones(k, int)))
            extras = {"cluster": (np.arange(r.batch_size) % k).astype(np.int32)}
        loss = robust.make_robust_loss(graphdef, section, cs, eps, step_size, noise)
        step = training.make_train_step(graphdef, tx, loss, mesh, crop_pad=config.data.crop_pad,
                                        flip=config.data.flip)
        # Fresh arrays: the step donates its input state, which may alias `params`.
        fresh = jax.tree.map(jax.numpy.copy, (params, stats))
        state = parallel.replicate(mesh, training.init_state(*fresh, tx))
        s, c = time_steps(step, state, mesh, r.batch_size, args.robust_steps, extras)
        steps_total = (n_train // r.batch_size) * r.epochs
        rows[name] = {"s_per_step": s, "compile_s": c, "batch": r.batch_size,
                      "attack": r.attack, "attack_steps": r.attack_steps, "steps": steps_total,
                      "stage_minutes": steps_total * s / 60}
    for name, row in rows.items():
        print(f"{name:>9}: {row['s_per_step']:.3f} s/step × {row['steps']} steps = "
              f"{row['stage_minutes']:.1f} min (compile {row['compile_s']:.1f} s)")
    write_json(args.out, {"config": args.config, "devices": mesh.size, "machine": machine(),
                          "rows": rows})


if __name__ == "__main__":
    main()
