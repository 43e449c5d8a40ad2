"""Multi-host JAX with real processes.

Two CPU processes on localhost (one device each, gloo collectives) run tests/multihost_worker.py
on a global 2-device mesh; this test process, which has two forced host devices
(tests/conftest.py), runs the same code on one process as the reference. One training step
pair, one k-means fit and one purify batch must agree, and a collective orbax checkpoint must
round-trip. Bad input must fail with one clear line within a bounded time.
"""
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from srdjax import parallel
from srdjax.checks import SrdjaxError
from tests import multihost_worker as worker

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "multihost_worker.py"
PROCESS_TIMEOUT_S = 180  # a busy 2-core machine; the pair takes ~20-50 s


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int = 1) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    return env


def _start(*args, devices: int = 1) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(WORKER), *map(str, args)], env=_env(devices),
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"worker did not finish within {timeout} s:\n{err[-3000:]}")
    return proc.returncode, err


def _error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    return lines[-1] if lines else f"<no error line>\n{stderr[-2000:]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(process 0's results, process 1's, the single-process reference, checkpoint dir)."""
    tmp = tmp_path_factory.mktemp("multihost")
    port = _free_port()
    procs = [_start("--coordinator", f"127.0.0.1:{port}", "--num-processes", 2,
                    "--process-id", i, "--out", tmp / "out", "--ckpt-dir", tmp / "ckpt",
                    "--timeout", 60) for i in range(2)]
    try:
        # The reference is computed while the workers run: they spend part of the time waiting.
        reference = worker.run_all(parallel.make_mesh())
        deadline = time.monotonic() + PROCESS_TIMEOUT_S
        for proc in procs:
            rc, err = _finish(proc, max(1.0, deadline - time.monotonic()))
            assert rc == 0, f"worker failed (rc {rc}):\n{err[-3000:]}"
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    results = []
    for i in range(2):
        with np.load(tmp / "out" / f"process{i}.npz", allow_pickle=False) as f:
            results.append(dict(f))
    return results[0], results[1], reference, tmp / "ckpt"


def test_two_processes_share_one_mesh_and_see_the_same_results(runs):
    p0, p1, _, _ = runs
    assert int(p0["devices"]) == 2 and int(p0["local_devices"]) == 1
    assert p0.keys() == p1.keys()
    for key in p0:  # to_host gathers every global result to every process
        np.testing.assert_array_equal(p0[key], p1[key], err_msg=key)


def test_train_step_matches_one_process(runs):
    p0, _, ref, _ = runs
    keys = [k for k in ref if k.startswith("train/")]
    assert len(keys) > 10 and set(keys) <= set(p0)
    loss = ref["train/loss"]
    assert np.all(np.isfinite(loss)) and loss[1] != loss[0]  # the first step changed the model
    for key in keys:
        # The two-device sums run in another order only at the last bit: float32 agreement.
        np.testing.assert_allclose(p0[key], ref[key], rtol=2e-5, atol=2e-6, err_msg=key)


def test_kmeans_matches_one_process(runs):
    p0, _, ref, _ = runs
    np.testing.assert_allclose(p0["kmeans/centers"], ref["kmeans/centers"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(p0["kmeans/inertia"], ref["kmeans/inertia"], rtol=1e-5)
    np.testing.assert_array_equal(p0["kmeans/labels"], ref["kmeans/labels"])
    assert int(p0["kmeans/n_iter"]) == int(ref["kmeans/n_iter"])
    # and the reference itself is right: scikit-learn's inertia of the same centers
    from sklearn.metrics import pairwise_distances_argmin_min
    _, d = pairwise_distances_argmin_min(worker.global_inputs()["points"], ref["kmeans/centers"])
    np.testing.assert_allclose(ref["kmeans/inertia"], np.sum(d ** 2), rtol=1e-4)


def test_cluster_stage_fit_matches_one_process(runs):
    p0, _, ref, _ = runs
    np.testing.assert_array_equal(p0["clusters/assignment"], ref["clusters/assignment"])
    np.testing.assert_array_equal(p0["clusters/k"], ref["clusters/k"])
    np.testing.assert_allclose(p0["clusters/means"], ref["clusters/means"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(p0["clusters/stds"], ref["clusters/stds"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(p0["clusters/scores"], ref["clusters/scores"], rtol=1e-4,
                               atol=1e-5)
    # every cluster's mean is the mean of the points assigned to it
    points, a = worker.global_inputs()["points"], ref["clusters/assignment"]
    means = np.stack([points[a == j].mean(0) for j in range(len(ref["clusters/means"]))])
    np.testing.assert_allclose(ref["clusters/means"], means, atol=1e-4)


def test_dictionary_learner_matches_one_process_and_no_mesh(runs):
    from srdjax.dictionary import learn_dictionary
    p0, _, ref, _ = runs
    np.testing.assert_allclose(p0["dictionary/atoms"], ref["dictionary/atoms"], atol=1e-5)
    np.testing.assert_allclose(p0["dictionary/history"], ref["dictionary/history"], rtol=1e-5)
    # splitting the patches over devices changes nothing
    atoms, history = learn_dictionary(jax.random.key(5), worker.global_inputs()["patches"],
                                      n_atoms=6, sparsity=2, n_iter=2, chunk_size=16)
    np.testing.assert_allclose(ref["dictionary/atoms"], np.asarray(atoms), atol=1e-5)
    np.testing.assert_allclose(ref["dictionary/history"], history, rtol=1e-5)
    assert history[-1] < history[0]


def test_purify_batch_matches_one_process(runs):
    p0, _, ref, _ = runs
    assert p0["purify/images"].shape == (worker.PURIFY_BATCH, worker.IMAGE, worker.IMAGE, 3)
    np.testing.assert_array_equal(p0["purify/cluster"], ref["purify/cluster"])
    np.testing.assert_allclose(p0["purify/images"], ref["purify/images"], atol=1e-5)
    images = worker.global_inputs()["images"]
    assert np.abs(p0["purify/images"] - images).max() > 1e-3  # purify did change the images


def test_collective_checkpoint_round_trips(runs):
    p0, p1, ref, ckpt = runs
    for p in (p0, p1):
        assert float(p["ckpt/restore_max_diff"]) == 0.0
        assert float(p["ckpt/final_max_diff"]) == 0.0
        assert bool(p["ckpt/restored_replicated"]) and int(p["ckpt/meta_epoch"]) == 0
    # What two processes wrote, one process reads back: the trained parameters. The saved
    # shardings name the writers' 2-process mesh, so this reader passes a target of its own
    # (without one orbax refuses: "Topology mismatch detected").
    import orbax.checkpoint as ocp
    _, params, stats = worker.build_model(0, (8, 16, 16))
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                          {"params": params, "batch_stats": stats})
    with ocp.StandardCheckpointer() as checkpointer:
        saved = checkpointer.restore(ckpt / "multihost" / "final", target)
    flat = worker._flat("train/params", saved["params"])
    for key, value in flat.items():
        np.testing.assert_allclose(value, ref[key], rtol=2e-5, atol=2e-6, err_msg=key)


def test_indivisible_global_batch_is_one_clear_error(runs):
    p0, _, _, _ = runs
    assert "global batch 9 is not divisible by the 2 devices" in str(p0["errors/indivisible"])
    mesh = parallel.make_mesh()
    with pytest.raises(SrdjaxError, match="batch of 3 is not divisible by the 2 devices"):
        parallel.shard_batch(mesh, np.zeros((3, 4), np.float32))
    with pytest.raises(SrdjaxError, match="global batch 5 is not divisible"):
        parallel.shard_global(mesh, np.zeros((5, 4), np.float32))
    x = parallel.shard_global(mesh, np.arange(8.0).reshape(4, 2))
    np.testing.assert_array_equal(parallel.to_host(x), np.arange(8.0).reshape(4, 2))
    assert parallel.process_slice(8, mesh) == slice(0, 8)


@pytest.mark.parametrize("kwargs, message", [
    (dict(coordinator="127.0.0.1:1234", num_processes=2, process_id=2),
     r"process_id must be an int in \[0, 1\] for 2 processes, got 2"),
    (dict(coordinator="127.0.0.1:1234", num_processes=2, process_id=-1),
     r"process_id must be an int in \[0, 1\] for 2 processes, got -1"),
    (dict(coordinator="127.0.0.1:1234", num_processes=0, process_id=0),
     r"num_processes must be an int >= 1, got 0"),
    (dict(coordinator="127.0.0.1", num_processes=2, process_id=1),
     r"coordinator address must be host:port"),
    (dict(coordinator="no-such-host.invalid:1234", num_processes=2, process_id=1),
     r"does not resolve"),
    (dict(coordinator=None, num_processes=2, process_id=1), r"a coordinator address"),
])
def test_bad_distributed_arguments_fail_at_once(kwargs, message):
    start = time.monotonic()
    with pytest.raises(SrdjaxError, match=message):
        parallel.initialize_distributed(**kwargs, timeout_s=30)
    assert time.monotonic() - start < 10  # DNS failure included


def test_bad_environment_is_named(monkeypatch):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    with pytest.raises(SrdjaxError, match="JAX_NUM_PROCESSES must be an integer, got 'two'"):
        parallel.initialize_distributed()
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "5")
    with pytest.raises(SrdjaxError, match=r"process_id must be an int in \[0, 1\].*got 5"):
        parallel.initialize_distributed()


def test_unreachable_coordinator_fails_within_the_timeout():
    # Process 1 only polls the coordinator's port before handing over to jax, so this runs
    # safely inside the test process.
    start = time.monotonic()
    with pytest.raises(SrdjaxError, match=r"coordinator 127.0.0.1:\d+ is not reachable within "
                                          r"1.5 s \(process 1 of 2\)"):
        parallel.initialize_distributed(f"127.0.0.1:{_free_port()}", 2, 1, timeout_s=1.5)
    assert time.monotonic() - start < 4


def test_missing_peer_and_busy_port_fail_within_the_timeout():
    """Process 0 whose peer never comes, and process 0 whose port is taken: jax would abort
    (the first only after its own timeout); each must end with one error line instead."""
    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        start = time.monotonic()
        alone = _start("--coordinator", f"127.0.0.1:{_free_port()}", "--num-processes", 2,
                       "--process-id", 0, "--timeout", 2)
        taken = _start("--coordinator", f"127.0.0.1:{busy.getsockname()[1]}",
                       "--num-processes", 2, "--process-id", 0, "--timeout", 20)
        rc_taken, err_taken = _finish(taken, 60)
        rc_alone, err_alone = _finish(alone, 60)
        elapsed = time.monotonic() - start
    assert rc_alone == 2, err_alone[-2000:]
    assert re.fullmatch(r"error: the 2 processes did not all join coordinator 127\.0\.0\.1:\d+ "
                        r"\(process 0 of 2\) within 2 s; start every process with the same "
                        r"coordinator and process count, and distinct process ids",
                        _error_line(err_alone)), err_alone[-2000:]
    assert rc_taken == 2, err_taken[-2000:]
    assert re.fullmatch(r"error: process 0 cannot serve the coordinator 127\.0\.0\.1:\d+: port "
                        r"\d+ is not free here \(Address already in use\)",
                        _error_line(err_taken)), err_taken[-2000:]
    assert elapsed < 40  # imports (~2-10 s on a busy machine) + the 2 s timeout, never 20 s


# ---------------------------------------------------------------------------- mixed precision

def test_bfloat16_train_step_runs_with_float32_parameters():
    mesh = parallel.make_mesh()
    data = worker.global_inputs()
    losses = {}
    for dtype in (None, "bfloat16"):
        _, step, state = worker.train_setup(mesh, dtype)
        xb, yb = parallel.shard_batch(mesh, data["x_u8"], data["y"])
        state, metrics = step(state, xb, yb, {}, jax.random.key(0))
        losses[dtype] = float(metrics["loss"])
        assert {leaf.dtype for leaf in jax.tree.leaves(state.params)} == {jnp.dtype("float32")}
        assert {leaf.dtype for leaf in jax.tree.leaves(state.opt_state)
                if hasattr(leaf, "dtype")} <= {jnp.dtype("float32"), jnp.dtype("int32")}
    # Same weights, bf16 activations: the loss agrees to bf16 precision (8 mantissa bits).
    assert np.isfinite(losses["bfloat16"])
    assert abs(losses["bfloat16"] - losses[None]) < 0.02 * abs(losses[None])


@pytest.mark.parametrize("name, kwargs", [
    ("small_cnn", dict(widths=(8, 16, 16))),
    ("resnet18", dict(width=4)),
    ("wide_resnet", dict(depth=10, width=1)),
])
def test_bfloat16_models_return_float32_logits_and_latents(name, kwargs):
    from flax import nnx
    from srdjax.models import apply_model, create_model, split_model
    graphdef, params, stats = split_model(nnx.eval_shape(
        lambda: create_model(name, 10, 0, dtype="bfloat16", **kwargs)))
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype("float32")}
    x = jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32)
    logits, latent, _ = jax.eval_shape(
        lambda p, s, x: apply_model(graphdef, p, s, x, train=True), params, stats, x)
    assert latent.dtype == jnp.float32  # k-means, clusters and OMP always get float32
    assert logits.dtype == jnp.float32


def test_purify_stays_float32_with_a_bfloat16_model():
    from flax import nnx
    from srdjax.models import create_model, split_model
    from srdjax.purifier import make_purifier, purify
    p32 = worker.make_test_purifier(parallel.make_mesh())
    graphdef = split_model(nnx.eval_shape(lambda: create_model(
        "small_cnn", 10, 2, dtype="bfloat16", widths=(8, 8, 16))))[0]
    p16 = make_purifier(graphdef, p32.params, p32.batch_stats, p32.clusters, p32.dictionaries,
                        p32.options)
    x = jax.ShapeDtypeStruct((2, worker.IMAGE, worker.IMAGE, 3), jnp.float32)
    assert jax.eval_shape(p16.latent, x).dtype == jnp.float32
    out = jax.eval_shape(lambda p, x: purify(p, x), p16, x)
    assert out.dtype == jnp.float32 and p16.dictionaries.dtype == jnp.float32
