"""Defaults shared by every config; each config file overrides what differs.

Every field is documented where the method chooses it: ../shared/METHOD.md (stage numbers).
"""
import ml_collections


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.workdir = "runs/default"
    c.stages = ("baseline",)
    c.eval_batch_size = 500

    c.data = ml_collections.ConfigDict()
    c.data.source = "npz"            # "npz" (offline default) or "tfds"
    c.data.name = "cifar10"          # bundled copy used when data_dir is empty
    c.data.data_dir = ""             # empty: $SRDJAX_DATA_DIR, else ../shared/data/cifar10
    c.data.tfds_name = "cifar10"
    c.data.download = False          # tfds only: never touch the network unless asked
    c.data.train_per_class = 0       # 0: all; else a seeded class-balanced subset
    c.data.test_per_class = 0
    c.data.crop_pad = 4              # random-crop padding (pixels, reflect)
    c.data.flip = True
    c.data.image_size = (32, 32)

    c.model = ml_collections.ConfigDict()
    c.model.name = "small_cnn"       # small_cnn | resnet18 | wide_resnet
    c.model.num_classes = 10
    c.model.dtype = "float32"        # "bfloat16" activations on accelerators
    c.model.kwargs = ml_collections.ConfigDict()

    # Stage 1: baseline classifier.
    c.baseline = ml_collections.ConfigDict()
    c.baseline.epochs = 10
    c.baseline.batch_size = 256
    c.baseline.lr = 0.2
    c.baseline.momentum = 0.9
    c.baseline.nesterov = True
    c.baseline.weight_decay = 5e-4
    c.baseline.schedule = "onecycle"  # onecycle | cosine | constant
    c.baseline.warmup_fraction = 0.2
    c.baseline.label_smoothing = 0.2

    # Stage 2: adaptive clustering of baseline latents.
    c.cluster = ml_collections.ConfigDict()
    c.cluster.k_max = 8
    c.cluster.criterion = "silhouette"  # silhouette | bic
    c.cluster.threshold = 0.1        # best silhouette below this: k = 1 (see srdjax/kmeans.py)
    c.cluster.only_correct = True    # cluster only latents the baseline classifies correctly
    c.cluster.n_init = 4             # k-means restarts
    c.cluster.covariance = False     # also fit shrunk full covariances (Mahalanobis)
    c.cluster.shrinkage = 0.1
    c.cluster.min_std_fraction = 0.1  # σ floor: this fraction of the latents' mean std
    c.cluster.distance = "sigma"     # sigma | mahalanobis: how purify picks the nearest cluster

    # Stage 3: frequency split and semantic reconstruction dictionaries.
    c.frequency = ml_collections.ConfigDict()
    c.frequency.method = "tikhonov"  # tikhonov | gaussian
    c.frequency.lam = 5.0            # Tikhonov λ [uGuard]
    c.frequency.pad = 16             # symmetric padding (pixels)
    c.frequency.sigma = 2.5          # gaussian option only
    c.dictionaries = ml_collections.ConfigDict()
    c.dictionaries.patch_size = 8    # 8×8×3 = 192-d patches
    c.dictionaries.stride = 1        # overlapping patches (learning and purification)
    c.dictionaries.n_atoms = 256
    c.dictionaries.sparsity = 8
    c.dictionaries.n_iter = 10
    c.dictionaries.max_patches_per_cluster = 20000
    c.dictionaries.method = "ksvd"   # ksvd | mod

    # Stage 4: robust model (and the λ = 0 PGD-AT comparison, stage "pgd_at").
    c.robust = ml_collections.ConfigDict()
    c.robust.epochs = 10
    c.robust.batch_size = 256
    c.robust.lr = 0.05
    c.robust.momentum = 0.9
    c.robust.nesterov = True
    c.robust.weight_decay = 5e-4
    c.robust.schedule = "cosine"     # onecycle | cyclic | cosine | constant
    c.robust.warmup_fraction = 0.1
    c.robust.label_smoothing = 0.0
    c.robust.attack = "pgd"          # pgd | fgsm_rs | n_fgsm (srdjax/robust.py)
    c.robust.eps = 8.0               # L∞ budget, in /255 units
    c.robust.step_size = 2.0         # /255; fgsm_rs: 1.25 ε (Wong et al.), n_fgsm: ε
    c.robust.attack_steps = 10       # pgd only
    c.robust.noise = 16.0            # /255, n_fgsm only: uniform noise half-width (2 ε)
    # Catastrophic-overfitting watch: PGD accuracy on held-out training images (left out of
    # training) after every epoch; a drop of more than collapse_drop below its best, or a value
    # under collapse_floor, stops training and keeps the best epoch. 0 per class: no watch.
    c.robust.holdout_per_class = 50
    c.robust.check_steps = 10
    c.robust.check_step_size = 2.0   # /255
    c.robust.collapse_drop = 0.2
    c.robust.collapse_floor = 0.0
    c.robust.latent_weight = 0.3     # λ [uGuard]
    c.robust.distance = "sigma"      # sigma | mahalanobis (needs cluster.covariance)

    # Optional stage purified_at (srdjax/purified_training.py): the classifier behind the
    # purifier fine-tuned on purified adversarial images, each attack made through the whole
    # defense (BPDA) with a term pushing the cluster choice to a wrong class; evaluated as the
    # defense srd_purified_at. Not in any config's default stages: an ablation row.
    c.purified_at = ml_collections.ConfigDict()
    c.purified_at.init = "robust"    # robust | pgd_at | baseline: the weights it starts from
    c.purified_at.epochs = 1
    c.purified_at.batch_size = 256
    c.purified_at.lr = 0.02
    c.purified_at.momentum = 0.9
    c.purified_at.nesterov = True
    c.purified_at.weight_decay = 5e-4
    c.purified_at.schedule = "cyclic"
    c.purified_at.warmup_fraction = 0.3
    c.purified_at.label_smoothing = 0.0
    c.purified_at.attack = "fgsm_rs"
    c.purified_at.eps = 8.0          # /255
    c.purified_at.step_size = 10.0   # /255 (1.25 ε)
    c.purified_at.attack_steps = 10  # pgd only
    c.purified_at.noise = 16.0       # /255, n_fgsm only
    c.purified_at.selector_weight = 1.0  # β: the cluster-choice margin in the attack's objective

    # Stage 5: purification.
    c.purify = ml_collections.ConfigDict()
    c.purify.image_chunk = 0         # images OMP-coded together (memory); 0: by platform

    # Stage 6: honest evaluation (evaluate.py). For each defense the attacks run as a cascade
    # in this order, each only on the images every earlier one failed to break; the worst case
    # per image does not depend on the order, only the cost does. So the cheap and strong come
    # first, to shrink what the costly ones attack: the transfer attacks and the selector make
    # their images once for every image on bare classifiers (no purification inside the
    # attack), so each costs a defense a single forward pass per image; then the standard
    # AutoAttack suite in its own order (APGD-CE, the strongest per step, then APGD-T and
    # FAB-T, 9 target classes each); the surrogate (100 steps, 3 purifications each) before
    # Square, whose 5,000 queries through purification are the dearest of all.
    c.evaluate = ml_collections.ConfigDict()
    c.evaluate.test_per_class = 0    # 0: the whole test set; else a seeded class-balanced subset
    c.evaluate.defenses = ("none", "jpeg", "bit_depth", "blur", "pgd_at", "robust",
                           "srd_baseline", "srd_robust")
    c.evaluate.attacks = ("transfer-baseline", "transfer-robust", "transfer-pgd_at", "selector",
                          "apgd-ce", "apgd-t", "fab-t", "surrogate", "square")
    c.evaluate.compare = "srd_robust"  # the defense set against PGD-AT, named before the run
    c.evaluate.norm = "linf"         # linf | l2
    c.evaluate.eps = 8 / 255         # pixel units in [0, 1], unlike robust.eps (/255)
    c.evaluate.eps_list = (0.0, 2 / 255, 4 / 255, 8 / 255, 16 / 255)  # the curve (0 always run)
    c.evaluate.curve_attack = "pgd20"  # alone, for the curve and the unbounded (ε = 1) check
    c.evaluate.curve_per_class = 0   # curve and sanity checks on this many per class (0: all)
    c.evaluate.batch_size = 200      # at most; the last batch is padded, few shapes compile
    c.evaluate.seed = 0              # test subset and attack randomness (keyed per image)
    c.evaluate.jpeg_quality = 75
    c.evaluate.bit_depth = 4         # bits per channel
    c.evaluate.blur_sigma = 1.0      # pixels
    c.evaluate.pgd20_steps = 20
    c.evaluate.pgd100_steps = 100
    c.evaluate.pgd100_restarts = 2
    c.evaluate.apgd_steps = 100      # APGD-CE, APGD-DLR and APGD-T (AutoAttack standard: 100)
    c.evaluate.n_target_classes = 9  # APGD-T and FAB-T: classes ranked 2-10 (standard: 9)
    c.evaluate.fab_steps = 100       # FAB-T (standard: 100)
    c.evaluate.square_queries = 5000  # standard: 5,000
    c.evaluate.transfer_steps = 100  # PGD on the bare source classifier, then fed to each defense
    c.evaluate.selector_steps = 100  # PGD pushing the robust latent to a wrong class's cluster
    c.evaluate.surrogate_steps = 100  # PGD through the soft-cluster surrogate of purify
    c.evaluate.surrogate_top = 3     # clusters mixed by the surrogate
    c.evaluate.surrogate_temperature = 1.0  # softmax(-d / (T * latent dim)) weights
    c.evaluate.eot_samples = 1       # EOT draws for defenses flagged random (none is)
    c.evaluate.unbounded_max = 0.10  # sanity: flag a defense above this at ε = 1
    c.evaluate.output = "evaluation"  # reports go to <workdir>/<output>/
    c.evaluate.resume = True         # reuse finished cells of a killed run (<output>/cells/)
    # Which test images: "report" (test_per_class seeded picks per class) or "screen" (as many
    # per class from the images outside the report subset of report_per_class per class, so a
    # variant chosen on the screen subset is reported on images it was not chosen on).
    c.evaluate.subset = "report"
    c.evaluate.report_per_class = 100  # the report subset a "screen" run avoids (n = 1,000)
    # How every purification defense purifies at test time (the purifier ablation,
    # srdjax/purify_variants.py); the trained clusters, dictionaries and robust model stay.
    c.evaluate.purify = ml_collections.ConfigDict()
    c.evaluate.purify.choice = "nearest"  # nearest (paper) | reconstruction | top_classes
    c.evaluate.purify.top = 3        # top_classes: rebuilds averaged, one per nearest class
    c.evaluate.purify.lam = 0.0      # Tikhonov λ of the split; 0: as trained (frequency.lam)
    c.evaluate.purify.sparsity = 0   # OMP atoms per patch; 0: as trained (dictionaries.sparsity)

    c.distributed = ml_collections.ConfigDict()
    c.distributed.coordinator = ""   # host:port; empty: from the environment, or single process
    c.distributed.num_processes = 0
    c.distributed.process_id = -1
    return c


def cpu_eval(c: ml_collections.ConfigDict, per_class: int, curve_per_class: int) -> None:
    """The evaluation cut for quick checks on a CPU (`:cpu_eval` configs): every defense and
    every attack of the cascade, in the same order, at reduced length (APGD and FAB 50 steps,
    Square 1,000 queries, the transfer and selector attacks 50 steps, the surrogate 20), on
    `per_class` test images per class. Reports go to <workdir>/evaluation_cpu/."""
    c.evaluate.test_per_class = per_class
    c.evaluate.curve_per_class = curve_per_class
    c.evaluate.apgd_steps = 50
    c.evaluate.fab_steps = 50
    c.evaluate.square_queries = 1000
    c.evaluate.transfer_steps = 50
    c.evaluate.selector_steps = 50
    c.evaluate.surrogate_steps = 20
    c.evaluate.output = "evaluation_cpu"
