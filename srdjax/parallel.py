"""Devices: one mesh over every device of every process, batch axis "data".

Parameters are replicated and batches are split along "data"; jitted functions get explicit
input shardings and XLA inserts the collectives (gradient sums, BatchNorm statistics, accuracy
counts). The mesh uses Auto axis types, so `jit(grad)` over sharded batches works without
`jax.set_mesh` (ENVIRONMENT.md: `jax.make_mesh` defaults to explicit axes).

Multi-host (TPU pods, several GPU hosts, several CPU processes): call `initialize_distributed`
before anything else touches JAX. Each process then feeds only its rows of every global batch
(`process_slice` → `shard_batch`), or, when every process holds the whole array (a test set,
a user's images), `shard_global` places just this process's rows. `to_host` gathers a global
result back to every process. On CPU, jax 0.10 runs cross-process collectives over gloo
(`jax_cpu_collectives_implementation`, already the default).
"""
from __future__ import annotations

import errno
import os
import socket
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from srdjax.checks import SrdjaxError, check

DATA = "data"
AUTO = "auto"  # coordinator="auto": let jax detect a TPU pod, SLURM or Open MPI job


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise SrdjaxError(f"environment variable {name} must be an integer, "
                          f"got {value!r}") from None


def _parse_address(address: str) -> tuple[str, int]:
    host, _, port = str(address).rpartition(":")
    check(bool(host) and port.isdigit() and 0 < int(port) < 65536,
          f"coordinator address must be host:port with a port in 1..65535, got {address!r}")
    host = host.strip("[]")  # [::1]:1234
    try:
        socket.getaddrinfo(host, int(port))
    except OSError:
        raise SrdjaxError(f"coordinator host {host!r} (from {address!r}) "
                          "does not resolve") from None
    return host, int(port)


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, timeout_s: float = 60, *,
                           heartbeat_timeout_s: int = 100, shutdown_timeout_s: int = 300) -> bool:
    """Start JAX's multi-controller runtime; returns whether several processes now run.

    Arguments default to the standard environment (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
    JAX_PROCESS_ID); `coordinator="auto"` leaves all three to jax's detection (TPU pod slices,
    SLURM, Open MPI). Nothing given, or one process: a plain single-process run.

    Must run before any other JAX call. Every failure is one `SrdjaxError` within about
    `timeout_s`: a bad address or id at once, an unreachable coordinator (process_id > 0) or
    processes that never all join, after `timeout_s`. jax itself would abort the process with a
    C++ stack trace instead, so its connect runs in a thread we can stop waiting for; after
    such an error the process should exit (jax's runtime is left half started).

    Once running, a process that dies is noticed by the others after `heartbeat_timeout_s`, and
    a process that exits (even after an error) waits up to `shutdown_timeout_s` for the others
    at jax's shutdown barrier; both then abort (jax's defaults, 100 s and 300 s).
    """
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    num_processes = _env_int("JAX_NUM_PROCESSES") if num_processes is None else num_processes
    process_id = _env_int("JAX_PROCESS_ID") if process_id is None else process_id
    check(float(timeout_s) > 0, f"timeout_s must be positive, got {timeout_s!r}")
    timeouts = dict(heartbeat_timeout_seconds=int(heartbeat_timeout_s),
                    shutdown_timeout_seconds=int(shutdown_timeout_s))
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    if coordinator == AUTO:
        _connect({**timeouts}, timeout_s, "the auto-detected coordinator")
        return jax.process_count() > 1
    if coordinator is None and num_processes is None:
        return False
    check(isinstance(num_processes, int) and num_processes >= 1,
          f"num_processes must be an int >= 1, got {num_processes!r}")
    check(isinstance(process_id, int) and 0 <= process_id < num_processes,
          f"process_id must be an int in [0, {num_processes - 1}] for {num_processes} "
          f"processes, got {process_id!r}")
    if num_processes == 1:
        return False
    check(coordinator is not None,
          "a coordinator address host:port is needed for several processes "
          "(config distributed.coordinator or JAX_COORDINATOR_ADDRESS)")
    host, port = _parse_address(coordinator)
    deadline = time.monotonic() + float(timeout_s)
    who = f"process {process_id} of {num_processes}"
    if process_id != 0:
        _wait_for_port(host, port, deadline, f"coordinator {coordinator} is not reachable "
                       f"within {timeout_s:g} s ({who}); start process 0 there first, or "
                       "check the address and the firewall")
    else:
        _check_bindable(port, coordinator)
    _connect(dict(coordinator_address=coordinator, num_processes=num_processes,
                  process_id=process_id, **timeouts), deadline - time.monotonic(), f"coordinator "
             f"{coordinator} ({who})", total_s=timeout_s, num_processes=num_processes)
    return True


def _wait_for_port(host: str, port: int, deadline: float, message: str) -> None:
    while True:
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise SrdjaxError(message) from None
            time.sleep(0.2)


def _check_bindable(port: int, coordinator: str) -> None:
    """Process 0 serves on [::]:port; a taken port is found here, as jax's failure to bind
    sometimes crashes the process instead of raising."""
    if os.environ.get("JAX_COORDINATOR_BIND_ADDRESS"):
        return
    for family, address in ((socket.AF_INET6, ("::", port)), (socket.AF_INET, ("", port))):
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(address)
                return
        except OSError as e:
            if e.errno in (errno.EADDRINUSE, errno.EACCES):
                raise SrdjaxError(f"process 0 cannot serve the coordinator {coordinator}: port "
                                  f"{port} is not free here ({e.strerror})") from None
            # no IPv6 on this host: probe IPv4; if neither probe works, jax reports it


def _connect(kwargs: dict, wait_s: float, where: str, total_s: float | None = None,
             num_processes: int | None = None) -> None:
    """jax.distributed.initialize, with its failures turned into one SrdjaxError in time."""
    errors: list[BaseException] = []
    # jax's own deadline comes later than ours, so the clear error is the one the user sees.
    jax_timeout = int(max(wait_s, 1)) + 30

    def run():
        try:
            jax.distributed.initialize(**kwargs, initialization_timeout=jax_timeout)
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            errors.append(e)

    thread = threading.Thread(target=run, name="jax-distributed-init", daemon=True)
    thread.start()
    thread.join(max(wait_s, 0.1))
    if thread.is_alive():
        expected = f"the {num_processes} processes" if num_processes else "the processes"
        raise SrdjaxError(f"{expected} did not all join {where} within {total_s or wait_s:g} s; "
                          "start every process with the same coordinator and process count, "
                          "and distinct process ids")
    if errors:
        e = errors[0]
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "before any JAX calls" in msg:
            raise SrdjaxError("initialize_distributed must run before any other JAX call "
                              "(jax.devices(), creating arrays, ...)") from None
        if "RPC server" in msg:
            raise SrdjaxError(f"process 0 cannot serve the {where}: its port is in use or "
                              "not bindable here") from None
        raise SrdjaxError(f"jax.distributed.initialize failed for {where}: {msg}") from None


def make_mesh(devices=None) -> Mesh:
    """A 1-d "data" mesh. Devices are ordered by process, so each process's devices hold one
    contiguous block of rows of a global batch (the rows `process_slice` names)."""
    devices = jax.devices() if devices is None else list(devices)
    devices = sorted(devices, key=lambda d: (d.process_index, d.id))
    return Mesh(np.array(devices), (DATA,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def rows_mesh(x) -> Mesh | None:
    """The mesh over which the concrete array x's rows (axis 0) are split, or None (x unsharded,
    on one device, split along another axis, or a tracer)."""
    sharding = getattr(x, "sharding", None)
    if (isinstance(sharding, NamedSharding) and sharding.mesh.size > 1 and len(sharding.spec)
            and sharding.spec[0] is not None):
        return sharding.mesh
    return None


def row_parts(x) -> int:
    """Into how many parts the concrete array x's rows are split (1 if `rows_mesh(x)` is None)."""
    mesh = rows_mesh(x)
    if mesh is None:
        return 1
    return int(np.prod([mesh.shape[a] for a in jax.tree.leaves(x.sharding.spec[0])]))


def is_main_process() -> bool:
    return jax.process_index() == 0


def check_batch_size(global_batch: int, mesh: Mesh) -> None:
    check(global_batch > 0, f"batch size must be positive, got {global_batch}")
    check(global_batch % mesh.size == 0,
          f"global batch {global_batch} is not divisible by the {mesh.size} devices of the mesh")


def process_slice(global_batch: int, mesh: Mesh | None = None) -> slice:
    """The rows of a global batch that this process loads and feeds (all rows on one process).

    With `mesh`, the rows its devices in that mesh hold; without, the mesh of all devices."""
    if mesh is None:
        n = jax.process_count()
        check(global_batch % n == 0,
              f"global batch {global_batch} is not divisible by the {n} processes")
        per = global_batch // n
        return slice(jax.process_index() * per, (jax.process_index() + 1) * per)
    check_batch_size(global_batch, mesh)
    index_map = batch_sharding(mesh).addressable_devices_indices_map((global_batch,))
    starts = sorted({idx[0].start or 0 for idx in index_map.values()})
    stops = sorted({global_batch if idx[0].stop is None else idx[0].stop
                    for idx in index_map.values()})
    return slice(starts[0], stops[-1])


def _local_devices(mesh: Mesh) -> int:
    return sum(d.process_index == jax.process_index() for d in mesh.devices.flat)


def shard_batch(mesh: Mesh, *arrays):
    """Lay host arrays out across the mesh along the batch axis.

    Single process: each array is the whole global batch. Multi-process: each array is this
    process's slice (see `process_slice`), and the result is the global array."""
    sharding = batch_sharding(mesh)
    out = []
    for a in arrays:
        a = np.asarray(a)
        if jax.process_count() == 1:
            check(a.shape[0] % mesh.size == 0,
                  f"batch of {a.shape[0]} is not divisible by the {mesh.size} devices of the mesh")
            out.append(jax.device_put(a, sharding))
        else:
            local = _local_devices(mesh)
            check(local > 0 and a.shape[0] % local == 0,
                  f"this process's batch of {a.shape[0]} rows is not divisible by its {local} "
                  f"devices of the mesh (global batch = rows x {jax.process_count()} processes)")
            out.append(jax.make_array_from_process_local_data(sharding, a))
    return out[0] if len(out) == 1 else tuple(out)


def shard_global(mesh: Mesh, *arrays):
    """Like `shard_batch`, for arrays every process holds in full (a test set, a user's images):
    each process places only the rows of its own devices."""
    sharding = batch_sharding(mesh)
    out = []
    for a in arrays:
        a = np.asarray(a)
        check_batch_size(a.shape[0], mesh)
        out.append(jax.make_array_from_callback(a.shape, sharding, lambda idx, a=a: a[idx]))
    return out[0] if len(out) == 1 else tuple(out)


def replicate(mesh: Mesh, tree):
    """Every leaf on every device of the mesh; with several processes each must pass the same
    values (parameters built from the same seed, a loaded checkpoint). Arrays on one process's
    devices go through the host: jax does not move them across processes."""
    if jax.process_count() > 1:
        tree = jax.tree.map(lambda a: np.asarray(a) if isinstance(a, jax.Array)
                            and a.is_fully_addressable else a, tree)
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
    """A (possibly multi-process) global array as numpy, the same on every process."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def on_accelerator() -> bool:
    """Whether jitted code runs on a GPU or TPU (JAX's default backend is not the CPU). Block
    sizes tuned to a CPU core's cache are far too small there: each pass of a loop over blocks
    costs its kernels' launches (on an H200, OMP over blocks of 128 patches ran at 1.4M patches
    per second, 2,000 CIFAR images purified per second; benchmarks/results/h200)."""
    return jax.default_backend() != "cpu"


def fori_loop(n: int, body, carry, unroll_max: int | None = None):
    """`jax.lax.fori_loop(0, n, body, carry)`, unrolled at trace time on a CPU when n is at most
    `unroll_max` (always, if None). XLA's CPU backend runs loop bodies several times slower than
    the same ops at top level (jax-ml/jax#12868; PGD-5 on the quick config's CNN, batch 256:
    30.8 s as a fori_loop, 4.3 s unrolled); compile time grows with the unrolled steps.
    GPUs and TPUs always get the fori_loop."""
    if jax.default_backend() == "cpu" and (unroll_max is None or n <= unroll_max):
        for i in range(n):
            carry = body(jnp.asarray(i, jnp.int32), carry)
        return carry
    return jax.lax.fori_loop(0, n, body, carry)


def chunk_layout(n: int, chunk: int):
    """(number of chunks, rows per chunk, padding rows) of `chunked_map` for n >= 1 rows."""
    n_chunks = -(-n // max(1, min(chunk, n)))
    # Chunks of (nearly) `chunk` rows that divide n need no padding (padding rows at the end
    # shifts the devices' blocks, and XLA then moves rows between devices to re-align them),
    # and chunks of a multiple of 8 rows split evenly over up to 8 devices (else XLA gathers).
    sizes = range(n_chunks, 2 * n_chunks + 1)
    n_chunks = next((m for m in sizes if n % m == 0 and (n // m) % 8 == 0),
                    next((m for m in sizes if n % m == 0), n_chunks))
    c = -(-n // n_chunks)
    return n_chunks, c, n_chunks * c - n


def written_once(fn, *arrays):
    """`fn` over rows sharing the leading axis, in a loop of two steps, so that its output is
    written to memory once.

    XLA's CPU backend fuses a producer made of cheap element-wise ops into each of its
    consumers, and into every tap of a consumer that reads each element many times (a 3×3
    convolution, the patches of an 8×8 grid): the producer is then computed that many times.
    It does not fuse a loop's output. (`optimization_barrier` did not stop it.) One row is
    padded to two, as XLA drops a loop of one step."""
    n = arrays[0].shape[0]
    if n == 1:
        out = chunked_map(fn, 1, *(jnp.concatenate([a, jnp.zeros_like(a)]) for a in arrays))
        return jax.tree.map(lambda o: o[:1], out)
    return chunked_map(fn, -(-n // 2), *arrays)


def chunked_map(fn, chunk: int, *arrays):
    """`fn` over `chunk` rows at a time (a `fori_loop`), for arrays sharing the leading axis
    [N, ...]; the rows are zero-padded to a whole number of chunks and the padding dropped from
    the outputs (a pytree of [N, ...] arrays).

    Chunk j holds rows j, j + n_chunks, j + 2·n_chunks, ...: a row axis sharded in contiguous
    blocks over devices stays sharded along the within-chunk axis, so under `jit` every device
    maps over its own rows. Contiguous chunks put the sharded axis on the mapped one, and XLA
    then gathers every row onto every device, which does the whole batch's work."""
    n = arrays[0].shape[0]
    if n == 0:
        return fn(*arrays)
    n_chunks, c, pad = chunk_layout(n, chunk)

    # [c, n_chunks, ...]: a reshape, no copy. Chunk j is column j, sliced in the loop. Mapping
    # over a swapped [n_chunks, c, ...] copy instead wrote and read every input once more (in
    # purify, OMP's [patches, atoms] correlations); `benchmarks/purify.py --map-ab` times both.
    xs = tuple(jnp.pad(a, ((0, pad),) + ((0, 0),) * (a.ndim - 1)).reshape(c, n_chunks, *a.shape[1:])
               for a in arrays)

    def take(j):
        return tuple(jax.lax.dynamic_index_in_dim(a, j, axis=1, keepdims=False) for a in xs)

    shapes = jax.eval_shape(fn, *(jax.ShapeDtypeStruct((c, *a.shape[2:]), a.dtype) for a in xs))
    init = jax.tree.map(lambda o: jnp.zeros((c, n_chunks, *o.shape[1:]), o.dtype), shapes)

    def body(j, out):
        return jax.tree.map(lambda o, r: jax.lax.dynamic_update_index_in_dim(o, r, j, axis=1),
                            out, fn(*take(j)))

    out = jax.lax.fori_loop(0, n_chunks, body, init)
    return jax.tree.map(lambda a: a.reshape(n_chunks * c, *a.shape[2:])[:n], out)
