"""Image datasets behind one interface: `load_dataset(data_config, split) -> Dataset`.

Sources:
  npz    a directory of `train_*.npz` / `test.npz` (keys x uint8 [N, H, W, 3], y [N]), as in
         ../shared/data/cifar10 — the offline default.
  tfds   tensorflow-datasets (`cifar10`, `imagenette/...`) for online users, read through
         `tfds.data_source`, which needs no TensorFlow; images of other sizes are resized.
  folder one sub-folder of PNG/JPEG images per class: `root/<class>/*`, split by the config's
         `test_fraction`, or `root/train/<class>/*` and `root/test/<class>/*`; any image sizes,
         resized (shorter side) and centre-cropped to `data.image_size`.

Images stay uint8 on the host; batches are cut by index (a seeded permutation per epoch, so a
run and its resumption see the same order) and augmented on device inside the jitted step.
"""
from __future__ import annotations

import dataclasses
import io
import os
import pickle
import tarfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from srdjax.checks import SrdjaxError, check
from srdjax.imageio import IMAGE_SUFFIXES, read_image

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")
REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLED = {"cifar10": REPO_ROOT.parent / "shared" / "data" / "cifar10",
           "imagenette64": REPO_ROOT.parent / "shared" / "data" / "imagenette64"}


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Host-side images (uint8 NHWC) and integer labels."""
    x: np.ndarray
    y: np.ndarray
    classes: tuple[str, ...]

    def __len__(self):
        return len(self.y)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def take(self, idx) -> "Dataset":
        return Dataset(self.x[idx], self.y[idx], self.classes)


def resolve_data_dir(data_dir: str | None, name: str = "cifar10") -> Path:
    """The config's directory, else $SRDJAX_DATA_DIR, else the bundled copy beside the repo
    (beside the working directory's clone for an installed package)."""
    if data_dir:
        return Path(data_dir).expanduser()
    if os.environ.get("SRDJAX_DATA_DIR"):
        return Path(os.environ["SRDJAX_DATA_DIR"]).expanduser()
    if name not in BUNDLED:
        raise SrdjaxError(f"no bundled copy of dataset {name!r}; set data.data_dir")
    # An installed package lives in site-packages, away from any clone: then the copy beside
    # the clone the command runs in (its working directory) is the bundled one.
    beside_cwd = Path.cwd().parent / BUNDLED[name].relative_to(REPO_ROOT.parent)
    if not BUNDLED[name].is_dir() and beside_cwd.is_dir():
        return beside_cwd
    return BUNDLED[name]


def _read_npz(path: Path) -> dict:
    from srdjax.checks import read_npz
    return read_npz(path)


def _validate(x, y, path, classes=None) -> tuple[np.ndarray, np.ndarray]:
    check(x.ndim == 4 and x.shape[-1] == 3,
          f"{path}: x must be [N, H, W, 3] images, got shape {x.shape}")
    check(x.dtype == np.uint8, f"{path}: x must be uint8, got {x.dtype}")
    check(y.shape == (x.shape[0],), f"{path}: y must have shape [{x.shape[0]}], got {y.shape}")
    check(np.issubdtype(y.dtype, np.integer), f"{path}: y must be integers, got {y.dtype}")
    n_cls = len(classes) if classes is not None else 10
    if len(y):
        check(y.min() >= 0 and y.max() < n_cls,
              f"{path}: labels must lie in [0, {n_cls - 1}], got [{y.min()}, {y.max()}]")
    return x, y.astype(np.int32)


def load_npz(data_dir, split: str) -> Dataset:
    data_dir = Path(data_dir)
    check(data_dir.is_dir(), f"data directory {data_dir} does not exist (set data.data_dir or "
                             f"SRDJAX_DATA_DIR to a folder of train_*.npz / test.npz)")
    if split == "train":
        files = sorted(data_dir.glob("train*.npz"))
    elif split == "test":
        files = sorted(data_dir.glob("test*.npz"))
    else:
        raise SrdjaxError(f"split must be 'train' or 'test', got {split!r}")
    check(files, f"no {split}*.npz files in {data_dir}")
    xs, ys, classes = [], [], None
    for path in files:
        d = _read_npz(path)
        missing = {"x", "y"} - set(d)
        check(not missing, f"{path}: missing keys {sorted(missing)}; expected x and y")
        if "classes" in d and classes is None:
            classes = tuple(str(c) for c in d["classes"])
        x, y = _validate(d["x"], d["y"], path, classes)
        xs.append(x)
        ys.append(y)
    shapes = {x.shape[1:] for x in xs}
    check(len(shapes) == 1, f"{data_dir}: files hold images of different sizes {sorted(shapes)}")
    y = np.concatenate(ys)
    if classes is None:
        classes = CIFAR10_CLASSES if y.max() < 10 else tuple(map(str, range(y.max() + 1)))
    return Dataset(np.concatenate(xs), y, classes)


def load_tfds(name: str, split: str, data_dir=None, download: bool = False,
              image_size=None) -> Dataset:
    """A tensorflow-datasets dataset read through `tfds.data_source` (array_record, no TF).

    Offline, a download attempt hangs for minutes in retries, so downloading happens only when
    the config asks for it (data.download=True)."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise SrdjaxError(f"data.source='tfds' needs tensorflow-datasets: {e}") from None
    try:
        source = tfds.data_source(name, split=split, data_dir=data_dir, download=download)
    except Exception as e:  # tfds raises many types; all mean "not prepared here"
        where = data_dir or "~/tensorflow_datasets"
        raise SrdjaxError(
            f"tfds dataset {name!r} split {split!r} is not prepared in array_record format "
            f"under {where} ({type(e).__name__}); run once online with data.download=True, "
            f"or use data.source='npz'") from None
    items = [source[i] for i in range(len(source))]
    images = [np.asarray(it["image"], np.uint8) for it in items]
    if image_size is not None:  # imagenette's images come in many sizes
        images = [resize_image(im if im.shape[-1] == 3 else np.repeat(im, 3, -1), image_size)
                  for im in images]
    x = np.stack(images)
    y = np.asarray([it["label"] for it in items], np.int32)
    names = tuple(source.dataset_info.features["label"].names)
    x, y = _validate(x, y, f"tfds:{name}/{split}", names)
    return Dataset(x, y, names)


def resize_image(image: np.ndarray, size) -> np.ndarray:
    """uint8 [H, W, 3] → [h, w, 3]: scale the shorter side to fit (bicubic), then centre-crop."""
    h, w = (int(v) for v in size)
    if image.shape[:2] == (h, w):
        return image
    from PIL import Image
    scale = max(h / image.shape[0], w / image.shape[1])
    new = (max(w, round(image.shape[1] * scale)), max(h, round(image.shape[0] * scale)))
    im = Image.fromarray(image).resize(new, Image.Resampling.BICUBIC)
    top, left = (new[1] - h) // 2, (new[0] - w) // 2
    return np.asarray(im, np.uint8)[top:top + h, left:left + w]


def _class_folders(root: Path, classes=None) -> list[Path]:
    found = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if classes:
        names = {p.name for p in found}
        missing = [c for c in classes if c not in names]
        check(not missing, f"{root}: no folder for classes {missing} (found {sorted(names)})")
        found = [root / c for c in classes]
    check(len(found) >= 2, f"{root}: a folder dataset needs at least two class folders, "
                           f"found {len(found)}")
    return found


def _read_class(folder: Path, size) -> np.ndarray:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    check(files, f"class folder {folder} holds no PNG/JPEG images")
    return np.stack([resize_image(read_image(p), size) for p in files])


def load_folder(root, split: str, image_size, *, classes=None, test_fraction: float = 0.2,
                seed: int = 0) -> Dataset:
    """Images from `root/<class>/*` (split per class by a seeded `test_fraction`) or from
    `root/train/<class>/*` and `root/test/<class>/*`. Classes: sorted folder names, or the
    config's `data.classes` list (a selection, in that order). Grayscale becomes RGB; images
    with an alpha channel are refused by name."""
    root = Path(root).expanduser()
    check(root.is_dir(), f"data directory {root} does not exist")
    check(split in ("train", "test"), f"split must be 'train' or 'test', got {split!r}")
    pre_split = (root / "train").is_dir() and (root / "test").is_dir()
    base = root / split if pre_split else root
    folders = _class_folders(base, classes)
    xs, ys = [], []
    for label, folder in enumerate(folders):
        x = _read_class(folder, image_size)
        if not pre_split:
            check(0 < test_fraction < 1,
                  f"data.test_fraction must lie in (0, 1), got {test_fraction}")
            order = np.random.default_rng([seed, label]).permutation(len(x))
            n_test = int(round(len(x) * test_fraction))
            check(0 < n_test < len(x), f"class folder {folder} has {len(x)} images, too few "
                                       f"to split with test_fraction={test_fraction}")
            x = x[np.sort(order[:n_test])] if split == "test" else x[np.sort(order[n_test:])]
        xs.append(x)
        ys.append(np.full(len(x), label, np.int32))
    return Dataset(np.concatenate(xs), np.concatenate(ys), tuple(f.name for f in folders))


def class_balanced_subset(y: np.ndarray, per_class: int, seed: int,
                          exclude: np.ndarray | None = None) -> np.ndarray:
    """Sorted indices of `per_class` seeded picks from every class, none of them in `exclude`
    (indices into y; without it, the picks are those of every earlier version)."""
    rng = np.random.default_rng(seed)
    idx = []
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        if exclude is not None:
            members = np.setdiff1d(members, exclude)
        check(len(members) >= per_class,
              f"class {c} has {len(members)} images, fewer than the subset's {per_class} per class")
        idx.append(rng.choice(members, per_class, replace=False))
    return np.sort(np.concatenate(idx))


def load_dataset(data_config, split: str, seed: int = 0) -> Dataset:
    """Load `split` as the config's `data` section says (source, name, data_dir, subsets)."""
    source = data_config.source
    size = tuple(int(v) for v in data_config.get("image_size", (32, 32)))
    check(len(size) == 2 and min(size) >= 8, f"data.image_size must be (H, W) ≥ 8, got {size}")
    classes = tuple(data_config.get("classes") or ()) or None
    if source == "npz":
        ds = load_npz(resolve_data_dir(data_config.get("data_dir"), data_config.name), split)
    elif source == "tfds":
        tfds_split = data_config.get(f"tfds_{split}_split") or split  # imagenette: validation
        ds = load_tfds(data_config.tfds_name, tfds_split, data_config.get("data_dir") or None,
                       bool(data_config.get("download", False)), image_size=size)
    elif source == "folder":
        check(data_config.get("data_dir"), "data.source='folder' needs data.data_dir")
        ds = load_folder(data_config.data_dir, split, size, classes=classes,
                         test_fraction=float(data_config.get("test_fraction", 0.2)), seed=seed)
    else:
        raise SrdjaxError(f"unknown data.source {source!r}; expected 'npz', 'tfds' or 'folder'")
    check(ds.x.shape[1:3] == size, f"{source} data holds {ds.x.shape[1]}×{ds.x.shape[2]} "
                                   f"images but data.image_size is {size[0]}×{size[1]}")
    per_class = data_config.get(f"{split}_per_class")
    if per_class:
        ds = ds.take(class_balanced_subset(ds.y, int(per_class), seed))
    return ds


def epoch_indices(n: int, batch_size: int, seed: int, epoch: int, *, shuffle=True,
                  drop_last=True) -> list[np.ndarray]:
    """The batches of one epoch as index arrays; the order is a function of (seed, epoch) only."""
    check(batch_size > 0, f"batch size must be positive, got {batch_size}")
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    stop = n - n % batch_size if drop_last else n
    return [order[i:i + batch_size] for i in range(0, stop, batch_size)]


def to_float(x_uint8):
    return x_uint8.astype(jnp.float32) / 255.0


def augment(key, x, pad: int = 4, flip: bool = True):
    """Random crop (reflect-padded by `pad`) and horizontal flip, per image, on device."""
    n, h, w, _ = x.shape
    k1, k2 = jax.random.split(key)
    if pad:
        xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")
        offs = jax.random.randint(k1, (n, 2), 0, 2 * pad + 1)
        x = jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, 3)))(xp, offs)
    if flip:
        mask = jax.random.bernoulli(k2, 0.5, (n, 1, 1, 1))
        x = jnp.where(mask, x[:, :, ::-1], x)
    return x


# ---------------------------------------------------------------------------------------------
# Converter: the official CIFAR-10 archives → the npz layout, for offline users.

def _safe_unpickle(data: bytes):
    """The python-format archive is pickled; allow only what a CIFAR batch holds (numpy arrays,
    builtins), so a tampered archive cannot run code."""
    allowed = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    class Restricted(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) in allowed:
                return super().find_class(module, name)
            raise SrdjaxError(f"refusing to unpickle {module}.{name} from the archive")

    return Restricted(io.BytesIO(data), encoding="bytes").load()


def convert_cifar10_archive(archive, out_dir) -> list[Path]:
    """Write train_1..5.npz and test.npz from `cifar-10-python.tar.gz` or `cifar-10-binary.tar.gz`.

    Files are written to a temporary name and renamed, so an interrupted run leaves none half
    written."""
    archive, out_dir = Path(archive), Path(out_dir)
    check(archive.is_file(), f"archive {archive} does not exist")
    try:
        tar = tarfile.open(archive, "r:*")
    except (tarfile.TarError, OSError) as e:
        raise SrdjaxError(f"cannot open {archive} as a tar archive: {e}") from None
    batches = {}
    with tar:
        for member in tar.getmembers():
            base = Path(member.name).name
            if not member.isfile():
                continue
            stem = base.removesuffix(".bin")
            if stem in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
                batches[stem] = (base.endswith(".bin"), tar.extractfile(member).read())
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    missing = [n for n in names if n not in batches]
    check(not missing, f"{archive} lacks {missing}; expected an official CIFAR-10 archive")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for i, name in enumerate(names):
        binary, raw = batches[name]
        if binary:
            rec = np.frombuffer(raw, np.uint8).reshape(-1, 3073)
            y, x = rec[:, 0], rec[:, 1:]
        else:
            d = _safe_unpickle(raw)
            x, y = np.asarray(d[b"data"], np.uint8), np.asarray(d[b"labels"], np.uint8)
        x = x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        target = out_dir / ("test.npz" if name == "test_batch" else f"train_{i + 1}.npz")
        tmp = target.with_suffix(".tmp.npz")
        np.savez(tmp, x=x, y=y.astype(np.uint8), classes=np.array(CIFAR10_CLASSES))
        os.replace(tmp, target)
        written.append(target)
    return written
