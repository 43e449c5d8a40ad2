"""Paper scale: CIFAR ResNet-18 (11M parameters), fast (FGSM-RS) adversarial training of the
robust and PGD-AT twins. For GPUs/TPUs — one ResNet-18 epoch takes about 34 min on a 2-core CPU.

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
    # Fast adversarial training for both twins (Wong et al. 2020's ResNet recipe: FGSM with a
    # random start, step 1.25 ε, 15 epochs of a cyclic learning rate), fine-tuned from the
    # baseline and watched for catastrophic overfitting (configs/common.py): two forward-backward
    # passes a step instead of PGD-10's eleven.
    c.robust.attack = "fgsm_rs"
    c.robust.step_size = 10.0
    c.robust.epochs = 15
    c.robust.batch_size = 512
    c.robust.schedule = "cyclic"
    c.robust.lr = 0.2
    c.robust.warmup_fraction = 0.4
    return c
