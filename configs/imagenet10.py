"""The method beyond CIFAR: 10 ImageNet classes at ImageNet-like resolution.

    python train.py --config configs/imagenet10.py
    python evaluate.py --config configs/imagenet10.py            # 200 images, full attacks
    python evaluate.py --config configs/imagenet10.py:cpu_eval   # 100 images, ~1 h on 2 cores

Default (offline, CPU): the bundled 64×64 Imagenette sample, ../shared/data/imagenette64/
(fast.ai's 10-class ImageNet subset: tench, English springer, cassette player, chain saw,
church, French horn, garbage truck, gas pump, golf ball, parachute; 300 train / 100 test images
per class), a SmallCNN with one more pooling group than CIFAR's, into runs/imagenet10.

Other data, with the same stages:
- Higher resolution on GPUs/TPUs: `--config configs/imagenet10.py:128` (or `:224`) builds the
  config for that size, with ResNet-18 and its ImageNet stem (7×7/2 conv + max pool); the data then comes
  from `data.source` below: tensorflow-datasets' `imagenette/320px-v2` (online users:
  `--config.data.download=True` once), or a folder.
- Any folder of images, one sub-folder per class (`root/<class>/*.png|jpg`, split by
  `data.test_fraction`, or `root/train/<class>/...` and `root/test/<class>/...`):
  `--config.data.source=folder --config.data.data_dir=/path/to/root`.
- The "ImageNet-10" of deep-clustering papers (penguin, dog, leopard, airliner, airship,
  container ship, sports car, trailer truck, orange, soccer ball) is a folder and a class list
  away: copy those ten synsets' images from an ImageNet train folder (n02056570 king penguin,
  n02085936 Maltese dog, n02128757 snow leopard, n02690373 airliner, n02692877 airship,
  n03095699 container ship, n04285008 sports car, n04467665 trailer truck, n07747607 orange,
  n04254680 soccer ball) into one root and run with `data.source=folder`, `data.data_dir` set,
  and optionally `data.classes` to fix the order.

Patch size, stride, dictionary size and the frequency split's padding scale with the resolution
(see `scaled` below): 64 px uses 8×8 patches at stride 2 (29×29 = 841 patches per image, the
cost of ~1.3 CIFAR images), 128 px and up 16×16 at stride 8.
"""
import ml_collections

from configs.common import base_config, cpu_eval


def scaled(c: ml_collections.ConfigDict, resolution: int) -> None:
    """Set every resolution-dependent field for `resolution`×`resolution` images."""
    c.data.image_size = (resolution, resolution)
    c.frequency.pad = resolution // 2
    if resolution <= 64:
        c.dictionaries.patch_size, c.dictionaries.stride = 8, 2
        c.dictionaries.n_atoms, c.dictionaries.sparsity = 256, 8
    else:
        patch = 16
        c.dictionaries.patch_size, c.dictionaries.sparsity = patch, 12
        c.dictionaries.n_atoms = 512
        stride = 8
        while (resolution - patch) % stride:
            stride //= 2
        c.dictionaries.stride = stride


def get_config(arg: str | None = None):
    """`configs/imagenet10.py[:64|:128|:224|:cpu_eval]`; cpu_eval is the 64 px run with the
    evaluation cut to what a 2-core CPU finishes in about an hour (see below)."""
    arg = arg or ""
    if arg not in ("", "cpu_eval") and not arg.isdigit():
        raise ValueError(f"configs/imagenet10.py takes a resolution (64, 128, 224) or ':cpu_eval', "
                         f"got {arg!r}")
    resolution = int(arg) if arg.isdigit() else 64
    c = base_config()
    c.resolution = resolution
    c.workdir = f"runs/imagenet10_{resolution}"
    c.stages = ("baseline", "cluster", "dictionaries", "robust", "pgd_at", "purify")
    scaled(c, resolution)
    c.data.test_fraction = 0.2       # folder source without train/ and test/ sub-folders
    c.data.classes = ()              # folder source: a class list selects and orders folders
    c.data.crop_pad = 4 * resolution // 32
    if resolution <= 64:
        c.data.source = "npz"
        c.data.name = "imagenette64"
        c.model.kwargs.widths = (24, 32, 64, 128, 128)  # 64 → 4 px before the latent pool
        c.baseline.epochs = 15
        c.baseline.batch_size = 100
        c.baseline.lr = 0.1
        c.eval_batch_size = 200
        c.cluster.k_max = 4
        c.dictionaries.max_patches_per_cluster = 10000
        c.dictionaries.n_iter = 5
        c.robust.epochs = 2
        c.robust.batch_size = 100
        c.robust.lr = 0.02
        c.robust.attack_steps = 5
        c.evaluate.test_per_class = 20
        c.evaluate.curve_per_class = 10
        c.evaluate.batch_size = 100
        if arg == "cpu_eval":
            # As configs/cifar10_quick.py:cpu_eval, on 10 images per class (the curve on 5):
            # a 64 px image costs ~1.3 CIFAR images to purify and ~4 to classify.
            cpu_eval(c, per_class=10, curve_per_class=5)
    else:
        c.data.source = "tfds"
        c.data.tfds_name = "imagenette/320px-v2"
        c.data.tfds_test_split = "validation"
        c.model.name = "resnet18"
        c.model.kwargs.stem = "imagenet"
        c.model.dtype = "bfloat16"
        c.baseline.epochs = 60
        c.baseline.batch_size = 128
        c.baseline.lr = 0.1
        c.baseline.schedule = "cosine"
        c.baseline.warmup_fraction = 0.05
        c.baseline.label_smoothing = 0.1
        c.robust.epochs = 20
        c.robust.batch_size = 128
        c.robust.attack_steps = 10
    c.model.kwargs.mean = (0.485, 0.456, 0.406)
    c.model.kwargs.std = (0.229, 0.224, 0.225)
    return c
