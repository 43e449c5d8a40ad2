"""Shared by the benchmark scripts: machine description, JSON output, interleaved timing."""
import json
import os
import platform
import time
from pathlib import Path

import numpy as np


def machine() -> dict:
    import jax
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "jax": jax.__version__,
            "devices": [str(d) for d in jax.devices()],
            "load_average": list(os.getloadavg())}


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
