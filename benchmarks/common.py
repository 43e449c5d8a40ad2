"""Shared by the benchmark scripts: machine description and JSON output."""
import json
import os
import platform
from pathlib import Path


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
