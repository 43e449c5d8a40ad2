"""Seconds per image of each standard AutoAttack attack, on a bare classifier and on srd_robust.

    python benchmarks/attack_speed.py                       # 64 bare images, 8 through srd_robust
    python benchmarks/attack_speed.py --n-bare 32 --n-defense 8 --attacks apgd-ce square

Each attack runs at its standard AutoAttack strength (APGD-CE 100 steps; APGD-T 100 steps x 9
targets; FAB-T 100 steps x 9 targets; Square 5,000 queries; one restart each) on the first
clean-correct images of the evaluation's class-balanced test set, against
  bare        the quick config's PGD-AT classifier (`--stage`), and
  srd_robust  purify -> robust classifier, `srdjax.load_defense(workdir, "robust")`,
              whose gradient is the BPDA gradient through purification.
Before each timed run the attack runs once on the same batch (at full strength: at a few steps
or queries), so that the compilation is outside the time (it is reported apart). With --fraction F < 1 every attack
runs F of its steps (queries) and the time is divided by F: an estimate of the full attack
from its per-step cost, which is constant for APGD and FAB (fixed steps per target) and, for
Square, per query of an image not yet broken; the JSON says which fraction was run. The time per image is the timed
run's wall time over the batch; an attack that stops early on the images it broke (Square,
FAB-T's later targets) costs less on them, so the figure is for this batch's mix.

The estimate of a whole standard-suite cascade (each attack only on the images every earlier
attack left correct) multiplies each per-image cost by the number of images that reach it: the
clean-correct fraction for APGD-CE, the robust fraction for the later attacks (APGD-CE breaks
nearly all that the suite breaks), by default the quick config's figures at n = 200 (bare PGD-AT
53% clean, 20.5% robust; srd_robust 51%, 20%), or --reach CLEAN ROBUST. It is an estimate
from these figures, not a measurement.

Prints and saves JSON (benchmarks/results/attack_speed.json) with the machine.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
WORKDIR = Path("/work/runs_shared/runs/cifar10_quick")
SUITE = ("apgd-ce", "apgd-t", "fab-t", "square")
# (clean, robust) fractions of the quick config at n = 200 (an independent APGD/Square cascade).
REACH = {"bare": (0.53, 0.205), "srd_robust": (0.51, 0.20)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default=str(WORKDIR))
    p.add_argument("--stage", default="pgd_at", help="the bare classifier's stage")
    p.add_argument("--n-bare", type=int, default=64)
    p.add_argument("--n-defense", type=int, default=8)
    p.add_argument("--defenses", nargs="+", default=["bare", "srd_robust"],
                   choices=["bare", "srd_robust"])
    p.add_argument("--attacks", nargs="+", default=list(SUITE), choices=list(SUITE))
    p.add_argument("--norm", choices=("linf", "l2"), default="linf")
    p.add_argument("--eps", type=float, default=None, help="default 8/255 (linf), 0.5 (l2)")
    p.add_argument("--fraction", type=float, default=1.0,
                   help="run this fraction of each attack's steps and scale the time up")
    p.add_argument("--eval-n", type=int, default=1000, help="images of the estimated evaluation")
    p.add_argument("--reach", type=float, nargs=2, default=None, metavar=("CLEAN", "ROBUST"),
                   help="clean and robust fractions for the estimate (both defenses)")
    p.add_argument("--out", default=str(REPO / "benchmarks/results/attack_speed.json"))
    args = p.parse_args(argv)
    if args.eps is None:
        args.eps = 8 / 255 if args.norm == "linf" else 0.5
    return args


def standard_attack(name: str, warmup: bool, fraction: float = 1.0):
    """The attack `name` at `fraction` of the standard suite's strength (or a few steps, to
    compile it)."""
    from srdjax import attacks
    steps = 2 if warmup else max(1, round(100 * fraction))
    if name == "apgd-ce":
        return lambda f, x, y, **kw: attacks.apgd(f, x, y, loss="ce", steps=steps,
                                                  restarts=1, **kw)
    if name == "apgd-t":
        return lambda f, x, y, **kw: attacks.apgd_targeted(f, x, y, steps=steps,
                                                           n_target_classes=9, **kw)
    if name == "fab-t":
        return lambda f, x, y, **kw: attacks.fab_targeted(f, x, y, steps=steps,
                                                          n_target_classes=9, **kw)
    queries = 10 if warmup else max(1, round(5000 * fraction))
    return lambda f, x, y, **kw: attacks.square(f, x, y, n_queries=queries, p_init=0.8, **kw)


def images(config, n, logits_fn):
    """The first n clean-correct images of the evaluation's class-balanced test set."""
    from srdjax.data import class_balanced_subset, load_dataset
    data_config = config.data.copy_and_resolve_references()
    data_config.test_per_class = 0
    test = load_dataset(data_config, "test", 0)
    index = class_balanced_subset(test.y, 100, 0)
    x = test.x[index].astype(np.float32) / 255.0
    y = test.y[index].astype(np.int32)
    keep = []
    for i in range(0, len(y), 50):
        correct = np.asarray(logits_fn(x[i:i + 50])).argmax(1) == y[i:i + 50]
        keep.extend(i + np.flatnonzero(correct))
        if len(keep) >= n:
            break
    keep = np.asarray(keep[:n])
    return x[keep], y[keep]


def time_attack(name, logits_fn, x, y, norm, eps, fraction):
    import jax
    import jax.numpy as jnp
    key = jax.random.PRNGKey(0)
    xj, yj = jnp.asarray(x), jnp.asarray(y)
    start = time.perf_counter()
    # Part of an attack is warmed up by the same call, whose programs may depend on the steps.
    jax.block_until_ready(standard_attack(name, fraction == 1, fraction)(
        logits_fn, xj, yj, eps=eps, key=key, norm=norm))
    warm = time.perf_counter() - start
    start = time.perf_counter()
    adv = jax.block_until_ready(standard_attack(name, False, fraction)(
        logits_fn, xj, yj, eps=eps, key=key, norm=norm))
    seconds = time.perf_counter() - start
    broken = int(np.sum(np.asarray(logits_fn(adv)).argmax(1) != y))
    return {"images": len(y), "fraction_run": fraction, "seconds": seconds,
            "seconds_per_image": seconds / fraction / len(y), "broken": broken,
            "warmup_seconds": warm}


def cascade_estimate(per_image, clean, robust, n):
    """Seconds of a standard cascade on n images: each attack on the images that reach it."""
    reach = {a: clean if a == SUITE[0] else robust for a in SUITE}
    parts = {a: per_image[a] * reach[a] * n for a in SUITE if a in per_image}
    return {"images": n, "reach_fraction": reach, "seconds_per_attack": parts,
            "seconds": sum(parts.values()), "complete": len(parts) == len(SUITE)}


def main(argv=None):
    args = parse_args(argv)
    sys.path.insert(0, str(REPO))
    import jax
    from benchmarks.common import cpu_times, machine, write_json
    from srdjax import stages
    from srdjax.models import apply_model
    from srdjax.loading import load_defense
    cpu_start = cpu_times()
    config = stages.load_config(args.workdir)
    config.workdir = str(args.workdir)
    result = {"norm": args.norm, "eps": args.eps, "workdir": args.workdir, "defenses": {}}
    for defense in args.defenses:
        if defense == "bare":
            graphdef, params, stats = stages.load_classifier(stages.Context(config), args.stage)
            logits_fn = jax.jit(lambda x: apply_model(graphdef, params, stats, x)[0])
            n = args.n_bare
        else:
            logits_fn = load_defense(args.workdir, "robust")
            n = args.n_defense
        x, y = images(config, n, logits_fn)
        rows = {}
        result["defenses"][defense] = {"attacks": rows, "classifier": args.stage if defense ==
                                       "bare" else "purify -> robust (BPDA)"}
        for name in args.attacks:
            rows[name] = time_attack(name, logits_fn, x, y, args.norm, args.eps, args.fraction)
            write_json(args.out, {**result, "machine": machine(since=cpu_start)})
            r = rows[name]
            print(f"{defense:11s} {name:8s} {r['seconds_per_image']:9.3f} s/image "
                  f"({r['images']} images, {r['broken']} broken, warm-up {r['warmup_seconds']:.1f} s)",
                  flush=True)
        per_image = {a: r["seconds_per_image"] for a, r in rows.items()}
        estimate = cascade_estimate(per_image, *(args.reach or REACH[defense]), args.eval_n)
        print(f"{defense:11s} estimated standard cascade on {args.eval_n} images: "
              f"{estimate['seconds'] / 60:.1f} min"
              + ("" if estimate["complete"] else " (only the attacks timed)"))
        result["defenses"][defense]["cascade_estimate"] = estimate
    result["machine"] = machine(since=cpu_start)
    write_json(args.out, result)


if __name__ == "__main__":
    main()
