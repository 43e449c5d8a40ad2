"""Purification inside an attack's loop: its throughput alone, the classifier's alone, and both.

    python benchmarks/purify_in_loop.py --workdir runs/cifar10_quick [--n 200] [--steps 5]

Every attack step through purification runs classifier(purify_bpda(x)) on each device's images
inside a `shard_map` and a `fori_loop`, as `srdjax.cascade` runs the attacks. This times, on the
same images and mesh, best of --repeats rounds run in turn, compilation excluded:
  bulk        `purify_unchecked` on the batch split over the mesh (no loop)
  purify      --steps purifications in the loop
  classifier  --steps classifier forwards in the loop (the robust model)
  both        --steps of classifier(purify_bpda(x)) in the loop
  both_barrier  the same with `optimization_barrier` between the two
and the throughput the sum of the parts predicts for `both` (1 / (1/purify + 1/classifier)).
Prints and saves JSON (benchmarks/results/purify_in_loop.json) with the machine.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import host, interleaved, write_json  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default="runs/cifar10_quick")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/purify_in_loop.json")
    args = ap.parse_args(argv)
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    from srdjax import loading, parallel, stages
    from srdjax import purifier as pl
    from srdjax.models import apply_model

    ctx = loading.context(args.workdir)
    p = stages.build_purifier(ctx)
    g, params, stats = stages.load_classifier(ctx, "robust")
    test = ctx.dataset("test")
    mesh = ctx.mesh
    x = parallel.shard_global(mesh, test.x[:args.n].astype(np.float32) / 255.0)
    k = args.steps

    def looped(step, out_shape):
        def run(pp, prm, st, v):
            def body(i, acc):
                return acc + step(pp, prm, st, jnp.clip(v + 1e-3 * i, 0.0, 1.0))
            return jax.lax.fori_loop(0, k, body, jnp.zeros(out_shape(v), jnp.float32))
        return jax.jit(jax.shard_map(run, mesh=mesh, in_specs=(P(), P(), P(), P(parallel.DATA)),
                                     out_specs=P(parallel.DATA), check_vma=False))

    logits_shape = lambda v: (v.shape[0], int(ctx.config.model.num_classes))
    classify = lambda prm, st, v: apply_model(g, prm, st, v)[0]
    steps = {
        "purify": (lambda pp, prm, st, v: pl.purify_bpda(pp, v), lambda v: v.shape),
        "classifier": (lambda pp, prm, st, v: classify(prm, st, v), logits_shape),
        "both": (lambda pp, prm, st, v: classify(prm, st, pl.purify_bpda(pp, v)), logits_shape),
        "both_barrier": (lambda pp, prm, st, v: classify(
            prm, st, jax.lax.optimization_barrier(pl.purify_bpda(pp, v))), logits_shape),
    }
    runs = {"bulk": (args.n, lambda: jax.block_until_ready(pl.purify_unchecked(p, x)))}
    for name, (step, shape) in steps.items():
        f = looped(step, shape)
        runs[name] = (k * args.n, lambda f=f: jax.block_until_ready(f(p, params, stats, x)))
    for _, run in runs.values():
        run()                                       # compile outside the timed rounds
    _, best, _ = interleaved([run for _, run in runs.values()], args.repeats)
    rates = {name: images / t for (name, (images, _)), t in zip(runs.items(), best)}
    rates["both_predicted"] = 1.0 / (1.0 / rates["purify"] + 1.0 / rates["classifier"])
    for name, r in rates.items():
        print(f"{name:15s} {r:8.0f} images/s")
    result = {"workdir": str(args.workdir), "n": args.n, "steps": k, "devices": mesh.size,
              "images_per_s": rates, "machine": host()}
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    from srdjax import xla_env
    xla_env.configure()  # before anything imports jax
    main()
