"""Shared test fixtures' plumbing: the bundled data and tiny configs."""
import os
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CIFAR_DIR = Path(os.environ.get("SRDJAX_DATA_DIR", REPO.parent / "shared" / "data" / "cifar10"))


def cifar_test_images(n: int, offset: int = 0):
    """The first n official CIFAR-10 test images (uint8) and labels."""
    with np.load(CIFAR_DIR / "test.npz", allow_pickle=False) as f:
        return f["x"][offset:offset + n], f["y"][offset:offset + n].astype(np.int32)


def smoke_config(workdir, **overrides):
    from configs.smoke import get_config
    c = get_config()
    c.workdir = str(workdir)
    for key, value in overrides.items():
        section, _, field = key.rpartition(".")
        target = c
        for part in filter(None, section.split(".")):
            target = target[part]
        target[field] = value
    return c
