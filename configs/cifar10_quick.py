"""The default: the whole method on full CIFAR-10 with a small CNN, on a 2-core CPU.

    python train.py --config configs/cifar10_quick.py

Stages: baseline → cluster → dictionaries → robust → pgd_at → purify (test-set report), into
runs/cifar10_quick.
Baseline: SmallCNN (widths 24-32-64-128, 0.3M parameters), 8 epochs, batch 256,
SGD-Nesterov, one-cycle to lr 0.2, weight decay 5e-4, label smoothing 0.2, reflect-pad-2 crops
and flips: 87.83% on the 10,000 test images (88.41% with flip test-time augmentation), about
11 min (667 s) on a 2-core AMD EPYC CPU with 2 host devices (the same figures again on a rerun);
clusters k = 2 for every class (20).

Robust and PGD-AT, twins (same network, data, attack, schedule and epochs; pgd_at has λ = 0):
fast adversarial training fine-tuned from the baseline, which keeps the robust latent in the
space the clusters were fitted in. FGSM with a random start at ε = 8/255, step 10/255 (Wong et
al. 2020), 4 epochs of a cyclic learning rate (0 → 0.1 over the first 30% of the steps, then
→ 0), batch 256, on 49,500 training images; the other 500 (50 per class) are held out to watch
for catastrophic overfitting (PGD-10 accuracy after every epoch; a drop of 20 points stops
training and keeps the best epoch). A step is two forward-backward passes, so an epoch costs
about two baseline epochs. Measured (`python train.py --config configs/cifar10_quick.py` on the
saved baseline, cluster and dictionaries; 2-core AMD EPYC CPU): robust 68.49% and pgd_at 69.47%
clean on the 10,000 test images (held-out training images: 69.4% / 36.6% and 71.6% / 35.0%
clean / PGD-10; no collapse), 10.5 and 12.1 min; purify → robust 66.94%, and the cluster purify
picks belongs to the true class for 68.0% of test images. Robustness on test images: README
"Results" (evaluate.py).
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
    # Fast adversarial training, the same for robust and pgd_at: FGSM with a random start
    # (step 1.25 ε), the cyclic learning rate, fine-tuned from the baseline (which keeps the
    # robust latent in the baseline's cluster space), watched for catastrophic overfitting.
    c.robust.attack = "fgsm_rs"
    c.robust.step_size = 10.0
    c.robust.epochs = 4
    c.robust.schedule = "cyclic"
    c.robust.lr = 0.1
    c.robust.warmup_fraction = 0.3
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
