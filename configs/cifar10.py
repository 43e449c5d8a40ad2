"""Paper scale: CIFAR ResNet-18 (11M parameters). For GPUs/TPUs — about 34 min per epoch on a
2-core CPU.

    python train.py --config configs/cifar10.py
"""
from configs.common import base_config


def get_config():
    c = base_config()
    c.workdir = "runs/cifar10"
    c.stages = ("baseline",)
    c.model.name = "resnet18"
    c.model.kwargs.stem = "cifar"
    c.baseline.epochs = 100
    c.baseline.batch_size = 512
    c.baseline.lr = 0.4
    c.baseline.schedule = "cosine"
    c.baseline.warmup_fraction = 0.05
    c.baseline.label_smoothing = 0.1
    return c
