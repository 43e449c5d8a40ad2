import io
import pickle
import tarfile

import jax
import numpy as np
import pytest

from srdjax import data
from srdjax.checks import SrdjaxError
from tests.helpers import CIFAR_DIR


def test_bundled_cifar10_test_split_is_the_official_one():
    ds = data.load_npz(CIFAR_DIR, "test")
    assert ds.x.shape == (10000, 32, 32, 3) and ds.x.dtype == np.uint8
    assert ds.y.dtype == np.int32
    np.testing.assert_array_equal(ds.y[:10], [3, 8, 8, 0, 6, 6, 1, 6, 3, 1])
    np.testing.assert_array_equal(np.bincount(ds.y), [1000] * 10)
    np.testing.assert_allclose(ds.x.reshape(-1, 3).mean(0) / 255, [0.49421, 0.48513, 0.45041],
                               atol=1e-4)
    assert ds.classes[0] == "airplane" and ds.classes[9] == "truck"


def test_class_balanced_subset_is_balanced_and_seeded():
    y = np.repeat(np.arange(5), 30)
    a = data.class_balanced_subset(y, 7, seed=1)
    b = data.class_balanced_subset(y, 7, seed=1)
    c = data.class_balanced_subset(y, 7, seed=2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    np.testing.assert_array_equal(np.bincount(y[a]), [7] * 5)
    with pytest.raises(SrdjaxError, match="fewer than"):
        data.class_balanced_subset(y, 31, seed=0)


def test_epoch_order_depends_only_on_seed_and_epoch():
    a = data.epoch_indices(103, 10, seed=3, epoch=2)
    b = data.epoch_indices(103, 10, seed=3, epoch=2)
    c = data.epoch_indices(103, 10, seed=3, epoch=3)
    assert len(a) == 10 and all(len(i) == 10 for i in a)
    np.testing.assert_array_equal(np.concatenate(a), np.concatenate(b))
    assert not np.array_equal(np.concatenate(a), np.concatenate(c))
    assert len(np.unique(np.concatenate(a))) == 100
    with pytest.raises(SrdjaxError, match="batch size must be positive"):
        data.epoch_indices(10, 0, 0, 0)


def test_augment_is_a_shifted_crop_or_its_mirror():
    x = jax.random.uniform(jax.random.key(0), (16, 8, 8, 3))
    out = np.asarray(data.augment(jax.random.key(1), x, pad=2, flip=True))
    xp = np.pad(np.asarray(x), ((0, 0), (2, 2), (2, 2), (0, 0)), mode="reflect")
    for i in range(16):
        candidates = [xp[i, a:a + 8, b:b + 8] for a in range(5) for b in range(5)]
        candidates += [c[:, ::-1] for c in candidates]
        assert min(np.abs(c - out[i]).max() for c in candidates) < 1e-7
    np.testing.assert_array_equal(data.augment(jax.random.key(1), x, 0, False), x)


def _write(path, **arrays):
    np.savez(path, **arrays)


def test_npz_bad_inputs_get_one_clear_error(tmp_path):
    with pytest.raises(SrdjaxError, match="does not exist"):
        data.load_npz(tmp_path / "nope", "train")
    with pytest.raises(SrdjaxError, match="no train"):
        data.load_npz(tmp_path, "train")
    x = np.zeros((4, 8, 8, 3), np.uint8)
    _write(tmp_path / "train_1.npz", x=x)
    with pytest.raises(SrdjaxError, match="missing keys"):
        data.load_npz(tmp_path, "train")
    _write(tmp_path / "train_1.npz", x=x.astype(np.float32), y=np.zeros(4, np.uint8))
    with pytest.raises(SrdjaxError, match="uint8"):
        data.load_npz(tmp_path, "train")
    _write(tmp_path / "train_1.npz", x=x[..., :1], y=np.zeros(4, np.uint8))
    with pytest.raises(SrdjaxError, match=r"\[N, H, W, 3\]"):
        data.load_npz(tmp_path, "train")
    _write(tmp_path / "train_1.npz", x=x, y=np.array([0, 1, 2, 10]))
    with pytest.raises(SrdjaxError, match="labels must lie"):
        data.load_npz(tmp_path, "train")
    (tmp_path / "train_1.npz").write_bytes(b"not a zip file")
    with pytest.raises(SrdjaxError, match="cannot read"):
        data.load_npz(tmp_path, "train")
    _write(tmp_path / "train_1.npz", x=np.zeros(3, dtype=object), y=np.zeros(3))
    with pytest.raises(SrdjaxError):
        data.load_npz(tmp_path, "train")
    with pytest.raises(SrdjaxError, match="split"):
        data.load_npz(tmp_path, "valid")


def _fake_archive(path, binary: bool, rng):
    """An archive in the official layout with 6 tiny batches; returns the images written."""
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    images = {}
    with tarfile.open(path, "w:gz") as tar:
        for name in names:
            x = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
            y = rng.integers(0, 10, 3).astype(np.uint8)
            images[name] = (x.reshape(3, 3, 32, 32).transpose(0, 2, 3, 1), y)
            if binary:
                raw = np.concatenate([y[:, None], x], 1).tobytes()
                member = f"cifar-10-batches-bin/{name}.bin"
            else:
                raw = pickle.dumps({b"data": x, b"labels": y.tolist()})
                member = f"cifar-10-batches-py/{name}"
            info = tarfile.TarInfo(member)
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return images


@pytest.mark.parametrize("binary", [True, False])
def test_converter_writes_the_npz_layout(tmp_path, binary):
    images = _fake_archive(tmp_path / "a.tar.gz", binary, np.random.default_rng(0))
    data.convert_cifar10_archive(tmp_path / "a.tar.gz", tmp_path / "out")
    train = data.load_npz(tmp_path / "out", "train")
    test = data.load_npz(tmp_path / "out", "test")
    np.testing.assert_array_equal(train.x[:3], images["data_batch_1"][0])
    np.testing.assert_array_equal(train.y[12:], images["data_batch_5"][1])
    np.testing.assert_array_equal(test.x, images["test_batch"][0])
    assert len(train) == 15 and not list((tmp_path / "out").glob("*tmp*"))


def test_converter_refuses_code_in_pickles(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    raw = pickle.dumps({b"data": Evil(), b"labels": []})
    with tarfile.open(tmp_path / "evil.tar.gz", "w:gz") as tar:
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    with pytest.raises(SrdjaxError, match="refusing to unpickle builtins.print"):
        data.convert_cifar10_archive(tmp_path / "evil.tar.gz", tmp_path / "out")
    assert not (tmp_path / "out" / "train_1.npz").exists()


def test_tfds_source_without_prepared_data_says_what_is_missing(tmp_path):
    with pytest.raises(SrdjaxError, match="not prepared"):
        data.load_tfds("cifar10", "test", data_dir=str(tmp_path), download=False)


def test_tfds_source_reads_a_prepared_array_record_dataset(tmp_path):
    """The real `tfds.data_source` path, on a tiny builder prepared here without TensorFlow
    (uint8 tensors instead of encoded images, which would need TF to write)."""
    tfds = pytest.importorskip("tensorflow_datasets")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 32, 32, 3), dtype=np.uint8)

    class SrdjaxTiny(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(32, 32, 3), dtype=np.uint8),
                "label": tfds.features.ClassLabel(names=list(data.CIFAR10_CLASSES))}))

        def _split_generators(self, dl_manager):
            return {"test": self._generate_examples()}

        def _generate_examples(self):
            for i, im in enumerate(images):
                yield i, {"image": im, "label": i % 10}

    SrdjaxTiny(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    ds = data.load_tfds("srdjax_tiny", "test", data_dir=str(tmp_path))
    assert ds.classes == data.CIFAR10_CLASSES and len(ds) == 7
    order = np.argsort(ds.y)  # the builder shuffles; match images by label
    np.testing.assert_array_equal(ds.x[order], images[np.argsort(np.arange(7) % 10)])
