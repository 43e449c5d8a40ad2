"""The default: the whole method on full CIFAR-10 with a small CNN, on a 2-core CPU.

    python train.py --config configs/cifar10_quick.py

Baseline: SmallCNN (widths 24-32-64-128, 0.3M parameters), batch 256, SGD-Nesterov, one-cycle
to lr 0.2, weight decay 5e-4, label smoothing 0.2, reflect-pad-2 crops and flips.
Last run: see README "Results" (filled in from this command's summary.json).
"""
from configs.common import base_config


def get_config():
    c = base_config()
    c.workdir = "runs/cifar10_quick"
    c.stages = ("baseline",)
    c.data.crop_pad = 2
    c.baseline.epochs = 10
    return c
