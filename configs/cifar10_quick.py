"""The default: the whole method on full CIFAR-10 with a small CNN, on a 2-core CPU.

    python train.py --config configs/cifar10_quick.py

Stages: baseline → cluster → dictionaries → robust → pgd_at → purify (test-set report), into
runs/cifar10_quick.
Baseline: SmallCNN (widths 24-32-64-128, 0.3M parameters), 8 epochs, batch 256,
SGD-Nesterov, one-cycle to lr 0.2, weight decay 5e-4, label smoothing 0.2, reflect-pad-2 crops
and flips. Robust and PGD-AT: one epoch of fine-tuning from the baseline with PGD-5 at
ε = 8/255 (step 2/255) inside the loop — the CPU budget; configs/cifar10.py trains with PGD-10.
Last run 2026-11-27 (2-core CPU, 2 host devices): baseline 87.78% on the 10,000 test images
(88.64% with flip test-time augmentation) in 19.0 min; clusters k = 2 for every class (20).
The later stages' figures: README "Results".
"""
from configs.common import base_config, cpu_eval


def get_config(arg: str = ""):
    """`configs/cifar10_quick.py:cpu_eval`: the same run, with the evaluation cut to shorter
    attacks on 200 images for quick checks (see below)."""
    if arg not in ("", "cpu_eval"):
        raise ValueError(f"configs/cifar10_quick.py takes no argument or ':cpu_eval', got {arg!r}")
    c = base_config()
    c.workdir = "runs/cifar10_quick"
    c.stages = ("baseline", "cluster", "dictionaries", "robust", "pgd_at", "purify")
    c.data.crop_pad = 2
    c.baseline.epochs = 8
    c.robust.epochs = 1
    c.robust.attack_steps = 5
    c.robust.lr = 0.02
    # python evaluate.py --config configs/cifar10_quick.py: full strength (the cascade of
    # configs/common.py: transfer from three classifiers, the selector, the standard AutoAttack
    # suite with Square at 5,000 queries, the surrogate) at ε = 8/255 on a stated class-balanced
    # subset of the test set, 100 per class = 1,000 images (the ε curve on 20 per class), on
    # every defense of configs/common.py; srd_robust is compared with PGD-AT.
    c.evaluate.test_per_class = 100
    c.evaluate.curve_per_class = 20
    if arg == "cpu_eval":
        # 200 images (20 per class; the curve on 10 per class), the cut of configs/common.py.
        cpu_eval(c, per_class=20, curve_per_class=10)
    return c
