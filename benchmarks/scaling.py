"""Training-step and purify throughput on 1 vs 2 devices, and on 2 processes, in one run.

    python benchmarks/scaling.py                          # CPU: forced host devices
    python benchmarks/scaling.py --batch 64 --steps 3 --purify-batch 8      # a quick run
    python benchmarks/scaling.py --platform gpu --devices 1,2,4,8           # one GPU host

Every configuration runs in its own subprocess, because the device count is fixed when jax
starts: on CPU `XLA_FLAGS=--xla_force_host_platform_device_count=N`, on GPU
`CUDA_VISIBLE_DEVICES=0..N-1`. The "2 processes" rows start two real processes on localhost
(`jax.distributed`, gloo collectives on CPU) that each feed half of every global batch, as a
multi-host run does. The 1-device run of the same program is the reference each row's speed-up
is measured against.

Workloads: one data-parallel step of `srdjax.training.make_train_step` (SmallCNN, CIFAR-size
uint8 images, augmentation on device) and one `srdjax.purifier.purify` batch (10 clusters, 256
atoms of 8x8x3 patches, stride 1, sparsity 8: the default purification). Compile time is
measured on the first call and reported apart; throughput is the best of --repeats timed runs.
Writes benchmarks/results/scaling.json.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# The driver never imports jax: on a GPU host it would claim the memory its children need.
from benchmarks.common import cpu_times, host, write_json  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--platform", choices=("auto", "cpu", "gpu"), default="auto")
    p.add_argument("--devices", default="1,2", help="device counts of one process, e.g. 1,2,4")
    p.add_argument("--processes", type=int, default=2,
                   help="also run this many processes with one device each (0: skip)")
    p.add_argument("--batch", type=int, default=128, help="global training batch")
    p.add_argument("--steps", type=int, default=5, help="training steps per timed run")
    p.add_argument("--purify-batch", type=int, default=16, help="global purify batch")
    p.add_argument("--atoms", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--timeout", type=float, default=900, help="seconds per configuration")
    p.add_argument("--pin", action="store_true",
                   help="CPU: also run the processes pinned to one core each (process i on "
                        "core i mod cores)")
    p.add_argument("--out", default=str(REPO / "benchmarks/results/scaling.json"))
    # internal: one configuration
    p.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--coordinator", default=None, help=argparse.SUPPRESS)
    p.add_argument("--process-id", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- one configuration

def _init_like(graphdef_params, seed):
    """Seeded numpy weights of the model's shapes (He-scaled kernels, BatchNorm at identity):
    the same on every process, and no per-op compiles of NNX's eager initialisation."""
    import jax
    import numpy as np
    rng = np.random.default_rng(seed)

    def init(path, leaf):
        name = jax.tree_util.keystr(path)
        if "kernel" in name:
            return (rng.normal(size=leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))).astype(
                leaf.dtype)
        return np.full(leaf.shape, 1.0 if ("scale" in name or "var" in name) else 0.0,
                       leaf.dtype)

    return jax.tree_util.tree_map_with_path(init, graphdef_params)


def _timed(fn, repeats):
    """(first call incl. compile, best of `repeats` later calls), in seconds."""
    import jax
    t = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t)
    return first, best


def run_child(args) -> None:
    from srdjax import parallel
    if args.coordinator:
        parallel.initialize_distributed(args.coordinator, args.processes, args.process_id,
                                        timeout_s=120)
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx
    from srdjax import training
    from srdjax.clusters import ClusterSet
    from srdjax.models import apply_model, create_model, split_model
    from srdjax.purifier import PurifyOptions, make_purifier, purify

    mesh = parallel.make_mesh()
    graphdef, params, stats = split_model(nnx.eval_shape(lambda: create_model("small_cnn", 10,
                                                                              0)))
    params, stats = _init_like(params, 0), _init_like(stats, 1)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (args.batch, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 10, args.batch).astype(np.int32)
    tx = optax.sgd(0.05, momentum=0.9, nesterov=True)

    def loss_fn(params, stats, x, y, extras, key):
        logits, _, stats = apply_model(graphdef, params, stats, x, train=True)
        return training.cross_entropy(logits, y, 0.2).mean(), (stats, {})

    step = training.make_train_step(graphdef, tx, loss_fn, mesh, crop_pad=4, flip=True)
    state = parallel.replicate(mesh, training.init_state(params, stats, tx))
    rows = parallel.process_slice(args.batch, mesh)
    xb, yb = parallel.shard_batch(mesh, x[rows], y[rows])
    key = jax.random.key(0)
    holder = {"state": state}

    def train():
        s = holder["state"]
        for _ in range(args.steps):
            s, m = step(s, xb, yb, {}, key)
        holder["state"] = s
        return m["loss"]

    train_first, train_best = _timed(train, args.repeats)

    k, dim = 10, 8 * 8 * 3
    atoms = rng.normal(size=(k, args.atoms, dim))
    atoms /= np.linalg.norm(atoms, axis=-1, keepdims=True)
    latent = 128
    cluster_set = ClusterSet(
        means=jnp.asarray(rng.normal(size=(k, latent)), jnp.float32),
        stds=jnp.ones((k, latent), jnp.float32), class_ids=jnp.arange(k, dtype=jnp.int32),
        index_in_class=jnp.zeros(k, jnp.int32), counts=jnp.ones(k, jnp.int32))
    purifier = parallel.replicate(mesh, make_purifier(
        graphdef, params, stats, cluster_set, jnp.asarray(atoms, jnp.float32),
        PurifyOptions(image_size=(32, 32))))
    images = rng.uniform(0.0, 1.0, (args.purify_batch, 32, 32, 3)).astype(np.float32)
    images = parallel.shard_batch(mesh, images[parallel.process_slice(args.purify_batch, mesh)])
    # As purify.py calls it: input checks, then every device purifies its own images.
    purify_first, purify_best = _timed(lambda: purify(purifier, images), args.repeats)

    final_loss = float(parallel.to_host(train()))  # every process runs every collective
    if jax.process_index() == 0:
        args.child.write_text(json.dumps({
            "processes": jax.process_count(), "devices": jax.device_count(),
            "device_kind": jax.devices()[0].device_kind, "platform": jax.devices()[0].platform,
            "train_images_per_s": args.batch * args.steps / train_best,
            "train_step_s": train_best / args.steps,
            "train_compile_s": train_first - train_best,
            "purify_images_per_s": args.purify_batch / purify_best,
            "purify_batch_s": purify_best, "purify_compile_s": purify_first - purify_best,
            "final_loss": final_loss}))


# ----------------------------------------------------------------------------- the driver

def _platform(choice: str) -> str:
    if choice != "auto":
        return choice
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
        return "gpu" if out.returncode == 0 and "GPU" in out.stdout else "cpu"
    except (OSError, subprocess.TimeoutExpired):
        return "cpu"


def _env(plat: str, devices: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    if plat == "cpu":
        env["JAX_PLATFORMS"] = "cpu"
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    else:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, range(devices)))
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_config(args, plat: str, processes: int, devices: int, tmp: Path,
               pinned: bool = False) -> dict:
    """One configuration: `processes` processes with `devices` devices each (pinned: process i
    may run on CPU core i mod cores only, set before it starts, so XLA sizes its thread pool to
    that one core)."""
    result = tmp / f"p{processes}d{devices}{'pinned' if pinned else ''}.json"
    common = [sys.executable, __file__, "--child", str(result), "--batch", str(args.batch),
              "--steps", str(args.steps), "--purify-batch", str(args.purify_batch),
              "--atoms", str(args.atoms), "--repeats", str(args.repeats),
              "--processes", str(processes)]
    port = _free_port()
    procs = []
    cores = sorted(os.sched_getaffinity(0))
    for i in range(processes):
        extra = ["--coordinator", f"127.0.0.1:{port}", "--process-id", str(i)] \
            if processes > 1 else []
        env = _env(plat, devices)
        if plat == "gpu" and processes > 1:  # one distinct GPU per process
            env["CUDA_VISIBLE_DEVICES"] = str(i)
        pin = (lambda core=cores[i % len(cores)]: os.sched_setaffinity(0, {core})) \
            if pinned else None
        procs.append(subprocess.Popen(common + extra, env=env, cwd=REPO,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, preexec_fn=pin))
    logs = []
    for proc in procs:
        try:
            logs.append(proc.communicate(timeout=args.timeout)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise SystemExit(f"configuration {processes}x{devices} ran past {args.timeout} s")
        if proc.returncode != 0:
            raise SystemExit(f"configuration {processes}x{devices} failed:\n{logs[-1][-3000:]}")
    return {**json.loads(result.read_text()), "pinned": pinned}


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child is not None:
        run_child(args)
        return
    start = cpu_times()
    plat = _platform(args.platform)
    configs = [(1, int(d), False) for d in args.devices.split(",")]
    if args.processes > 1:
        configs.append((args.processes, 1, False))
        if args.pin and plat == "cpu":
            configs.append((args.processes, 1, True))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for processes, devices, pinned in configs:
            print(f"running {processes} process(es) x {devices} device(s)"
                  f"{', pinned' if pinned else ''} ...", flush=True)
            rows.append(run_config(args, plat, processes, devices, Path(tmp), pinned))
    ref = rows[0]
    for r in rows:
        r["train_speedup"] = r["train_images_per_s"] / ref["train_images_per_s"]
        r["purify_speedup"] = r["purify_images_per_s"] / ref["purify_images_per_s"]
    header = (f"{'processes x devices':>20} {'train img/s':>12} {'x':>6} {'compile s':>10} "
              f"{'purify img/s':>13} {'x':>6} {'compile s':>10}")
    print(f"\n{plat}: {rows[0]['device_kind']}, batch {args.batch}, purify batch "
          f"{args.purify_batch}\n{header}")
    for r in rows:
        name = f"{r['processes']} x {r['devices'] // r['processes']}" + (
            " pinned" if r["pinned"] else "")
        print(f"{name:>20} {r['train_images_per_s']:12.1f} {r['train_speedup']:6.2f} "
              f"{r['train_compile_s']:10.1f} {r['purify_images_per_s']:13.2f} "
              f"{r['purify_speedup']:6.2f} {r['purify_compile_s']:10.1f}")
    report = {"platform": plat, "machine": host(since=start), "settings": {
                  k: v for k, v in vars(args).items() if k not in ("child", "coordinator",
                                                                   "process_id")},
              "rows": rows}
    write_json(args.out, report)


if __name__ == "__main__":
    main()
