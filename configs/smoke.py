"""Seconds-long run of the real pipeline on a tiny CIFAR-10 subset, for tests.

    python train.py --config configs/smoke.py --config.workdir=/tmp/srdjax_smoke

Accuracy is meaningless at this size; the point is that every stage runs and checkpoints.
Runs every stage (baseline, cluster, dictionaries, robust, pgd_at) in well under 2 minutes.
"""
from configs.common import base_config


def get_config():
    c = base_config()
    c.workdir = "runs/smoke"
    c.data.train_per_class = 20
    c.data.test_per_class = 10
    c.model.kwargs.widths = (8, 8, 16, 16)
    c.stages = ("baseline", "cluster", "dictionaries", "robust", "pgd_at", "purify")
    c.baseline.epochs = 2
    c.baseline.batch_size = 50
    c.eval_batch_size = 100
    c.cluster.k_max = 3
    c.cluster.n_init = 2
    c.cluster.only_correct = False   # a 2-epoch model gets too few right to cluster per class
    c.dictionaries.n_atoms = 32
    c.dictionaries.sparsity = 4
    c.dictionaries.n_iter = 2
    c.dictionaries.stride = 4
    c.dictionaries.max_patches_per_cluster = 2000
    c.robust.epochs = 1
    c.robust.batch_size = 50
    c.robust.attack_steps = 2
    # A 2-epoch baseline's BatchNorm running statistics lag its batch statistics, so its
    # train-mode latents sit far (σ-distance ~10³) from the clusters fitted in eval mode; at
    # the default λ = 0.3 that diverges. Well-trained baselines show no such gap (quick config:
    # ~1.05 in both modes).
    c.robust.latent_weight = 0.001
    c.robust.lr = 0.01
    c.robust.holdout_per_class = 2   # the overfitting watch runs too (20 images, PGD-2)
    c.robust.check_steps = 2
    c.purified_at.batch_size = 50    # not in the default stages; tests run it
    c.purified_at.lr = 0.01
    # A tiny evaluation: python evaluate.py --config configs/smoke.py --config.workdir=...
    c.evaluate.test_per_class = 2
    c.evaluate.batch_size = 10
    c.evaluate.eps_list = (0.0, 8 / 255)
    c.evaluate.pgd20_steps = 2
    c.evaluate.pgd100_steps = 3
    c.evaluate.apgd_steps = 3
    c.evaluate.fab_steps = 3
    c.evaluate.n_target_classes = 2
    c.evaluate.square_queries = 5
    c.evaluate.transfer_steps = 2
    c.evaluate.selector_steps = 2
    c.evaluate.surrogate_steps = 2
    return c
