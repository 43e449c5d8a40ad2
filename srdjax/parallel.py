"""Devices: one mesh over every device of every process, batch axis "data".

Parameters are replicated and batches are split along "data"; jitted functions get explicit
input shardings and XLA inserts the collectives (gradient sums, BatchNorm statistics, accuracy
counts). The mesh uses Auto axis types, so `jit(grad)` over sharded batches works without
`jax.set_mesh` (ENVIRONMENT.md: `jax.make_mesh` defaults to explicit axes).

Multi-host (TPU pods, several GPU hosts): call `initialize_distributed` first; every process
then holds only its slice of each global batch and `shard_batch` stitches the slices together.
"""
from __future__ import annotations

import os
import socket

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from srdjax.checks import SrdjaxError, check

DATA = "data"


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, timeout_s: int = 60) -> bool:
    """Start JAX's multi-controller runtime. Arguments default to the standard environment
    (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID); on TPU pods and SLURM jax
    finds them itself. Returns whether a multi-process runtime was started."""
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
    if process_id is None and os.environ.get("JAX_PROCESS_ID"):
        process_id = int(os.environ["JAX_PROCESS_ID"])
    if coordinator is None and num_processes is None:
        return False
    check(num_processes is not None and num_processes >= 1,
          f"num_processes must be >= 1, got {num_processes}")
    check(process_id is not None and 0 <= process_id < num_processes,
          f"process_id must lie in [0, {num_processes - 1}], got {process_id}")
    check(coordinator is not None and ":" in coordinator,
          f"coordinator address must be host:port, got {coordinator!r}")
    if process_id != 0:
        _wait_for_coordinator(coordinator, timeout_s)
    jax.distributed.initialize(coordinator, num_processes, process_id,
                               initialization_timeout=timeout_s)
    return True


def _wait_for_coordinator(address: str, timeout_s: int) -> None:
    """Fail within `timeout_s` with one line, instead of jax's long retry loop."""
    import time
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((host, int(port)), timeout=2).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise SrdjaxError(f"coordinator {address} not reachable within {timeout_s} s")
            time.sleep(0.5)


def make_mesh(devices=None) -> Mesh:
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.array(devices), (DATA,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def is_main_process() -> bool:
    return jax.process_index() == 0


def check_batch_size(global_batch: int, mesh: Mesh) -> None:
    check(global_batch > 0, f"batch size must be positive, got {global_batch}")
    check(global_batch % mesh.size == 0,
          f"global batch {global_batch} is not divisible by the {mesh.size} devices of the mesh")


def process_slice(global_batch: int) -> slice:
    """The rows of a global batch that this process loads and feeds."""
    per = global_batch // jax.process_count()
    start = jax.process_index() * per
    return slice(start, start + per)


def shard_batch(mesh: Mesh, *arrays):
    """Lay host arrays out across the mesh along the batch axis.

    Single process: each array is the whole global batch. Multi-process: each array is this
    process's slice (see `process_slice`), and the result is the global array."""
    sharding = batch_sharding(mesh)
    out = []
    for a in arrays:
        if jax.process_count() == 1:
            check(a.shape[0] % mesh.size == 0,
                  f"batch of {a.shape[0]} is not divisible by the {mesh.size} devices of the mesh")
            out.append(jax.device_put(a, sharding))
        else:
            out.append(jax.make_array_from_process_local_data(sharding, np.asarray(a)))
    return out[0] if len(out) == 1 else tuple(out)


def replicate(mesh: Mesh, tree):
    return jax.device_put(tree, replicated(mesh))


def pad_to_multiple(x: np.ndarray, multiple: int) -> tuple[np.ndarray, int]:
    """Pad the batch axis (repeating the last row) so evaluation batches divide the mesh;
    returns the padded array and the number of real rows."""
    n = len(x)
    rem = (-n) % multiple
    if rem == 0:
        return x, n
    return np.concatenate([x, np.repeat(x[-1:], rem, axis=0)]), n


def to_host(x) -> np.ndarray:
    """Gather a (possibly multi-process) global array to every host as numpy."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))
