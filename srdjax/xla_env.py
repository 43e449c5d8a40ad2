"""XLA flags that must be set before jax is imported (entry points and tests call this first).

- Host (CPU) devices: one XLA CPU device uses about 1.6 cores, and splitting each batch over one
  device per core trained 1.3-1.5x faster here (0.616 s per quick-config step on 2 devices).
  But on this project's 2-core machine, two long runs with two forced host devices stopped in an
  all-reduce rendezvous (one aborted by XLA's 40 s terminate timeout, one hung with idle
  threads), so it is opt-in: SRDJAX_HOST_DEVICES=2 (or XLA_FLAGS) asks for it. GPUs and TPUs are
  unaffected either way.
- A longer collective timeout (600 s) than XLA's 40 s, which aborts runs on a merely
  oversubscribed machine; a real deadlock still ends, with XLA's message, instead of hanging.
"""
import os


def configure() -> None:
    flags = os.environ.get("XLA_FLAGS", "")
    extra = []
    requested = os.environ.get("SRDJAX_HOST_DEVICES")
    if requested and "xla_force_host_platform_device_count" not in flags:
        extra.append(f"--xla_force_host_platform_device_count={int(requested)}")
    if "xla_cpu_collective_call_terminate_timeout_seconds" not in flags:
        extra.append("--xla_cpu_collective_call_terminate_timeout_seconds=600")
    if extra:
        os.environ["XLA_FLAGS"] = " ".join([flags, *extra]).strip()
