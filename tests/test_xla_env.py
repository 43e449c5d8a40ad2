"""srdjax.xla_env: the flags and the compilation cache the entry points set before jax starts."""
import os
import subprocess
import sys

import pytest

from srdjax import xla_env
from tests.helpers import REPO


@pytest.fixture
def env(monkeypatch):
    """A clean slate for the variables configure() reads and writes (restored afterwards)."""
    for name in ("SRDJAX_COMPILATION_CACHE", "JAX_COMPILATION_CACHE_DIR", "SRDJAX_HOST_DEVICES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setenv("HOME", os.environ.get("HOME", "/tmp"))
    return monkeypatch


def test_cache_directory_from_the_environment(env, tmp_path):
    env.setenv("SRDJAX_COMPILATION_CACHE", str(tmp_path / "c"))
    xla_env.configure()
    assert os.environ["JAX_COMPILATION_CACHE_DIR"] == str(tmp_path / "c")
    assert (tmp_path / "c").is_dir()


def test_default_cache_is_under_home(env, tmp_path):
    env.setenv("HOME", str(tmp_path))
    xla_env.configure()
    assert os.environ["JAX_COMPILATION_CACHE_DIR"] == str(tmp_path / ".cache" / "srdjax" / "xla")


@pytest.mark.parametrize("how", ["env_off", "argument", "user_dir"])
def test_cache_can_be_turned_off_and_a_users_own_is_kept(env, tmp_path, how):
    if how == "env_off":
        env.setenv("SRDJAX_COMPILATION_CACHE", "off")
    if how == "user_dir":
        env.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "mine"))
    xla_env.configure(compilation_cache=how != "argument")
    expected = str(tmp_path / "mine") if how == "user_dir" else None
    assert os.environ.get("JAX_COMPILATION_CACHE_DIR") == expected
    assert "--xla_cpu_collective_call_terminate_timeout_seconds=600" in os.environ["XLA_FLAGS"]


def test_unwritable_cache_directory_runs_without_one(env, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    env.setenv("SRDJAX_COMPILATION_CACHE", str(blocker / "sub"))  # a path under a file
    xla_env.configure()
    assert "JAX_COMPILATION_CACHE_DIR" not in os.environ


def test_a_second_process_loads_the_compiled_program(tmp_path):
    """The first run writes the program to the cache; the second finds it there and adds
    nothing (same program, same flags)."""
    code = ("from srdjax import xla_env; xla_env.configure()\n"
            "import jax, jax.numpy as jnp\n"
            "print(float(jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((4, 4))).sum()))\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION")}
    env.update(SRDJAX_COMPILATION_CACHE=str(tmp_path / "cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", PYTHONPATH=str(REPO))
    run = lambda: subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO,  # noqa: E731
                                 capture_output=True, text=True, timeout=300)
    first = run()
    assert first.returncode == 0, first.stderr
    listing = lambda: {p.name: p.stat().st_mtime_ns  # noqa: E731
                       for p in (tmp_path / "cache").iterdir()}
    entries = listing()
    assert any(name.startswith("jit_") for name in entries), entries
    second = run()
    assert second.returncode == 0, second.stderr
    assert second.stdout == first.stdout
    assert "Error" not in first.stderr + second.stderr
    assert listing() == entries  # read, not written again
