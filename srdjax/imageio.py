"""Image files in and out for `purify.py`: reading, writing atomically, grids, tables.

All inputs are read and checked before anything is written, so a bad file leaves no partial
output; every output file is written under a temporary name and renamed.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from srdjax.checks import SrdjaxError, check

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
            try:
                with np.load(item, allow_pickle=False) as f:
                    check("x" in f.files, f"{item} has no 'x' array (keys: {f.files})")
                    x = f["x"]
            except (OSError, ValueError) as e:
                raise SrdjaxError(f"cannot read {item}: {e}") from None
            check(x.ndim == 4 and x.shape[-1] == 3 and x.dtype == np.uint8,
                  f"{item}: x must be uint8 [N, H, W, 3], got {x.dtype} {x.shape}")
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


def purify_files(args) -> int:
    """purify.py's work: purify (and optionally classify) images on a mesh of every device.

    Batches are split over all devices (all processes' when started with --coordinator etc.:
    every process reads the same inputs, process 0 alone writes and prints).
    """
    from srdjax import parallel, stages, training
    from srdjax import purifier as purifier_lib
    from srdjax.data import Dataset
    check(args.batch_size > 0, f"--batch-size must be positive, got {args.batch_size}")
    mesh = parallel.make_mesh()
    purifier = purifier_lib.load_purifier(args.checkpoint, mesh)
    names, images = collect_inputs(args.inputs)
    h, w = purifier.options.image_size
    check(images.shape[1:3] == (h, w), f"images are {images.shape[1]}x{images.shape[2]} but "
                                       f"checkpoint {args.checkpoint} serves {h}x{w} images")
    main = parallel.is_main_process()
    purified, chosen = purifier_lib.purify_uint8(purifier, images, mesh, args.batch_size)
    preds = {}
    if args.classify:
        _, ctx = purifier_lib._context(args.checkpoint, mesh)
        classes = stages.class_names(ctx.config)
        for stage in ("baseline", "robust"):
            graphdef, params, stats = stages.load_classifier(ctx, stage)
            predict = training.make_predict(graphdef, mesh)
            for label, ims in (("raw", images), ("purified", purified)):
                logits, _ = training.predict_dataset(
                    predict, params, stats, Dataset(ims, np.zeros(len(ims), np.int32), classes),
                    mesh, args.batch_size)
                preds[f"{stage}/{label}"] = logits.argmax(-1)
    if not main:
        return 0
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, im in zip(names, purified):
        write_png(out_dir / f"{name}.png", im)
    print(f"wrote {len(names)} purified images to {out_dir} ({mesh.size} device(s))")
    if args.grid:
        save_grid(Path(args.grid), images, purified)
        print(f"wrote {args.grid}")
    if args.classify:
        cluster_class = parallel.to_host(purifier.clusters.class_ids)[chosen]
        header = ["image", "cluster (class)"] + list(preds)
        print(" | ".join(header))
        print(" | ".join("---" for _ in header))
        for j, name in enumerate(names):
            row = [name, f"{chosen[j]} ({classes[cluster_class[j]]})"]
            row += [classes[preds[key][j]] for key in preds]
            print(" | ".join(row))
    return 0
