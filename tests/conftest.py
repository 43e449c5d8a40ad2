"""Every test runs with two forced host devices, so sharded code paths are exercised on a CPU.

The flag must be set before jax is imported anywhere.
"""
import atexit
import fcntl
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=2").strip()
from srdjax import xla_env  # noqa: E402  (imports no jax; adds the collective timeout)

# Compiled programs are cached for this test session only (shared with the entry points the
# tests start as subprocesses), never in the user's ~/.cache.
if "SRDJAX_COMPILATION_CACHE" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="srdjax-test-xla-")
    os.environ["SRDJAX_COMPILATION_CACHE"] = _cache
    atexit.register(shutil.rmtree, _cache, True)
# Every program, not only those over JAX's default 1 s of compile time: the tests run the smoke
# pipeline in several processes, and its many small programs (per-cluster dictionary steps, data
# pipeline, init) are most of its run time. On a 2-core CPU a second smoke run in a new
# process took 22 s with every program cached, 49 s with the default, 89-95 s with no cache.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

xla_env.configure()


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smoke_workdir(tmp_path_factory):
    """One run of every stage of configs/smoke.py, shared by the tests that read its result
    (read-only: a test that changes it works on a copy).

    Under pytest-xdist (`-n 2`) the workers share one run: the first to need it builds it under
    a lock in their common temp directory, and the others wait for it there.
    """
    from srdjax import stages
    from tests.helpers import smoke_config
    if "PYTEST_XDIST_WORKER" not in os.environ:
        workdir = tmp_path_factory.mktemp("smoke_all")
        stages.run(smoke_config(workdir))
        return workdir
    shared = tmp_path_factory.getbasetemp().parent
    workdir, done = shared / "smoke_all", shared / "smoke_all.done"
    with open(shared / "smoke_all.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():  # a worker whose run failed leaves no marker: the next one retries
            shutil.rmtree(workdir, ignore_errors=True)
            stages.run(smoke_config(workdir))
            done.touch()
    return workdir


@pytest.fixture
def x64():
    """float64 inside the test (reference comparisons to 1e-10)."""
    import jax
    with jax.enable_x64(True):
        yield
