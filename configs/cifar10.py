"""Paper scale: CIFAR ResNet-18 (11M parameters), PGD-10 adversarial training. For GPUs/TPUs.

    python train.py --config configs/cifar10.py

Stage times estimated from step times by
`python benchmarks/train_speed.py --config configs/cifar10.py --steps 20 --robust-steps 3`:
on one NVIDIA H200 baseline 2.0 min, robust 3.9 min, pgd_at 3.9 min; on a 2-core CPU one
ResNet-18 epoch takes about 34 min. No accuracy or robustness figures are claimed for it: the
whole run has not been made and evaluated.
"""
from configs.common import base_config


def get_config():
    c = base_config()
    c.workdir = "runs/cifar10"
    c.stages = ("baseline", "cluster", "dictionaries", "robust", "pgd_at", "purify")
    c.model.name = "resnet18"
    c.model.kwargs.stem = "cifar"
    c.baseline.epochs = 100
    c.baseline.batch_size = 512
    c.baseline.lr = 0.4
    c.baseline.schedule = "cosine"
    c.baseline.warmup_fraction = 0.05
    c.baseline.label_smoothing = 0.1
    c.robust.epochs = 30
    c.robust.batch_size = 512
    c.robust.lr = 0.1
    c.robust.attack_steps = 10
    return c
