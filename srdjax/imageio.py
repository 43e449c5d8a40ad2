"""Image files in and out: reading PNG/JPEG/npz inputs, writing PNGs atomically, grids.

All inputs are read and checked before anything is written, so a bad file leaves no partial
output; every output file is written under a temporary name and renamed.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from srdjax.checks import SrdjaxError, check, read_npz

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def read_image(path: Path) -> np.ndarray:
    """uint8 [H, W, 3]. Grayscale is replicated to RGB; an alpha channel is refused (what it
    hides would silently change the image)."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in im.info):
                raise SrdjaxError(f"{path} has an alpha channel ({mode}); flatten it to RGB first")
            if mode not in ("RGB", "L", "P", "I;16", "I", "CMYK", "YCbCr"):
                raise SrdjaxError(f"{path} has unsupported image mode {mode}")
            return np.asarray(im.convert("RGB"), np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise SrdjaxError(f"{path} is not a readable PNG/JPEG image ({type(e).__name__})") from None


def collect_inputs(inputs) -> tuple[list[str], np.ndarray]:
    """(names, uint8 images [N, H, W, 3]) from files, folders and npz files."""
    names, images = [], []
    for item in map(Path, inputs):
        if item.is_dir():
            files = sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            check(files, f"folder {item} holds no PNG/JPEG images")
            for p in files:
                names.append(p.stem)
                images.append(read_image(p))
        elif item.suffix.lower() == ".npz":
            arrays = read_npz(item)
            check("x" in arrays, f"{item} has no 'x' array (keys: {sorted(arrays)})")
            x = arrays["x"]
            check(x.ndim == 4 and x.shape[-1] == 3 and x.dtype == np.uint8,
                  f"{item}: x must be uint8 [N, H, W, 3], got {x.dtype} {x.shape}")
            check(len(x) > 0, f"{item}: x holds no images (shape {x.shape})")
            names += [f"{item.stem}_{i:05d}" for i in range(len(x))]
            images += list(x)
        elif item.is_file():
            check(item.suffix.lower() in IMAGE_SUFFIXES,
                  f"{item} is not a .png/.jpg/.jpeg image or an .npz file")
            names.append(item.stem)
            images.append(read_image(item))
        else:
            raise SrdjaxError(f"input {item} does not exist")
    sizes = {im.shape for im in images}
    check(len(sizes) == 1, f"inputs have different sizes {sorted(s[:2] for s in sizes)}; "
                           f"purify one size at a time")
    check(len(set(names)) == len(names), "two inputs share a file name; outputs would collide")
    return names, np.stack(images)


def write_png(path: Path, image_u8: np.ndarray) -> None:
    from PIL import Image
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(image_u8).save(tmp, format="PNG")
    os.replace(tmp, path)


def save_grid(path: Path, before: np.ndarray, after: np.ndarray, n: int = 8) -> None:
    """Rows: original, purified, |difference| ×4 (as in docs/figures/quick_purify_grid.png)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n = min(n, len(before))
    fig, axes = plt.subplots(3, n, figsize=(1.3 * n, 4.2), squeeze=False)
    diff = np.clip(np.abs(after.astype(np.float32) - before) * 4, 0, 255).astype(np.uint8)
    for row, (label, ims) in enumerate((("original", before), ("purified", after),
                                        ("|diff| ×4", diff))):
        for i in range(n):
            ax = axes[row, i]
            ax.imshow(ims[i], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[row, 0].set_ylabel(label)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
