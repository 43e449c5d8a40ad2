"""Purified images per second: python benchmarks/purify.py [--checkpoint runs/cifar10_quick]

Without a checkpoint, a purifier of the quick config's sizes is built from random weights
(SmallCNN, 20 clusters, 256-atom dictionaries of 8×8×3 patches, sparsity 8, stride 1): the cost
of purification does not depend on the values. Sizes 32 and 128 by default (`--sizes`); sizes
above 32 use configs/imagenet10.py's patches, stride and dictionaries for that resolution
(128: 16×16 patches at stride 8, 512 atoms, sparsity 12).
Compile time is measured separately and excluded from the throughput. `--parts` also times
each step (split, cluster choice, patches, correlations, OMP, rebuild) jitted alone on one device.
`--profile` also prints where the whole program spends its time, per kind of XLA operation
(`benchmarks.common.op_profile`, summed over both devices' threads). Every run records the CPU
model and the share of CPU time the hypervisor gave to other guests during it
(`cpu_steal_share`): on a shared virtual machine a run loses that share of its speed.
`--map-ab` times purify, and purify with its BPDA gradient, with `parallel.chunked_map` as it
and as a plain `lax.map` over a swapped copy of its inputs, alternating in
one process, run per device, and prints their largest difference.
`--grad` also times what a gradient attack pays per image: purify with its BPDA gradient (the
forward pass and the written-out backward of `purify_bpda`), next to the same gradient by
autodiff of the fixed-support linear map as it was before (a vmapped least squares on gathered
atoms), both run per device as the attacks run, and prints their largest difference.
"""
import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from srdjax import xla_env  # noqa: E402  (before anything imports jax)

xla_env.configure(compilation_cache=False)  # compile times are reported

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import (cpu_times, interleaved, machine, op_profile,  # noqa: E402
                               write_json)
from configs import imagenet10  # noqa: E402
from srdjax import clusters, loading, parallel, purifier as pur  # noqa: E402
from srdjax.models import create_model, split_model  # noqa: E402


def random_purifier(size, n_clusters=20, n_atoms=256, patch=8, stride=1, sparsity=8,
                    image_chunk=0):
    graphdef, params, stats = split_model(create_model("small_cnn", 10, 0))
    rng = np.random.default_rng(0)
    d = 128
    cs = clusters.ClusterSet(
        means=jnp.asarray(rng.normal(size=(n_clusters, d)), jnp.float32),
        stds=jnp.ones((n_clusters, d), jnp.float32),
        class_ids=jnp.asarray(np.arange(n_clusters) % 10, jnp.int32),
        index_in_class=jnp.asarray(np.arange(n_clusters) // 10, jnp.int32),
        counts=jnp.ones(n_clusters, jnp.int32))
    dic = rng.normal(size=(n_clusters, n_atoms, patch * patch * 3))
    dic /= np.linalg.norm(dic, axis=-1, keepdims=True)
    pad = 16 * size // 32
    options = pur.PurifyOptions(image_size=(size, size), patch_size=patch, stride=stride,
                                sparsity=sparsity, pad=pad, image_chunk=image_chunk)
    return pur.make_purifier(graphdef, params, stats, cs, jnp.asarray(dic, jnp.float32), options)


def _times(fn, args, repeats):
    """(seconds of the first call, which compiles; seconds of each of `repeats` later calls)."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return first, times


def parts(purifier, x, repeats):
    """Seconds per batch of each step of purify, each jitted alone on one device: they overlap
    and fuse differently inside the whole program, so they need not add up to its time."""
    from srdjax import patches as patch_lib
    p, o = purifier, purifier.options
    x = jax.device_put(x, jax.devices()[0])
    low, high = pur._split(p, x)
    k = pur.choose_cluster(p, x)
    patches = patch_lib._extract(high, o.patch_size, o.stride)
    support, values = pur._supports(p, k, patches)
    steps = {
        "split": (lambda p, x: pur._split(p, x), (p, x)),
        "choose_cluster": (pur.choose_cluster, (p, x)),
        "extract_patches": (lambda h: patch_lib._extract(h, o.patch_size, o.stride), (high,)),
        "correlations": (lambda p, k, s: jnp.einsum("npd,nad->npa", s, p.dictionaries[k]),
                         (p, k, patches)),
        "omp (with correlations)": (lambda p, k, s: pur._supports(p, k, s), (p, k, patches)),
        "rebuild": (lambda p, low, k, s, v: pur._rebuild(p, low, k, s, v, x.shape[1:]),
                    (p, low, k, support, values)),
    }
    return {name: min(_times(jax.jit(fn), args, repeats)[1]) for name, (fn, args) in steps.items()}


def _reference_linear(p, x, k, support):
    """The fixed-support linear map of purify as autodiff saw it before its vjp was written out:
    least squares on each patch's gathered atoms (omp.least_squares_on_support), vmapped."""
    from srdjax import patches as patch_lib
    from srdjax import omp
    o = p.options
    low, high = pur._split(p, x)
    patches = patch_lib._extract(high, o.patch_size, o.stride)
    values = jax.vmap(omp.least_squares_on_support)(p.dictionaries[k], patches, support)
    return pur._rebuild(p, low, k, support, values, x.shape[1:])


def grad_bench(purifier, x, w, repeats, mesh):
    """Images per second of purify + BPDA gradient, written-out backward vs autodiff, and the
    largest absolute difference of the two gradients."""
    from jax.sharding import PartitionSpec as P
    axis = mesh.axis_names[0]

    def written(p, u, w):
        return jax.grad(lambda v: jnp.sum(pur.purify_bpda(p, v) * w))(u)

    def autodiff(p, u, w):
        _, k, support = pur._purify_with_choices(p, u)
        return jax.vjp(lambda v: _reference_linear(p, v, k, support), u)[1](w)[0]

    out, rates = {}, {}
    for name, fn in (("written_out", written), ("autodiff_reference", autodiff)):
        run = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(P(), P(axis), P(axis)),
                                    out_specs=P(axis), check_vma=False))
        _, times = _times(run, (purifier, x, w), repeats)
        out[name], rates[name] = run(purifier, x, w), x.shape[0] / min(times)
    diff = float(jnp.max(jnp.abs(out["written_out"] - out["autodiff_reference"])))
    scale = float(jnp.max(jnp.abs(out["autodiff_reference"])))
    return {"images_per_s": rates, "max_abs_diff": diff, "max_abs_grad": scale}


def _swapped_chunked_map(fn, chunk, *arrays):
    """The alternative to parallel.chunked_map: the same chunks, mapped with lax.map over a
    [n_chunks, c, ...] copy of every input (and the outputs swapped back)."""
    n = arrays[0].shape[0]
    n_chunks, c, pad = parallel.chunk_layout(n, chunk)

    def split(a):
        a = jnp.pad(a, ((0, pad),) + ((0, 0),) * (a.ndim - 1))
        return a.reshape(c, n_chunks, *a.shape[1:]).swapaxes(0, 1)

    out = jax.lax.map(lambda args: fn(*args), tuple(split(a) for a in arrays))
    return jax.tree.map(lambda a: a.swapaxes(0, 1).reshape(n_chunks * c, *a.shape[2:])[:n], out)


def map_ab(purifier, x, w, repeats, mesh):
    """Images per second of purify and of purify + BPDA gradient with each chunked_map, the
    two alternating (`benchmarks.common.interleaved`), and their largest differences."""
    from jax.sharding import PartitionSpec as P
    axis, current = mesh.axis_names[0], parallel.chunked_map

    def program(chunked_map, grad):
        def run(p, u, w):
            parallel.chunked_map = chunked_map   # read when the program is traced
            try:
                if grad:
                    return jax.grad(lambda v: jnp.sum(pur.purify_bpda(p, v) * w))(u)
                return pur._purify_with_choices(p, u)[0]
            finally:
                parallel.chunked_map = current
        return jax.jit(jax.shard_map(run, mesh=mesh, in_specs=(P(), P(axis), P(axis)),
                                     out_specs=P(axis), check_vma=False))

    out = {}
    for grad in (False, True):
        fns = [program(m, grad) for m in (_swapped_chunked_map, current)]
        runs = [lambda f=f: jax.block_until_ready(f(purifier, x, w)) for f in fns]
        for r in runs:
            r()  # compile
        (before, after), best, median = interleaved(runs, repeats)
        out["purify_bpda_grad" if grad else "purify"] = {
            "before_images_per_s": x.shape[0] / best[0], "after_images_per_s": x.shape[0] / best[1],
            "before_median_images_per_s": x.shape[0] / median[0],
            "after_median_images_per_s": x.shape[0] / median[1],
            "max_abs_diff": float(jnp.max(jnp.abs(before - after)))}
    return out


def _images(rng, batch, size):
    """A batch of uniform float32 images [batch, size, size, 3] drawn from rng."""
    return rng.uniform(size=(batch, size, size, 3)).astype(np.float32)


def bench(purifier, size, batch, repeats, mesh):
    x = _images(np.random.default_rng(1), batch, size)
    xb = parallel.shard_batch(mesh, x)
    compile_s, times = _times(pur.purify, (purifier, xb), repeats)
    best = min(times)
    return {"size": size, "batch": batch, "images_per_s": batch / best, "batch_s": best,
            "median_batch_s": float(np.median(times)), "compile_s": compile_s,
            "patches_per_image": ((size - purifier.options.patch_size)
                                  // purifier.options.stride + 1) ** 2,
            "stride": purifier.options.stride}


def _chunk_list(text):
    """--image-chunks: comma-separated non-negative integers (0: by platform)."""
    try:
        chunks = [int(c) for c in text.split(",")]
    except ValueError:
        chunks = []
    if not chunks or min(chunks) < 0:
        raise argparse.ArgumentTypeError(
            f"expected non-negative integers like 16,256, got {text!r}")
    return chunks


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default=None, help="a train.py workdir (else random)")
    ap.add_argument("--sizes", default="32,128")
    ap.add_argument("--batch", type=int, default=None,
                    help="images per batch at 32 px (default 256 on a CPU, 8192 on a GPU/TPU)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--stride", type=int, default=1)
    ap.add_argument("--image-chunks", type=_chunk_list, default=[0],
                    help="comma-separated images per OMP chunk to time each (default: "
                         "purifier.auto_image_chunk, by platform)")
    ap.add_argument("--parts", action="store_true",
                    help="also time each step of purify alone, on one device")
    ap.add_argument("--grad", action="store_true",
                    help="also time purify with its BPDA gradient, against autodiff")
    ap.add_argument("--map-ab", action="store_true",
                    help="also time purify (and its BPDA gradient) with chunked_map before and "
                         "as a lax.map over swapped copies, alternating")
    ap.add_argument("--profile", action="store_true",
                    help="also print the whole program's time per kind of XLA operation")
    ap.add_argument("--out", default="benchmarks/results/purify.json")
    args = ap.parse_args()
    start = cpu_times()
    mesh = parallel.make_mesh()
    if args.batch is None:
        args.batch = 8192 if parallel.on_accelerator() else 256
    rows = []
    sizes = map(int, args.sizes.split(","))
    for size, chunk in ((s, c) for s in sizes for c in args.image_chunks):
        if args.checkpoint and size == 32:
            p = loading.load_purifier(args.checkpoint)
            if chunk:
                p = p.replace(options=dataclasses.replace(p.options, image_chunk=chunk))
        elif size == 32:
            p = random_purifier(size, stride=args.stride, image_chunk=chunk)
        else:
            c = imagenet10.get_config(str(size))
            d = c.dictionaries
            p = random_purifier(size, n_atoms=d.n_atoms, patch=d.patch_size, stride=d.stride,
                                sparsity=d.sparsity, image_chunk=chunk or c.purify.image_chunk)
        # the same pixels per batch at every size (64 images at 32 px: 16 at 64 px, 4 at 128)
        batch = max(mesh.size, args.batch * 32 * 32 // (size * size))
        row = bench(p, size, batch, args.repeats, mesh)
        row["source"] = args.checkpoint if (args.checkpoint and size == 32) else "random"
        row["image_chunk"] = p.options.image_chunk
        rows.append(row)
        print(f"{size:>4}x{size:<4} batch {batch:>4}  {row['images_per_s']:9.1f} images/s  "
              f"(compile {row['compile_s']:.1f} s, {row['patches_per_image']} patches/image, "
              f"{p.options.image_chunk} images per chunk)")
        if args.map_ab:
            rng = np.random.default_rng(3)
            x, w = (parallel.shard_batch(mesh, _images(rng, batch, size)) for _ in range(2))
            row["map_ab"] = ab = map_ab(p, x, w, args.repeats, mesh)
            for name, r in ab.items():
                print(f"          {name}, chunked_map before -> after: "
                      f"{r['before_images_per_s']:.1f} -> {r['after_images_per_s']:.1f} images/s "
                      f"(medians {r['before_median_images_per_s']:.1f} -> "
                      f"{r['after_median_images_per_s']:.1f}; largest difference "
                      f"{r['max_abs_diff']:.2g})")
        if args.profile:
            x = parallel.shard_batch(mesh, _images(np.random.default_rng(1), batch, size))
            row["profile"] = op_profile(pur.purify, (p, x), args.repeats)
            print("          time per kind of operation, ms per batch (events per batch):")
            for op in row["profile"]:
                print(f"          {op['ms_per_call']:9.2f}  ({op['events_per_call']:7.0f})  "
                      f"{op['op']}")
        if args.parts:
            row["parts_s"] = parts(p, _images(np.random.default_rng(1), batch, size), args.repeats)
            print("          one device, each step alone: " + ", ".join(
                f"{name} {1e3 * s:.1f} ms" for name, s in row["parts_s"].items()))
        if args.grad:
            rng = np.random.default_rng(2)
            x, w = (parallel.shard_batch(mesh, _images(rng, batch, size)) for _ in range(2))
            row["grad"] = g = grad_bench(p, x, w, args.repeats, mesh)
            print(f"          purify + BPDA gradient: {g['images_per_s']['written_out']:.1f} "
                  f"images/s written out, {g['images_per_s']['autodiff_reference']:.1f} by "
                  f"autodiff (largest difference {g['max_abs_diff']:.2g}, largest value "
                  f"{g['max_abs_grad']:.2g})")
    info = machine(since=start)
    if info["cpu_steal_share"] is not None:
        print(f"CPU time stolen by the hypervisor during this run: {info['cpu_steal_share']:.0%}")
    write_json(args.out, {"machine": info, "rows": rows})


if __name__ == "__main__":
    main()
