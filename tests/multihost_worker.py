"""One process of the multi-host test (tests/test_multihost.py), also importable for the
single-process reference.

    python tests/multihost_worker.py --coordinator 127.0.0.1:PORT --num-processes 2 \
        --process-id I --out DIR [--ckpt-dir DIR]

Runs one data-parallel training step pair and one k-means fit on the global mesh, each process
feeding only its rows of the global inputs (`shard_batch`), the cluster stage's per-class fit and
the dictionaries stage's learner (every process holds the inputs, the work is split), and one
purify batch whose images every process holds (`shard_global`); writes what it sees (gathered to the host) to
DIR/process{I}.npz. With --ckpt-dir it also saves and restores a replicated
pytree collectively through srdjax.checkpoints. Bad inputs end the process with one line on
stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# Before jax is imported: one CPU device per process unless the caller chose otherwise.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=1").strip()
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from srdjax import parallel  # noqa: E402
from srdjax.checks import SrdjaxError  # noqa: E402

TRAIN_BATCH, IMAGE, KM_POINTS, PURIFY_BATCH, PATCHES = 8, 16, 192, 4, 90


def global_inputs() -> dict[str, np.ndarray]:
    """The same seeded global inputs on every process (each then keeps only its rows)."""
    rng = np.random.default_rng(0)
    centers = rng.normal(0.0, 4.0, (3, 5))
    return {
        "x_u8": rng.integers(0, 256, (TRAIN_BATCH, IMAGE, IMAGE, 3), dtype=np.uint8),
        "y": rng.integers(0, 10, TRAIN_BATCH).astype(np.int32),
        "points": (centers[rng.integers(0, 3, KM_POINTS)]
                   + rng.normal(size=(KM_POINTS, 5))).astype(np.float32),
        "images": rng.uniform(0.0, 1.0, (PURIFY_BATCH, IMAGE, IMAGE, 3)).astype(np.float32),
        "classes": rng.integers(0, 2, KM_POINTS).astype(np.int32),
        "patches": rng.normal(size=(PATCHES, 12)).astype(np.float32),
    }


def _flat(prefix: str, tree) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {f"{prefix}{jax.tree_util.keystr(path)}": parallel.to_host(leaf)
            for path, leaf in leaves}


def build_model(seed: int, widths, dtype=None):
    """(graphdef, params, batch_stats) of a small CNN with seeded numpy weights (He-scaled
    kernels, BatchNorm at identity). Any fixed weights serve the comparison, and NNX's own
    initialisation compiles every random op, which costs seconds on a busy CPU."""
    from flax import nnx
    from srdjax.models import create_model, split_model
    graphdef, params, stats = split_model(nnx.eval_shape(
        lambda: create_model("small_cnn", 10, seed, dtype=dtype, widths=widths)))
    rng = np.random.default_rng(seed)

    def init(path, leaf):
        name = jax.tree_util.keystr(path)
        if "kernel" in name:
            fan_in = int(np.prod(leaf.shape[:-1]))
            return (rng.normal(size=leaf.shape) / np.sqrt(fan_in)).astype(leaf.dtype)
        one = "scale" in name or "var" in name
        return np.full(leaf.shape, 1.0 if one else 0.0, leaf.dtype)

    return (graphdef, jax.tree_util.tree_map_with_path(init, params),
            jax.tree_util.tree_map_with_path(init, stats))


def train_setup(mesh, dtype=None):
    import optax
    from srdjax import training
    from srdjax.models import apply_model
    graphdef, params, stats = build_model(0, (8, 16, 16), dtype)
    tx = optax.sgd(0.05, momentum=0.9)

    def loss_fn(params, stats, x, y, extras, key):
        logits, _, stats = apply_model(graphdef, params, stats, x, train=True)
        return training.cross_entropy(logits, y, 0.1).mean(), (stats, {})

    step = training.make_train_step(graphdef, tx, loss_fn, mesh, crop_pad=2, flip=True)
    state = parallel.replicate(mesh, training.init_state(params, stats, tx))
    return graphdef, step, state


def run_train(mesh, data) -> tuple[dict, object]:
    _, step, state = train_setup(mesh)
    rows = parallel.process_slice(TRAIN_BATCH, mesh)
    xb, yb = parallel.shard_batch(mesh, data["x_u8"][rows], data["y"][rows])
    losses = []
    for _ in range(2):  # the second step also uses the momentum and the BatchNorm update
        state, metrics = step(state, xb, yb, {}, jax.random.key(0))
        losses.append(parallel.to_host(metrics["loss"]))
    out = {"train/loss": np.stack(losses), **_flat("train/params", state.params),
           **_flat("train/stats", state.batch_stats)}
    return out, state


def run_kmeans(mesh, data) -> dict:
    from srdjax.kmeans import kmeans
    rows = parallel.process_slice(KM_POINTS, mesh)
    points = parallel.shard_batch(mesh, data["points"][rows])
    res = kmeans(jax.random.key(1), points, 3, n_init=2, max_iter=50, chunk_size=32)
    return {"kmeans/centers": parallel.to_host(res.centers),
            "kmeans/inertia": parallel.to_host(res.inertia),
            "kmeans/labels": parallel.to_host(res.labels),
            "kmeans/n_iter": parallel.to_host(res.n_iter)}


def run_clusters(mesh, data) -> dict:
    """The cluster stage's fit: every process passes all the latents, k-means splits them."""
    from srdjax.clusters import fit_clusters
    cluster_set, assignment, info = fit_clusters(
        jax.random.key(4), data["points"], data["classes"], 2, k_max=3, n_init=2, max_iter=50,
        silhouette_sample=64, chunk_size=32, mesh=mesh)
    return {"clusters/means": parallel.to_host(cluster_set.means),
            "clusters/stds": parallel.to_host(cluster_set.stds),
            "clusters/assignment": parallel.to_host(assignment),
            "clusters/k": np.asarray(info["k"]), "clusters/scores": np.asarray(info["scores"])}


def run_dictionary(mesh, data) -> dict:
    """The dictionaries stage's learner: OMP codes the patches split over the mesh."""
    from srdjax.dictionary import learn_dictionary
    atoms, history = learn_dictionary(jax.random.key(5), data["patches"], n_atoms=6,
                                      sparsity=2, n_iter=2, chunk_size=16, mesh=mesh)
    return {"dictionary/atoms": parallel.to_host(atoms), "dictionary/history": history}


def make_test_purifier(mesh, n_clusters: int = 3, n_atoms: int = 16, patch: int = 4):
    """A purifier from a tiny untrained model, synthetic clusters and random unit-norm atoms."""
    import jax.numpy as jnp
    from srdjax.clusters import ClusterSet
    from srdjax.purifier import PurifyOptions, make_purifier
    graphdef, params, stats = build_model(2, (8, 8, 16))
    rng = np.random.default_rng(3)
    latent_dim = 16
    clusters = ClusterSet(
        means=jnp.asarray(rng.normal(size=(n_clusters, latent_dim)), jnp.float32),
        stds=jnp.asarray(rng.uniform(0.5, 2.0, (n_clusters, latent_dim)), jnp.float32),
        class_ids=jnp.arange(n_clusters, dtype=jnp.int32),
        index_in_class=jnp.zeros(n_clusters, jnp.int32),
        counts=jnp.full(n_clusters, 10, jnp.int32))
    atoms = rng.normal(size=(n_clusters, n_atoms, patch * patch * 3))
    atoms /= np.linalg.norm(atoms, axis=-1, keepdims=True)
    options = PurifyOptions(image_size=(IMAGE, IMAGE), patch_size=patch, stride=2, sparsity=3,
                            pad=4, image_chunk=2)
    purifier = make_purifier(graphdef, params, stats, clusters,
                             jnp.asarray(atoms, jnp.float32), options)
    return parallel.replicate(mesh, purifier)


def run_purify(mesh, data) -> dict:
    from srdjax.purifier import purify
    purifier = make_test_purifier(mesh)
    # Every process holds all the images (as purify.py's inputs would be): shard_global.
    images = parallel.shard_global(mesh, data["images"])
    if jax.process_count() > 1:
        # Traced inside a caller's jit, as library users may call it: XLA partitions it over
        # both processes. (purify.py's two-process test covers the direct call, per device.)
        out, k = jax.jit(lambda p, x: purify(p, x, return_cluster=True))(purifier, images)
    else:
        out, k = purify(purifier, images, return_cluster=True)
    return {"purify/images": parallel.to_host(out), "purify/cluster": parallel.to_host(k)}


def run_checkpoint(state, ckpt_dir: Path) -> dict:
    """Save a replicated TrainState and a final pytree from every process; restore both."""
    from srdjax.checkpoints import StageStore
    store = StageStore(ckpt_dir, "multihost", {"test": 1})
    store.save(int(state.step), state, {"epoch": 0})
    restored, meta = store.restore(state)
    store.save_final({"params": state.params, "batch_stats": state.batch_stats})
    store.mark_done({"ok": True})
    if jax.process_count() > 1:
        # mark_done writes DONE.json on process 0 only; without a barrier the other processes
        # may look for it first (checkpoints.py should end mark_done with this barrier).
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("srdjax-test-mark-done")
    final = store.load_final({"params": state.params, "batch_stats": state.batch_stats})
    store.close()
    diff = lambda a, b: max(float(np.max(np.abs(parallel.to_host(x) - parallel.to_host(y))))
                            for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    return {"ckpt/restore_max_diff": np.float64(diff(restored, state)),
            "ckpt/final_max_diff": np.float64(diff(final["params"], state.params)),
            "ckpt/meta_epoch": np.int64(meta["epoch"]),
            "ckpt/restored_replicated": np.bool_(all(
                leaf.sharding.is_fully_replicated
                and len(leaf.sharding.device_set) == jax.device_count()
                for leaf in jax.tree.leaves(restored)))}


def run_all(mesh, ckpt_dir: Path | None = None) -> dict[str, np.ndarray]:
    data = global_inputs()
    out, state = run_train(mesh, data)
    out.update(run_kmeans(mesh, data))
    out.update(run_clusters(mesh, data))
    out.update(run_dictionary(mesh, data))
    out.update(run_purify(mesh, data))
    if ckpt_dir is not None:
        out.update(run_checkpoint(state, ckpt_dir))
    try:
        parallel.process_slice(TRAIN_BATCH + 1, mesh)
        out["errors/indivisible"] = np.array("")
    except SrdjaxError as e:
        out["errors/indivisible"] = np.array(str(e))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--coordinator", default=None)
    p.add_argument("--num-processes", type=int, default=None)
    p.add_argument("--process-id", type=int, default=None)
    p.add_argument("--timeout", type=float, default=30)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--ckpt-dir", type=Path, default=None)
    args = p.parse_args(argv)
    try:
        parallel.initialize_distributed(args.coordinator, args.num_processes, args.process_id,
                                        timeout_s=args.timeout)
        if args.out is None:
            return 0
        out = run_all(parallel.make_mesh(), args.ckpt_dir)
    except SrdjaxError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        os._exit(2)  # jax's runtime may be half started; do not wait on its shutdown
    out["devices"] = np.int64(jax.device_count())
    out["local_devices"] = np.int64(jax.local_device_count())
    args.out.mkdir(parents=True, exist_ok=True)
    np.savez(args.out / f"process{jax.process_index()}.npz", **out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
