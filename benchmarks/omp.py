"""srdjax batched OMP vs scikit-learn OMP on the same signals, in one run.

    python benchmarks/omp.py                      # 10,000 CIFAR high-frequency 8x8x3 patches,
                                                  # 256 atoms, sparsity 8, float32
    python benchmarks/omp.py --data random --n 20000 --devices 2
    python benchmarks/omp.py --argmax-ab          # also: the greedy step's argmax, old vs new
    python benchmarks/omp.py --data random --devices 2 --spams   # with SPAMS beside it

--spams adds SPAMS (Mairal et al.; the fastest CPU OMP we know of), installed by hand:
`pip install spams-bin` (a binary wheel with its own OpenBLAS and OpenMP). SPAMS codes the same
float32 signals with `numThreads` = --spams-threads (default: --devices). Its `omp` must be
given eps=0 and lambda1=0 explicitly: left unset (spams-bin 2.6.14), about one process in four
returned no coefficient at all. SPAMS' `omp` is forward selection (order-recursive matching
pursuit, its coreORMP): each step takes the atom that most reduces the residual after the
orthogonal projection, where OMP (srdjax, scikit-learn) takes the atom most correlated with the
residual. The two agree on the first atom and often on all of them, not always; the rows report
how often the supports are the same and each one's mean squared residual.

scikit-learn is timed two ways, `sparse_encode(algorithm="omp")` and `orthogonal_mp_gram` with a
precomputed Gram matrix and correlations (what sparse_encode calls underneath), and the faster is
the reference. srdjax is warmed up first; its compile time is reported separately. Times are the
minimum over --repeats runs (the median is reported too: the machine may be shared).
"""
from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=10_000, help="number of signals")
    parser.add_argument("--atoms", type=int, default=256)
    parser.add_argument("--sparsity", type=int, default=8)
    parser.add_argument("--patch", type=int, default=8, help="patch size (dim = patch² · 3)")
    parser.add_argument("--data", choices=("cifar", "random"), default="cifar",
                        help="CIFAR-10 high-frequency patches (dictionary: other patches) or "
                             "Gaussian signals with a Gaussian dictionary")
    parser.add_argument("--chunk", type=int, default=1024, help="srdjax chunk_size")
    parser.add_argument("--devices", type=int, default=1,
                        help="host CPU devices to shard the signals over (XLA forced devices)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sklearn-repeats", type=int, default=2)
    parser.add_argument("--argmax-ab", action="store_true",
                        help="also time srdjax's OMP with the row-wise argmax it used before "
                             "2026-11-28 against the grouped one, alternating, in this run")
    parser.add_argument("--spams", action="store_true", help="also time SPAMS' omp")
    parser.add_argument("--spams-threads", type=int, default=None,
                        help="SPAMS numThreads (default: --devices)")
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/omp.json"))
    return parser.parse_args()


def make_data(args, rng):
    import numpy as np
    dim = args.patch * args.patch * 3
    if args.data == "random":
        dictionary = rng.standard_normal((args.atoms, dim))
        signals = rng.standard_normal((args.n, dim))
    else:
        from srdjax.dictionary import sample_patches
        from srdjax.frequency import split
        import jax
        data_dir = Path(os.environ.get("SRDJAX_DATA_DIR", REPO.parent / "shared/data/cifar10"))
        with np.load(data_dir / "test.npz", allow_pickle=False) as f:
            images = (f["x"][:2000] / 255.0).astype(np.float32)
        _, high = split(images)
        patches = np.asarray(sample_patches(jax.random.PRNGKey(0), high, args.n + args.atoms,
                                            args.patch))
        dictionary, signals = patches[:args.atoms], patches[args.atoms:]
    dictionary = dictionary / np.linalg.norm(dictionary, axis=1, keepdims=True)
    return dictionary.astype(np.float32), signals.astype(np.float32)


def rowwise_first_argmax(values):
    """srdjax's `omp._first_argmax` before 2026-11-28: one max and one min along each row."""
    import jax.numpy as jnp
    top = jnp.max(values, axis=1, keepdims=True)
    lanes = jnp.arange(values.shape[1], dtype=jnp.int32)[None, :]
    return jnp.min(jnp.where(values == top, lanes, values.shape[1]), axis=1), top[:, 0]


def argmax_ab(omp_lib, d_dev, x_dev, k, chunk, repeats):
    """Best seconds of OMP coding with each argmax, alternating; and whether the codes agree."""
    import functools
    import jax
    import numpy as np
    grouped = omp_lib._first_argmax
    code = functools.partial(omp_lib.omp_support_unchecked.__wrapped__, sparsity=k,
                             use_tol=False, chunk_size=chunk)
    gram = d_dev @ d_dev.T
    programs = {}
    for name, argmax in (("rowwise", rowwise_first_argmax), ("grouped", grouped)):
        omp_lib._first_argmax = argmax      # read when the program is traced, just below
        try:
            program = jax.jit(code)
            out = jax.block_until_ready(program(d_dev, x_dev, gram, 0.0))
        finally:
            omp_lib._first_argmax = grouped
        programs[name] = (program, out)
    from benchmarks.common import interleaved
    _, (rowwise_s, grouped_s), _ = interleaved(
        [lambda p=p: jax.block_until_ready(p(d_dev, x_dev, gram, 0.0))
         for p, _ in programs.values()], repeats)
    (s_a, v_a), (s_b, v_b) = (programs[n][1] for n in ("rowwise", "grouped"))
    return {"rowwise_s": rowwise_s, "grouped_s": grouped_s, "speedup": rowwise_s / grouped_s,
            "same_supports": bool(np.array_equal(np.asarray(s_a), np.asarray(s_b))),
            "max_abs_value_diff": float(np.abs(np.asarray(v_a) - np.asarray(v_b)).max())}


def spams_omp(dictionary, signals, k, threads):
    """SPAMS' OMP codes [N, atoms] of the rows of `signals` (SPAMS wants Fortran-ordered
    columns), and a function that reruns the coding alone for timing."""
    import numpy as np
    import spams
    d = np.asfortranarray(dictionary.T)
    x = np.asfortranarray(signals.T)

    def run():
        return spams.omp(x, d, L=k, eps=0.0, lambda1=0.0, numThreads=threads)
    return run, lambda codes: np.asarray(codes.todense()).T


def timed(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return out, times


def main():
    args = parse_args()
    if args.devices > 1:  # must happen before jax is imported
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={args.devices}")
    sys.path.insert(0, str(REPO))
    import jax
    import jax.numpy as jnp
    import numpy as np
    import sklearn
    from sklearn.decomposition import sparse_encode
    from sklearn.linear_model import orthogonal_mp_gram

    from benchmarks.common import cpu_times, interleaved, machine, write_json
    from srdjax import omp as omp_lib

    cpu_start = cpu_times()
    dictionary, signals = make_data(args, np.random.default_rng(0))
    k = args.sparsity

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # sklearn's "ended prematurely"
        ref_encode, t_encode = timed(lambda: sparse_encode(
            signals, dictionary, algorithm="omp", n_nonzero_coefs=k), args.sklearn_repeats)
        ref_gram, t_gram = timed(lambda: orthogonal_mp_gram(
            dictionary @ dictionary.T, dictionary @ signals.T, n_nonzero_coefs=k).T,
            args.sklearn_repeats)
    sk_name, ref, sk_times = min(
        [("sparse_encode(algorithm='omp')", ref_encode, t_encode),
         ("orthogonal_mp_gram (precomputed Gram)", ref_gram, t_gram)], key=lambda r: min(r[2]))

    d_dev, x_dev = jnp.asarray(dictionary), jnp.asarray(signals)
    if args.devices > 1:
        from jax.sharding import Mesh, NamedSharding, PartitionSpec
        mesh = Mesh(np.array(jax.devices()[:args.devices]), ("data",))
        x_dev = jax.device_put(x_dev, NamedSharding(mesh, PartitionSpec("data")))
        d_dev = jax.device_put(d_dev, NamedSharding(mesh, PartitionSpec()))

    def run():
        return omp_lib.omp(d_dev, x_dev, k, chunk_size=args.chunk).block_until_ready()

    start = time.perf_counter()
    run()
    first_call = time.perf_counter() - start
    codes, jax_times = timed(run, args.repeats)
    codes = np.asarray(codes)

    same_support = np.all((codes != 0) == (ref != 0), axis=1)
    diff = np.abs(codes - ref)
    result = {
        "n_signals": args.n, "dim": int(signals.shape[1]), "n_atoms": args.atoms,
        "sparsity": k, "dtype": "float32", "data": args.data, "chunk_size": args.chunk,
        "devices": args.devices,
        "sklearn_reference": sk_name,
        "sklearn_s": min(sk_times), "sklearn_median_s": float(np.median(sk_times)),
        "sklearn_sparse_encode_s": min(t_encode), "sklearn_gram_s": min(t_gram),
        "srdjax_s": min(jax_times), "srdjax_median_s": float(np.median(jax_times)),
        "srdjax_compile_s": first_call - min(jax_times),
        "speedup": min(sk_times) / min(jax_times),
        "max_abs_coef_diff": float(diff.max()),
        "max_abs_coef_diff_same_support": float(diff[same_support].max()) if same_support.any()
        else None,
        "support_agreement": float(same_support.mean()),
        "sklearn": sklearn.__version__,
    }
    rows = [("scikit-learn  " + sk_name, result["sklearn_s"], result["sklearn_median_s"]),
            ("srdjax omp", result["srdjax_s"], result["srdjax_median_s"])]
    print(f"{args.n} signals x dim {result['dim']}, {args.atoms} atoms, sparsity {k}, float32, "
          f"{args.data} data, {args.devices} device(s)")
    print(f"{'':52s} {'min s':>9s} {'median s':>9s}")
    for name, best, median in rows:
        print(f"{name:52s} {best:9.4f} {median:9.4f}")
    print(f"(sklearn sparse_encode {min(t_encode):.4f} s, orthogonal_mp_gram {min(t_gram):.4f} s)")
    print(f"speedup {result['speedup']:.1f}x   srdjax compile {result['srdjax_compile_s']:.2f} s")
    print(f"support agreement {result['support_agreement']:.4f}   max |coef diff| "
          f"{result['max_abs_coef_diff']:.3g} (same support: "
          f"{result['max_abs_coef_diff_same_support']:.3g})")
    if args.spams:
        import spams
        threads = args.spams_threads or args.devices
        spams_run, spams_dense = spams_omp(dictionary, signals, k, threads)
        spams_run()
        (spams_codes, jax_codes), (s_best, j_best), (s_med, j_med) = interleaved(
            [spams_run, run], args.repeats)
        spams_codes = spams_dense(spams_codes)
        residual = lambda c: float(np.mean(np.sum((signals - c @ dictionary) ** 2, axis=1)))
        same = np.all((np.asarray(jax_codes) != 0) == (spams_codes != 0), axis=1)
        result["spams"] = {
            "version": importlib.metadata.version("spams-bin"), "threads": threads,
            "spams_s": s_best, "spams_median_s": s_med,
            "srdjax_s": j_best, "srdjax_median_s": j_med, "srdjax_over_spams": j_best / s_best,
            "nonzeros_per_signal": float((spams_codes != 0).sum(1).mean()),
            "mean_sq_residual_spams": residual(spams_codes),
            "mean_sq_residual_srdjax": residual(np.asarray(jax_codes)),
            "support_agreement_srdjax": float(same.mean()),
            "support_agreement_sklearn": float(np.all((spams_codes != 0) == (ref != 0),
                                                      axis=1).mean()),
            "max_abs_coef_diff_same_support": float(
                np.abs(np.asarray(jax_codes) - spams_codes)[same].max()) if same.any() else None}
        sp = result["spams"]
        print(f"SPAMS omp ({threads} threads), interleaved with srdjax: SPAMS {s_best:.4f} s "
              f"(median {s_med:.4f}), srdjax {j_best:.4f} s (median {j_med:.4f}): srdjax "
              f"{sp['srdjax_over_spams']:.2f}x SPAMS' time")
        print(f"same supports as srdjax {sp['support_agreement_srdjax']:.4f}, as sklearn "
              f"{sp['support_agreement_sklearn']:.4f}; max |coef diff| on them "
              f"{sp['max_abs_coef_diff_same_support']:.3g}; mean squared residual SPAMS "
              f"{sp['mean_sq_residual_spams']:.4f}, srdjax {sp['mean_sq_residual_srdjax']:.4f}")
    if args.argmax_ab:
        ab = argmax_ab(omp_lib, d_dev, x_dev, k, args.chunk, args.repeats)
        result["argmax_ab"] = ab
        print(f"argmax in the greedy step: row-wise {ab['rowwise_s']:.4f} s, grouped "
              f"{ab['grouped_s']:.4f} s ({ab['speedup']:.2f}x); same supports "
              f"{ab['same_supports']}, max |value diff| {ab['max_abs_value_diff']:.3g}")
    result["machine"] = machine(since=cpu_start)
    write_json(args.out, result)


if __name__ == "__main__":
    main()
