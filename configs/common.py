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

    c.distributed = ml_collections.ConfigDict()
    c.distributed.coordinator = ""   # host:port; empty: from the environment, or single process
    c.distributed.num_processes = 0
    c.distributed.process_id = -1
    return c
