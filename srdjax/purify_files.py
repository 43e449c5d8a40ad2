"""purify.py's work: purify image files with a trained workdir, optionally classify them.

All inputs are read and checked before anything is written (`srdjax.imageio`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from srdjax import loading, parallel, stages, training
from srdjax.checks import check
from srdjax.data import Dataset
from srdjax.imageio import collect_inputs, save_grid, write_png
from srdjax.purifier import purify_uint8


def purify_files(args) -> int:
    """purify.py's work: purify (and optionally classify) images on a mesh of every device.

    Batches are split over all devices (all processes' when started with --coordinator etc.:
    every process reads the same inputs, process 0 alone writes and prints).
    """
    check(args.batch_size > 0, f"--batch-size must be positive, got {args.batch_size}")
    names, images = collect_inputs(args.inputs)  # cheap, so bad inputs fail before loading
    mesh = parallel.make_mesh()
    ctx = loading.context(args.checkpoint, mesh)
    purifier = stages.build_purifier(ctx)
    h, w = purifier.options.image_size
    check(images.shape[1:3] == (h, w), f"images are {images.shape[1]}x{images.shape[2]} but "
                                       f"checkpoint {args.checkpoint} serves {h}x{w} images")
    main = parallel.is_main_process()
    purified, chosen = purify_uint8(purifier, images, mesh, args.batch_size)
    preds = {}
    if args.classify:
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
        Path(args.grid).parent.mkdir(parents=True, exist_ok=True)
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
