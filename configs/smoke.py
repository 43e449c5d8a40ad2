"""Seconds-long run of the real pipeline on a tiny CIFAR-10 subset, for tests.

    python train.py --config configs/smoke.py --config.workdir=/tmp/srdjax_smoke

Accuracy is meaningless at this size; the point is that every stage runs and checkpoints.
"""
from configs.common import base_config


def get_config():
    c = base_config()
    c.workdir = "runs/smoke"
    c.data.train_per_class = 20
    c.data.test_per_class = 10
    c.model.kwargs.widths = (8, 8, 16, 16)
    c.baseline.epochs = 2
    c.baseline.batch_size = 50
    c.eval_batch_size = 100
    return c
