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
    """`configs/cifar10_quick.py:cpu_eval`: the same run, with the evaluation cut to what a
    2-core CPU finishes in about an hour (see below)."""
    if arg not in ("", "cpu_eval"):
        raise ValueError(f"configs/cifar10_quick.py takes no argument or ':cpu_eval', got {arg!r}")
    c = base_config()
    c.workdir = "runs/cifar10_quick"
    c.stages = ("baseline", "cluster", "dictionaries", "robust", "pgd_at", "purify")
    c.data.crop_pad = 2
    c.baseline.epochs = 8
    # Fast adversarial training, the same for robust and pgd_at: FGSM with a random start
    # (step 1.25 ε), the cyclic learning rate, fine-tuned from the baseline (which keeps the
    # robust latent in the baseline's cluster space), watched for catastrophic overfitting.
    c.robust.attack = "fgsm_rs"
    c.robust.step_size = 10.0
    c.robust.epochs = 4
    c.robust.schedule = "cyclic"
    c.robust.lr = 0.1
    c.robust.warmup_fraction = 0.3
    # python evaluate.py --config configs/cifar10_quick.py: a stated class-balanced subset of the
    # exact test set (100 per class = 1,000 images; the ε curve on 20 per class), as the CPU
    # budget allows; the purifier cells (Square, surrogate) dominate its cost.
    c.evaluate.test_per_class = 100
    c.evaluate.curve_per_class = 20
    if arg == "cpu_eval":
        # 200 images (20 per class; the curve on 10 per class), the cut of configs/common.py.
        cpu_eval(c, per_class=20, curve_per_class=10)
    return c
