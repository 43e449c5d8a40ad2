"""The `folder` data source, and the whole method at 64×64 on a folder of PNGs (issue: beyond
CIFAR): 3 classes of CIFAR-10 test images upscaled to 64×64, every stage, then purify."""
import numpy as np
import pytest
from PIL import Image

from srdjax.checks import SrdjaxError
from srdjax.data import load_dataset, load_folder, resize_image
from tests.helpers import cifar_test_images, smoke_config

CLASSES = ("airplane", "cat", "ship")  # CIFAR-10 labels 0, 3, 8


def _write_folder(root, per_class=16, size=64):
    x, y = cifar_test_images(600)
    expected = {}
    for name, label in zip(CLASSES, (0, 3, 8)):
        (root / name).mkdir(parents=True)
        picks = x[y == label][:per_class]
        up = []
        for i, im in enumerate(picks):
            big = Image.fromarray(im).resize((size, size), Image.Resampling.BICUBIC)
            big.save(root / name / f"{i:03d}.png")
            up.append(np.asarray(big))
        expected[name] = np.stack(up)
    return expected


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder_data")
    return root, _write_folder(root)


def test_folder_source_reads_every_image_exactly_and_splits_per_class(folder):
    root, expected = folder
    train = load_folder(root, "train", (64, 64), test_fraction=0.25, seed=3)
    test = load_folder(root, "test", (64, 64), test_fraction=0.25, seed=3)
    assert train.classes == test.classes == CLASSES
    assert np.bincount(train.y).tolist() == [12, 12, 12]
    assert np.bincount(test.y).tolist() == [4, 4, 4]
    for label, name in enumerate(CLASSES):
        got = np.concatenate([train.x[train.y == label], test.x[test.y == label]])
        # the split is a partition of the class's files: same multiset of images, no overlap
        assert sorted(map(bytes, got)) == sorted(map(bytes, expected[name]))
    again = load_folder(root, "test", (64, 64), test_fraction=0.25, seed=3)
    assert np.array_equal(again.x, test.x)  # seeded


def test_class_list_selects_and_orders_folders(folder):
    root, expected = folder
    ds = load_folder(root, "train", (64, 64), classes=("ship", "airplane"), test_fraction=0.25)
    assert ds.classes == ("ship", "airplane")
    assert set(np.unique(ds.y)) == {0, 1}
    with pytest.raises(SrdjaxError, match="no folder for classes"):
        load_folder(root, "train", (64, 64), classes=("ship", "penguin"))


def test_resize_matches_pil_shorter_side_then_centre_crop():
    rng = np.random.default_rng(0)
    im = rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)
    out = resize_image(im, (20, 20))
    ref = np.asarray(Image.fromarray(im).resize((33, 20), Image.Resampling.BICUBIC))[:, 6:26]
    assert out.shape == (20, 20, 3) and np.array_equal(out, ref)


def test_train_test_subfolders_and_grayscale(tmp_path):
    rng = np.random.default_rng(1)
    for split in ("train", "test"):
        for name in ("a", "b"):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8), "L").save(
                    tmp_path / split / name / f"{i}.jpg")
    ds = load_folder(tmp_path, "test", (32, 32))
    assert ds.x.shape == (6, 32, 32, 3) and ds.classes == ("a", "b")
    assert np.array_equal(ds.x[..., 0], ds.x[..., 2])  # grayscale replicated to RGB


@pytest.mark.parametrize("case, message", [
    ("empty", "holds no PNG/JPEG images"),
    ("one_class", "at least two class folders"),
    ("corrupt", "not a readable PNG/JPEG image"),
    ("rgba", "alpha channel"),
])
def test_bad_folders_are_named(tmp_path, case, message):
    rng = np.random.default_rng(2)
    names = ("a",) if case == "one_class" else ("a", "b")
    for name in names:
        (tmp_path / name).mkdir()
        if case == "empty" and name == "b":
            continue
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
                tmp_path / name / f"{i}.png")
    if case == "corrupt":
        (tmp_path / "b" / "bad.png").write_bytes(b"not an image")
    if case == "rgba":
        Image.fromarray(rng.integers(0, 256, (16, 16, 4), dtype=np.uint8), "RGBA").save(
            tmp_path / "a" / "x.png")
    with pytest.raises(SrdjaxError, match=message):
        load_folder(tmp_path, "train", (16, 16))


def _folder_config(root, workdir):
    from configs.imagenet10 import scaled
    c = smoke_config(workdir)
    scaled(c, 64)
    c.data.source = "folder"
    c.data.data_dir = str(root)
    c.data.test_fraction = 0.25
    c.data.classes = ()
    c.data.train_per_class = 0
    c.data.test_per_class = 0
    c.model.num_classes = 3
    c.model.kwargs.widths = (8, 8, 16, 16, 16)
    c.baseline.batch_size = c.robust.batch_size = 12
    c.eval_batch_size = 12
    c.dictionaries.stride = 8           # 64 px, 8×8 patches: 8×8 = 64 patches per image
    return c


def test_every_stage_runs_on_a_folder_at_64px_then_purifies(folder, tmp_path):
    from srdjax import loading, stages
    from srdjax import purifier as purifier_lib
    root, _ = folder
    summary = stages.run(_folder_config(root, tmp_path / "run"))
    assert set(summary) == {"baseline", "cluster", "dictionaries", "robust", "pgd_at", "purify"}
    p = loading.load_purifier(tmp_path / "run")
    x = load_folder(root, "test", (64, 64), test_fraction=0.25).x[:4].astype(np.float32) / 255
    out, chosen = purifier_lib.purify(p, x, return_cluster=True)
    out = np.asarray(out)
    assert out.shape == (4, 64, 64, 3) and 0 <= out.min() and out.max() <= 1
    assert np.asarray(chosen).shape == (4,)
    assert 0.0 < np.abs(out - x).mean() < 0.2  # changed, but still the same picture


def test_resolution_patches_do_not_tile_fails_before_training(folder, tmp_path):
    from srdjax import stages
    root, _ = folder
    c = _folder_config(root, tmp_path / "bad")
    c.dictionaries.stride = 5            # (64 - 8) % 5 != 0
    with pytest.raises(SrdjaxError, match="do not tile 64x64"):
        stages.run(c)
    assert not (tmp_path / "bad" / "baseline").exists()


def test_npz_images_must_match_the_configured_size(tmp_path):
    c = smoke_config(tmp_path)
    c.data.image_size = (64, 64)
    with pytest.raises(SrdjaxError, match="32×32 images but data.image_size is 64×64"):
        load_dataset(c.data, "test")


@pytest.mark.parametrize("resolution", [64, 128, 224])
def test_imagenet10_config_tiles_its_resolution(resolution):
    """configs/imagenet10.py:<resolution> is a valid config whose patches tile its images."""
    from configs.imagenet10 import get_config
    from srdjax import stages
    from srdjax.patches import _grid
    c = get_config(str(resolution))
    stages.validate_config(c)
    assert tuple(c.data.image_size) == (resolution, resolution)
    rows, cols = _grid(resolution, resolution, c.dictionaries.patch_size, c.dictionaries.stride)
    assert rows == cols and rows >= 8


def test_imagenet10_cpu_eval_changes_only_the_evaluation():
    from configs.imagenet10 import get_config
    from srdjax import stages
    full, cut = get_config(), get_config("cpu_eval")
    stages.validate_config(cut)
    assert cut.evaluate.output != full.evaluate.output and "pgd100" not in cut.evaluate.attacks
    for section in full:
        if section != "evaluate":
            assert cut[section] == full[section], section
    with pytest.raises(ValueError, match="takes a resolution"):
        get_config("fast")


def test_bundled_imagenette_loads_at_64px():
    from configs.imagenet10 import get_config
    c = get_config()
    if not (load_dataset.__globals__["BUNDLED"]["imagenette64"] / "test.npz").exists():
        pytest.skip("imagenette64 not bundled here")
    ds = load_dataset(c.data, "test")
    assert ds.x.shape == (1000, 64, 64, 3) and ds.num_classes == 10
    assert ds.classes[0].endswith("tench") and np.bincount(ds.y).tolist() == [100] * 10
