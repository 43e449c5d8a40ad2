"""XLA flags that must be set before jax is imported (entry points and tests call this first).

- Host (CPU) devices: one XLA CPU device keeps about 1.6 of 2 cores busy; splitting each batch
  over one device per core trains 1.7x faster on a 2-core x86-64 CPU (quick config: 0.63-0.72 s per step on 2
  devices against 1.2 s on one). So on a machine with 2+ cores srdjax asks XLA for 2 host
  devices unless SRDJAX_HOST_DEVICES (or XLA_FLAGS) says otherwise; SRDJAX_HOST_DEVICES=1 turns
  it off. GPUs and TPUs are unaffected: the mesh is built from the default backend's devices.
  With many steps queued, 2 host devices can stop in XLA's all-reduce rendezvous, so
  `training.fit` waits for each step before dispatching the next.
- A longer collective timeout (600 s) than XLA's 40 s, which aborts runs on a merely
  oversubscribed machine; a real deadlock still ends, with XLA's message, instead of hanging.
- JAX's persistent compilation cache, for the entry points: a program that took over a second
  to compile is kept on disk and loaded by the next run that needs it (an attack step through
  purification compiles for minutes on a CPU; a resumed evaluation or training run, or a second
  `purify.py`, then starts at once). Directory: $SRDJAX_COMPILATION_CACHE, else
  ~/.cache/srdjax/xla; SRDJAX_COMPILATION_CACHE=off turns it off, and a
  JAX_COMPILATION_CACHE_DIR the user set is left as it is (theirs is used). It is not
  size-limited (JAX needs the `filelock` package for that): delete the directory to clear it;
  entries are a few MB per program. The cache is keyed by the program, the JAX
  version, the device and XLA_FLAGS, so a hit is the same program: results do not change.
  Benchmarks turn it off (they report compile times).
"""
import os

CACHE_OFF = ("0", "off", "false", "no", "none")


def configure(compilation_cache: bool = True) -> None:
    flags = os.environ.get("XLA_FLAGS", "")
    extra = []
    default = "2" if (os.cpu_count() or 1) >= 2 else "1"
    requested = os.environ.get("SRDJAX_HOST_DEVICES") or default
    if int(requested) > 1 and "xla_force_host_platform_device_count" not in flags:
        extra.append(f"--xla_force_host_platform_device_count={int(requested)}")
    if "xla_cpu_collective_call_terminate_timeout_seconds" not in flags:
        extra.append("--xla_cpu_collective_call_terminate_timeout_seconds=600")
    if extra:
        os.environ["XLA_FLAGS"] = " ".join([flags, *extra]).strip()
    cache = os.environ.get("SRDJAX_COMPILATION_CACHE", "").strip()
    if (compilation_cache and cache.lower() not in CACHE_OFF
            and "JAX_COMPILATION_CACHE_DIR" not in os.environ):
        cache = os.path.expanduser(cache or os.path.join("~", ".cache", "srdjax", "xla"))
        try:
            os.makedirs(cache, exist_ok=True)
        except OSError:  # e.g. a read-only home: run without the cache
            return
        os.environ["JAX_COMPILATION_CACHE_DIR"] = cache
