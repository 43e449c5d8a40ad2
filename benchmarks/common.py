"""Shared by the benchmark scripts: machine description, JSON output, interleaved timing, and
a per-operation profile of a jitted program."""
import collections
import glob
import json
import os
import platform
import re
import tempfile
import time
from pathlib import Path

import numpy as np


def cpu_times():
    """The machine's summed CPU time counters (/proc/stat's `cpu` line), None where unreadable."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    return [int(v) for v in fields[1:]] if fields and fields[0] == "cpu" else None


def steal_share(since):
    """Share of the CPU time since the `cpu_times()` snapshot `since` that the hypervisor gave
    to other guests (Linux's "steal"), or None. On a shared virtual machine this sets much of
    the run-to-run spread: a run with half its time stolen is about half as fast."""
    now = cpu_times()
    if since is None or now is None or len(now) < 8:
        return None
    delta = [b - a for a, b in zip(since, now)]
    total = sum(delta[:8])  # user nice system idle iowait irq softirq steal (guest is in user)
    return delta[7] / total if total > 0 else None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f
                         if line.startswith("model name")), platform.processor())
    except OSError:
        return platform.processor()


def host(since=None) -> dict:
    """The host a benchmark ran on, without importing jax (a driver that starts jax processes
    must not claim a GPU itself); with a `cpu_times()` snapshot, also the CPU time stolen since."""
    import importlib.metadata
    out = {"platform": platform.platform(), "cpu_model": cpu_model(), "cpus": os.cpu_count(),
           "jax": importlib.metadata.version("jax"), "load_average": list(os.getloadavg())}
    if since is not None:
        out["cpu_steal_share"] = steal_share(since)
    return out


def machine(since=None) -> dict:
    """`host`, and the devices jax sees."""
    import jax
    return {**host(since), "devices": [str(d) for d in jax.devices()],
            "device_kind": jax.devices()[0].device_kind}


def write_json(path, payload) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    os.replace(tmp, path)
    print(f"wrote {path}")


def interleaved(fns, repeats):
    """Run the functions in turn, `repeats` rounds: (last outputs, best times, median times).

    The machine is shared: alternating the two sides exposes both to the same interference,
    and the best of the rounds is the least disturbed estimate of each.
    """
    times = [[] for _ in fns]
    outs = [None] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            outs[i] = fn()
            times[i].append(time.perf_counter() - start)
    return outs, [min(t) for t in times], [float(np.median(t)) for t in times]


# Profiler events that are not one XLA operation's own work: the executor's spans, completion
# markers of asynchronous operations, and control flow, whose span holds its body's operations.
_CONTAINERS = ("while", "conditional", "call")


def op_profile(fn, args, repeats: int, top: int = 15) -> list:
    """Where a jitted program spends its time, per kind of XLA operation: run fn(*args)
    `repeats` times under jax.profiler and sum the events of XLA's CPU threads (on a GPU, its
    "XLA Ops" lines), numbered instances of one fusion kind together ("subtract_abs_fusion.3" ->
    "subtract_abs_fusion"). Returns the `top` kinds, most time first, as dicts with ms per call,
    events per call and microseconds per event. Times on several threads or devices add up, so
    the total can exceed the wall time. Call fn once before (compilation is not profiled)."""
    import jax
    totals, counts = collections.Counter(), collections.Counter()
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp):
            for _ in range(repeats):
                jax.block_until_ready(fn(*args))
        for path in glob.glob(os.path.join(tmp, "**", "*.xplane.pb"), recursive=True):
            for plane in jax.profiler.ProfileData.from_file(path).planes:
                for line in plane.lines:
                    if not (line.name.startswith("tf_XLA") or line.name == "XLA Ops"):
                        continue
                    for event in line.events:
                        name = re.sub(r"\.\d+$", "", event.name)
                        if (name.startswith(("ThunkExecutor", "end: "))
                                or name in _CONTAINERS):
                            continue
                        totals[name] += event.duration_ns
                        counts[name] += 1
    return [{"op": name, "ms_per_call": ns / repeats / 1e6,
             "events_per_call": counts[name] / repeats,
             "us_per_event": ns / counts[name] / 1e3}
            for name, ns in totals.most_common(top)]
