"""srdjax k-means vs scikit-learn on the same data, side by side in one run.

    python benchmarks/kmeans.py                      # 50,000 x 512 float32, k = 2..8
    python benchmarks/kmeans.py --n 5000 --d 64      # a quick run
    python benchmarks/kmeans.py --adaptive           # also adaptive_kmeans(k_max=8)
    python benchmarks/kmeans.py --floors             # also what one full pass over x costs
    python benchmarks/kmeans.py --same-start         # both from the same k-means++ centers

Data: 8 heavily overlapping Gaussian blobs, seeded: centers ~ N(0, 0.05^2 I), unit noise, so the
centers are ~1.6 noise std apart and Lloyd needs 100-300 iterations (the regime where speed
matters; well-separated blobs converge in 2-5 and time only the start). Both sides use one
k-means++ start (n_init=1), the same max_iter and tol, float32. srdjax runs on --devices host
devices (default 2, one per core) with the points sharded by rows, scikit-learn on its OpenMP
threads (both cores). With --same-start both start from scikit-learn's k-means++ centers, so
the times are Lloyd's alone and the iteration counts differ only where float rounding sends the
two paths apart. srdjax is warmed up on the same shapes first; its compile time is reported
separately. The two sides alternate for --repeats rounds and the table shows the best round of
each (medians are in the JSON). Writes benchmarks/results/kmeans.json.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.cluster import KMeans, kmeans_plusplus
from sklearn.metrics import silhouette_score as sk_silhouette

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import cpu_times, interleaved, machine, write_json  # noqa: E402

jax = jnp = km = None  # imported in main(), after --devices has set XLA_FLAGS


def make_data(n, d, seed):
    rng = np.random.default_rng(seed)
    centers = 0.05 * rng.normal(size=(8, d))
    x = centers[rng.integers(0, 8, n)] + rng.normal(size=(n, d))
    return x.astype(np.float32)


def bench_k(x, k, args):
    key = jax.random.key(args.seed + k)
    x_host = np.asarray(x)
    init = None
    if args.same_start:  # both from scikit-learn's k-means++ centers: only Lloyd is timed
        init, _ = kmeans_plusplus(x_host, k, random_state=args.seed + k)
    run = lambda: jax.block_until_ready(km.kmeans(  # noqa: E731
        key, x, k, n_init=1, max_iter=args.max_iter, tol=args.tol, chunk_size=args.chunk,
        init=None if init is None else jnp.asarray(init)))
    start = time.perf_counter()
    run()  # compile + one run
    first = time.perf_counter() - start
    sk = KMeans(k, init="k-means++" if init is None else init, n_init=1,
                max_iter=args.max_iter, tol=args.tol, random_state=args.seed + k)
    (res, _), (t_jax, t_sk), (med_jax, med_sk) = interleaved(
        [run, lambda: sk.fit(x_host)], args.repeats)
    return dict(k=k, srdjax_s=t_jax, sklearn_s=t_sk, speedup=t_sk / t_jax,
                srdjax_median_s=med_jax, sklearn_median_s=med_sk,
                compile_s=max(first - med_jax, 0.0), srdjax_inertia=float(res.inertia),
                sklearn_inertia=float(sk.inertia_),
                inertia_rel_diff=float(res.inertia) / float(sk.inertia_) - 1.0,
                srdjax_iter=int(res.n_iter), sklearn_iter=int(sk.n_iter_),
                srdjax_ms_per_iter=1e3 * t_jax / max(int(res.n_iter), 1),
                sklearn_ms_per_iter=1e3 * t_sk / max(int(sk.n_iter_), 1))


def bench_floors(x, ks, repeats):
    """Milliseconds of the two things a full Lloyd pass cannot avoid, on the same sharded x:
    reading every point (a row sum) and the distance matmul + argmin to k centers; and of
    srdjax's pruned pass (`kmeans_lloyd._sweep` per device) measuring half or all of the rows."""
    rng = np.random.default_rng(0)
    read = jax.jit(lambda x: jnp.sum(x, axis=1))
    # The barrier keeps the matmul a library call: with fewer than 8 centers XLA's CPU backend
    # otherwise fuses it into the argmin as a naive loop, 5-6x slower (srdjax's pass measures
    # blocks of rows, where this does not happen).
    nearest = jax.jit(lambda x, c: jnp.argmin(
        jnp.sum(c * c, 1) - 2.0 * jax.lax.optimization_barrier(x @ c.T), axis=1))

    def best(fn, *a):
        run = lambda: jax.block_until_ready(fn(*a))  # noqa: E731
        run()  # compile
        return 1e3 * interleaved([run], max(repeats, 5))[1][0]

    out = dict(read_ms=best(read, x), distances_ms={}, pruned_pass_ms={})
    # The pruned pass gathers the rows its bounds leave to measure, block by block; it runs
    # per device over the mesh `kmeans` itself builds for x.
    sweep = jax.jit(kmeans_lloyd.sweeper(km._row_mesh(x, len(x.sharding.device_set)),
                                         kmeans_lloyd.PRUNE_BLOCK))
    n = x.shape[0]
    like = lambda a: jax.device_put(a, x.sharding)  # noqa: E731  rows split as x's
    x_sq = jnp.sum(x * x, axis=1)
    for k in ks:
        c = jnp.asarray(rng.normal(size=(k, x.shape[1])).astype(np.float32))
        out["distances_ms"][int(k)] = best(nearest, x, c)
        labels = like(np.asarray(nearest(x, c), np.int32))  # exact: few rows move
        zeros = like(np.zeros(n, np.float32))
        fixed = (x, x_sq, like(np.ones(n, np.float32)), jnp.zeros(x.shape[1]), c,
                 jnp.ones(k, bool), labels, zeros, zeros)
        out["pruned_pass_ms"][int(k)] = {
            name: best(sweep, *fixed, like(rng.random(n) < frac))
            for name, frac in (("half", 0.5), ("all", 1.0))}
    return out


def bench_adaptive(x, args):
    key = jax.random.key(args.seed)
    run = lambda: jax.block_until_ready(km.adaptive_kmeans(
        key, x, 8, n_init=1, max_iter=args.max_iter, tol=args.tol, chunk_size=args.chunk))
    start = time.perf_counter()
    run()
    first = time.perf_counter() - start
    x_host = np.asarray(x)

    def reference():  # the same work with scikit-learn: every k, then silhouette on a sample
        rng = np.random.default_rng(args.seed)
        idx = rng.choice(len(x_host), min(2000, len(x_host)), replace=False)
        scores = [args.threshold]
        for k in range(1, 9):
            labels = KMeans(k, n_init=1, max_iter=args.max_iter, tol=args.tol,
                            random_state=args.seed + k).fit_predict(x_host)
            if k > 1:
                scores.append(sk_silhouette(x_host[idx], labels[idx]))
        return int(np.argmax(scores)) + 1

    (res, k_sk), (t_jax, t_sk), (med_jax, _) = interleaved([run, reference], args.repeats)
    return dict(srdjax_s=t_jax, sklearn_s=t_sk, speedup=t_sk / t_jax,
                compile_s=max(first - med_jax, 0.0), srdjax_k=int(res.k), sklearn_k=k_sk,
                srdjax_scores=[float(s) for s in res.scores])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--k", type=int, nargs="+", default=list(range(2, 9)))
    parser.add_argument("--max-iter", type=int, default=300)
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--chunk", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threshold", type=float, default=0.1, help="as SILHOUETTE_THRESHOLD")
    parser.add_argument("--adaptive", action="store_true", help="also time adaptive_kmeans")
    parser.add_argument("--same-start", action="store_true",
                        help="start both from scikit-learn's k-means++ centers (times Lloyd only)")
    parser.add_argument("--floors", action="store_true",
                        help="also time one read of x, one full distance pass and srdjax's pruned "
                             "pass (half / all rows) per k")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "kmeans.json"))
    parser.add_argument("--devices", type=int, default=2,
                        help="host devices to shard the points over (CPU only; 1 = no sharding)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    global jax, jnp, km, kmeans_lloyd
    if args.devices > 1:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_"
                                   f"platform_device_count={args.devices}").strip()
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    from srdjax import kmeans as km
    from srdjax import kmeans_lloyd

    cpu_start = cpu_times()
    devices = jax.devices()[:max(1, args.devices)]
    if args.n % len(devices):  # rows must split evenly over the devices
        devices = devices[:1]
    x = make_data(args.n, args.d, args.seed)
    mesh = Mesh(np.array(devices), ("data",))
    x = jax.device_put(x, NamedSharding(mesh, PartitionSpec("data")))
    print(f"{args.n} x {args.d} float32, n_init=1, max_iter={args.max_iter}, tol={args.tol}, "
          f"{len(mesh.devices.flat)} x {devices[0].platform} device(s), {os.cpu_count()} cpus, "
          f"best of {args.repeats}, load average {os.getloadavg()[0]:.1f}")
    print(f"{'k':>3} {'srdjax s':>9} {'sklearn s':>10} {'speedup':>8} {'compile s':>10} "
          f"{'srdjax inertia':>15} {'sklearn inertia':>16} {'rel diff':>9} {'iters':>9} "
          f"{'ms/iter':>11}")
    rows = []
    for k in args.k:
        r = bench_k(x, k, args)
        rows.append(r)
        print(f"{k:>3} {r['srdjax_s']:>9.3f} {r['sklearn_s']:>10.3f} {r['speedup']:>7.1f}x "
              f"{r['compile_s']:>10.2f} {r['srdjax_inertia']:>15.6g} "
              f"{r['sklearn_inertia']:>16.6g} {r['inertia_rel_diff']:>+9.2%} "
              f"{r['srdjax_iter']:>4}/{r['sklearn_iter']:<4} "
              f"{r['srdjax_ms_per_iter']:>5.1f}/{r['sklearn_ms_per_iter']:<5.1f}")
    total_jax = sum(r["srdjax_s"] for r in rows)
    total_sk = sum(r["sklearn_s"] for r in rows)
    print(f"all {total_jax:>9.3f} {total_sk:>10.3f} {total_sk / total_jax:>7.1f}x")
    report = dict(n=args.n, d=args.d, max_iter=args.max_iter, tol=args.tol, seed=args.seed,
                  start="same: scikit-learn's k-means++" if args.same_start else "each its own",
                  chunk=args.chunk, devices=[str(dv) for dv in mesh.devices.flat],
                  repeats=args.repeats, rows=rows,
                  total=dict(srdjax_s=total_jax, sklearn_s=total_sk,
                             speedup=total_sk / total_jax))
    if args.floors:
        f = bench_floors(x, args.k, args.repeats)
        report["floors"] = f
        print(f"one read of x: {f['read_ms']:.2f} ms; one full pass of distances + argmin: "
              + ", ".join(f"k={k} {t:.2f} ms" for k, t in f["distances_ms"].items()))
        print("srdjax's pruned pass measuring half / all of the rows: " + ", ".join(
            f"k={k} {t['half']:.2f} / {t['all']:.2f} ms"
            for k, t in f["pruned_pass_ms"].items()))
    if args.adaptive:
        a = bench_adaptive(x, args)
        report["adaptive"] = a
        print(f"adaptive k_max=8: srdjax {a['srdjax_s']:.3f} s (compile {a['compile_s']:.1f} s, "
              f"k={a['srdjax_k']}), sklearn loop + silhouette {a['sklearn_s']:.3f} s "
              f"(k={a['sklearn_k']}), {a['speedup']:.1f}x")
    report["machine"] = machine(since=cpu_start)
    write_json(args.out, report)


if __name__ == "__main__":
    main()
