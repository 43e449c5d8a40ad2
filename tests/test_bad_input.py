"""Bad input to train.py, purify.py, evaluate.py and the public functions: each case gets one
error line naming the problem, a non-zero exit code (or SrdjaxError), and leaves every file as it
was (the workdir and output paths are hashed before and after).

The commands run in-process (cli.train_cli / evaluate_cli / purify_main with argv), so the
module pays for jax's start-up once; the trained run is the session's smoke workdir, copied
where a case damages it.
"""
import hashlib
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import srdjax
from srdjax import cli
from srdjax.checks import SrdjaxError
from tests.helpers import REPO, cifar_test_images

SMOKE = str(REPO / "configs" / "smoke.py")


def snapshot(*roots) -> dict:
    """Every file's sha256 and every folder under `roots` (None for a root that is absent)."""
    out = {}
    for root in map(Path, roots):
        if not root.exists():
            out[str(root)] = None
            continue
        paths = [root] + (sorted(root.rglob("*")) if root.is_dir() else [])
        for p in paths:
            out[str(p)] = (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file()
                           else "folder")
    return out


def run(main, argv, capsys):
    """(exit code, stderr) of an entry point called in-process."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    return code, err


def assert_one_line_error(code, err, expected, status=2):
    assert code == status, err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and expected in last, err


@pytest.fixture(scope="module")
def workdir(smoke_workdir, tmp_path_factory):
    """A private copy of the finished smoke run (cases that damage it copy it again)."""
    dest = tmp_path_factory.mktemp("bad_input") / "run"
    shutil.copytree(smoke_workdir, dest)
    return dest


def _copy(workdir, tmp_path) -> Path:
    dest = tmp_path / "run"
    shutil.copytree(workdir, dest)
    return dest


def _flip_a_byte(directory: Path) -> Path:
    """Flip one byte in the middle of the largest data file under `directory` (orbax's arrays)."""
    target = max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    return target


# ------------------------------------------------------------------------------------ train.py

CONFIG_CASES = [
    (["--config.foo=1"], "unknown config field config.foo"),
    (["--config.cluster.kmax=3"], "unknown config field config.cluster.kmax"),
    (["--config.nosection.x=3"], "unknown config field config.nosection"),
    (["--config.cluster.k_max=abc"], "--config.cluster.k_max must be an integer, got 'abc'"),
    (["--config.cluster.k_max=0"], "config.cluster.k_max must be >= 1, got 0"),
    (["--config.cluster.n_init=0"], "config.cluster.n_init must be >= 1, got 0"),
    (["--config.baseline.lr=-0.1"], "config.baseline.lr must be > 0, got -0.1"),
    (["--config.baseline.epochs=0"], "config.baseline.epochs must be >= 1, got 0"),
    (["--config.robust.batch_size=0"], "config.robust.batch_size must be >= 1, got 0"),
    (["--config.baseline.momentum=1.5"], "config.baseline.momentum must be in [0, 1], got 1.5"),
    (["--config.baseline.lr=nan"], "config.baseline.lr must be finite, got nan"),
    (["--config.baseline.schedule=linear"], "config.baseline.schedule must be one of"),
    (["--config.stages=('baseline','bogus')"], "unknown stage 'bogus' in config.stages"),
    (["--config.stages=()"], "config.stages must name at least one stage"),
    (["--config.model.name=vgg"], "unknown model 'vgg'; expected one of"),
    (["--config.model.num_classes=1"], "config.model.num_classes must be >= 2, got 1"),
    (["--config.cluster.criterion=aic"], "config.cluster.criterion must be one of 'silhouette'"),
    (["--config.frequency.method=dct"], "config.frequency.method must be one of 'tikhonov'"),
    (["--config.frequency.lam=0"], "config.frequency.lam must be > 0, got 0"),
    (["--config.data.flip=maybe"], "--config.data.flip must be true or false, got 'maybe'"),
    (["--config.data.source=csv"], "config.data.source must be one of 'npz', 'tfds', 'folder'"),
    (["--config.data.image_size=(32,)"], "config.data.image_size must hold 2 values"),
    (["--config.data.train_per_class=-1"], "config.data.train_per_class must be >= 0, got -1"),
    (["--config.dictionaries.sparsity=64"], "config.dictionaries.sparsity (64) must be <= "
                                            "n_atoms (32)"),
    (["--config.dictionaries.patch_size=40"], "config.dictionaries.patch_size 40 is larger"),
    (["--config.robust.distance=mahalanobis"], "needs config.cluster.covariance=True"),
    (["--config.robust.eps=-8"], "config.robust.eps must be in [0, 255], got -8.0"),
    (["--config.purify.image_chunk=-1"], "config.purify.image_chunk must be >= 0, got -1"),
    (["--config.evaluate.jpeg_quality=0"], "config.evaluate.jpeg_quality must be in [1, 100]"),
    (["--config.workdir="], "config.workdir must not be empty"),
    (["--config.model.kwargs.depth=3"], "bad arguments for model 'small_cnn'"),
    (["--bogus"], "train.py: unknown argument '--bogus'"),
]


@pytest.mark.parametrize("extra,expected", CONFIG_CASES, ids=[c[0][0] for c in CONFIG_CASES])
def test_train_py_refuses_a_bad_config_before_writing(tmp_path, capsys, extra, expected):
    out = tmp_path / "w"
    code, err = run(cli.train_cli, ["--config", SMOKE, f"--config.workdir={out}", *extra],
                    capsys)
    assert_one_line_error(code, err, expected)
    assert snapshot(tmp_path) == {str(tmp_path): "folder"}  # no workdir, nothing else


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


CONFIG_FILE_CASES = {
    "missing": (None, "config file {path} does not exist"),
    "not_python.json": ("{}", "must be a .py file with get_config()"),
    "syntax.py": ("def get_config(:\n", "fails to load: SyntaxError"),
    "no_get_config.py": ("X = 1\n", "has no get_config() function"),
    "raises.py": ("def get_config():\n    raise RuntimeError('boom')\n",
                  "get_config failed: RuntimeError: boom"),
    "not_a_configdict.py": ("def get_config():\n    return {'seed': 0}\n",
                            "must return an ml_collections.ConfigDict, got dict"),
    "unknown_field.py": ("from configs.smoke import get_config as smoke\n"
                         "def get_config():\n    c = smoke()\n    c.cluster.k_maxx = 3\n"
                         "    return c\n", "unknown field config.cluster.k_maxx"),
    "missing_field.py": ("from configs.smoke import get_config as smoke\n"
                         "def get_config():\n    c = smoke()\n    del c.baseline['lr']\n"
                         "    return c\n", "config.baseline.lr is missing"),
}


@pytest.mark.parametrize("name", list(CONFIG_FILE_CASES))
def test_train_py_refuses_a_bad_config_file(tmp_path, capsys, name):
    text, expected = CONFIG_FILE_CASES[name]
    path = tmp_path / "conf" / name
    if text is not None:
        _write(path, text)
    before = snapshot(tmp_path)
    code, err = run(cli.train_cli, ["--config", path, f"--config.workdir={tmp_path / 'w'}"],
                    capsys)
    assert_one_line_error(code, err, expected.format(path=path))
    assert snapshot(tmp_path) == before


def test_train_py_without_config_and_help(capsys):
    code, err = run(cli.train_cli, [], capsys)
    assert_one_line_error(code, err, "--config FILE is required")
    code, _ = run(cli.train_cli, ["--help"], capsys)
    assert code == 0


def test_train_py_refuses_a_workdir_that_cannot_be_a_folder(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    before = snapshot(tmp_path)
    for workdir, expected in ((tmp_path / "file", "is a file; expected a folder"),
                              (tmp_path / "file" / "sub", "is a file, not a folder")):
        code, err = run(cli.train_cli, ["--config", SMOKE, f"--config.workdir={workdir}"],
                        capsys)
        assert_one_line_error(code, err, expected)
        assert snapshot(tmp_path) == before


def test_a_changed_config_leaves_the_workdir_byte_for_byte(workdir, capsys):
    """The refusal comes before config.json is rewritten (it used to be rewritten first, and
    purify.py then purified with settings the checkpoints were not trained with)."""
    before = snapshot(workdir)
    code, err = run(cli.train_cli, ["--config", SMOKE, f"--config.workdir={workdir}",
                                    "--config.frequency.lam=2.0"], capsys)
    assert_one_line_error(code, err, "holds a 'dictionaries' checkpoint from another config "
                                     "(frequency.lam: 5.0 there, 2.0 now)")
    assert snapshot(workdir) == before


def test_a_corrupt_stage_record_is_one_line(workdir, tmp_path, capsys):
    run_dir = _copy(workdir, tmp_path)
    (run_dir / "cluster" / "config.json").write_text("{not json")
    before = snapshot(run_dir)
    code, err = run(cli.train_cli, ["--config", SMOKE, f"--config.workdir={run_dir}"], capsys)
    assert_one_line_error(code, err, f"{run_dir / 'cluster' / 'config.json'} is unreadable")
    assert snapshot(run_dir) == before


@pytest.mark.parametrize("damage,expected", [
    ("truncated", "is truncated or corrupt, not a readable .npz archive"),
    ("empty", "is empty (0 bytes); expected an .npz archive"),
    ("pickled", "Object arrays cannot be loaded when allow_pickle=False"),
    ("no_y", "missing keys ['y']; expected x and y"),
])
def test_train_py_refuses_bad_data_files_before_writing(tmp_path, capsys, damage, expected):
    data = tmp_path / "data"
    data.mkdir()
    x, y = cifar_test_images(20)
    np.savez(data / "train.npz", x=x, y=y)
    np.savez(data / "test.npz", x=x, y=y)
    bad = data / "test.npz"
    if damage == "truncated":
        bad.write_bytes(bad.read_bytes()[:500])
    elif damage == "empty":
        bad.write_bytes(b"")
    elif damage == "pickled":
        np.savez(bad, x=np.array([{"a": 1}], dtype=object), y=y)
    else:
        np.savez(bad, x=x)
    before = snapshot(tmp_path)
    code, err = run(cli.train_cli, ["--config", SMOKE, f"--config.workdir={tmp_path / 'w'}",
                                    f"--config.data.data_dir={data}",
                                    "--config.data.train_per_class=0",
                                    "--config.data.test_per_class=0"], capsys)
    assert_one_line_error(code, err, expected)
    assert snapshot(tmp_path) == before


def test_train_py_refuses_a_missing_data_folder(tmp_path, capsys):
    code, err = run(cli.train_cli, ["--config", SMOKE, f"--config.workdir={tmp_path / 'w'}",
                                    f"--config.data.data_dir={tmp_path / 'nowhere'}"], capsys)
    assert_one_line_error(code, err, f"data directory {tmp_path / 'nowhere'} does not exist")
    assert not (tmp_path / "w").exists()


def test_a_damaged_training_step_names_what_to_delete(workdir, tmp_path, capsys):
    """Resuming from a training checkpoint whose bytes changed is refused (the stage has not
    finished: its DONE.json and final/ are gone, its steps remain)."""
    run_dir = _copy(workdir, tmp_path)
    shutil.rmtree(run_dir / "baseline" / "final")
    (run_dir / "baseline" / "DONE.json").unlink()
    steps = sorted(int(p.name) for p in (run_dir / "baseline" / "ckpt").iterdir()
                   if p.name.isdigit())
    _flip_a_byte(run_dir / "baseline" / "ckpt" / str(steps[-1]))
    before = snapshot(run_dir)
    code, err = run(cli.train_cli, ["--config", SMOKE, f"--config.workdir={run_dir}",
                                    "--config.stages=('baseline',)"], capsys)
    assert_one_line_error(code, err, "stage 'baseline': ")
    assert "does not match the sha256 saved with it" in err
    assert f"delete {run_dir / 'baseline' / 'ckpt' / str(steps[-1])} to resume" in err
    assert snapshot(run_dir) == before


def test_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    argv = ["--config", SMOKE, f"--config.workdir={tmp_path / 'w'}", "--config.cluster.k_max=0"]
    with pytest.raises(SrdjaxError, match="k_max must be >= 1"):
        cli.train_cli(argv + ["--debug"])
    monkeypatch.setenv("SRDJAX_DEBUG", "1")
    with pytest.raises(SrdjaxError, match="k_max must be >= 1"):
        cli.train_cli(argv)
    monkeypatch.delenv("SRDJAX_DEBUG")
    # An unexpected failure is one line too, exit code 1, pointing at --debug.
    from srdjax import stages
    monkeypatch.setattr(stages, "run", lambda config: (_ for _ in ()).throw(RuntimeError("x")))
    code, err = run(cli.train_cli, argv[:2] + [f"--config.workdir={tmp_path / 'w'}"], capsys)
    assert_one_line_error(code, err, "RuntimeError: x (rerun with --debug", status=1)
    assert not (tmp_path / "w").exists()


# ----------------------------------------------------------------------------------- purify.py

def _npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


@pytest.fixture
def inputs(tmp_path):
    folder = tmp_path / "inputs"
    folder.mkdir()
    x, _ = cifar_test_images(3)
    good = _npz(folder / "good.npz", x=x)
    bad = {}
    bad["truncated"] = folder / "truncated.npz"
    bad["truncated"].write_bytes(good.read_bytes()[:300])
    bad["empty_file"] = folder / "empty_file.npz"
    bad["empty_file"].write_bytes(b"")
    bad["no_x"] = _npz(folder / "no_x.npz", images=x)
    bad["float_x"] = _npz(folder / "float_x.npz", x=x / 255.0)
    bad["no_images"] = _npz(folder / "no_images.npz", x=x[:0])
    bad["rank3"] = _npz(folder / "rank3.npz", x=x[0])
    bad["pickled"] = _npz(folder / "pickled.npz", x=np.array([{"a": 1}], dtype=object))
    bad["small"] = _npz(folder / "small.npz", x=x[:, :16, :16])
    (folder / "photo.gif").write_bytes(b"GIF89a")
    bad["gif"] = folder / "photo.gif"
    return good, bad


PURIFY_INPUT_CASES = {
    "truncated": "is truncated or corrupt, not a readable .npz archive",
    "empty_file": "is empty (0 bytes); expected an .npz archive",
    "no_x": "has no 'x' array (keys: ['images'])",
    "float_x": "x must be uint8 [N, H, W, 3], got float64",
    "no_images": "x holds no images",
    "rank3": "x must be uint8 [N, H, W, 3], got uint8 (32, 32, 3)",
    "pickled": "Object arrays cannot be loaded when allow_pickle=False",
    "small": "serves 32x32 images",
    "gif": "is not a .png/.jpg/.jpeg image or an .npz file",
}


@pytest.mark.parametrize("case", list(PURIFY_INPUT_CASES))
def test_purify_py_refuses_bad_input_files(workdir, tmp_path, capsys, inputs, case):
    _, bad = inputs
    out = tmp_path / "out"
    before = snapshot(workdir, tmp_path)
    code, err = run(cli.purify_main, ["--checkpoint", workdir, "--output", out, bad[case]],
                    capsys)
    assert_one_line_error(code, err, PURIFY_INPUT_CASES[case])
    assert snapshot(workdir, tmp_path) == before


def test_purify_py_refuses_bad_flags_and_outputs(workdir, tmp_path, capsys, inputs):
    good, _ = inputs
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "a_folder").mkdir()
    not_a_run = tmp_path / "not_a_run"
    not_a_run.mkdir()
    out = tmp_path / "out"
    cases = [
        (["--checkpoint", workdir, "--output", tmp_path / "a_file", good],
         "--output {t}/a_file is a file; expected a folder"),
        (["--checkpoint", workdir, "--output", tmp_path / "a_file" / "sub", good],
         "is a file, not a folder"),
        (["--checkpoint", workdir, "--output", out, "--grid", tmp_path / "a_folder", good],
         "--grid {t}/a_folder is a folder; expected a file name"),
        (["--checkpoint", workdir, "--output", out, "--grid", tmp_path / "a_file" / "g.png",
          good], "is a file, not a folder"),
        (["--checkpoint", workdir, "--output", out, "--grid", tmp_path / "grid.jpg", good],
         "--grid {t}/grid.jpg must end in .png"),
        (["--checkpoint", workdir, "--output", good.parent, good.parent],
         "holds input {t}/inputs: the purified images would overwrite the originals"),
        (["--checkpoint", workdir, "--output", out, "--batch-size", "0", good],
         "--batch-size must be positive, got 0"),
        (["--checkpoint", workdir, "--output", out, "--batch-size", "many", good],
         "argument --batch-size: invalid int value: 'many'"),
        (["--checkpoint", workdir, good], "the following arguments are required: --output"),
        (["--checkpoint", not_a_run, "--output", out, good],
         "{t}/not_a_run is not an srdjax checkpoint directory (no config.json)"),
        (["--checkpoint", tmp_path / "a_file", "--output", out, good],
         "is not an srdjax checkpoint directory"),
        (["--checkpoint", workdir, "--output", out, tmp_path / "nope.png"],
         "input {t}/nope.png does not exist"),
        (["--checkpoint", workdir, "--output", out, good, "--frobnicate"],
         "unrecognized arguments: --frobnicate"),
    ]
    before = snapshot(workdir, tmp_path)
    for argv, expected in cases:
        code, err = run(cli.purify_main, argv, capsys)
        assert_one_line_error(code, err, expected.format(t=tmp_path))
        assert snapshot(workdir, tmp_path) == before, argv


@pytest.mark.parametrize("damage", ["config_json", "dictionaries_bytes", "cluster_file_gone"])
def test_purify_py_refuses_a_damaged_workdir(workdir, tmp_path, capsys, inputs, damage):
    good, _ = inputs
    run_dir = _copy(workdir, tmp_path)
    if damage == "config_json":
        (run_dir / "config.json").write_text('{"data": ')
        expected = f"{run_dir / 'config.json'} is unreadable (JSONDecodeError"
    elif damage == "dictionaries_bytes":
        _flip_a_byte(run_dir / "dictionaries" / "final")
        expected = "stage 'dictionaries': "
    else:
        (run_dir / "cluster" / "final" / "manifest.ocdbt").unlink()
        expected = "manifest.ocdbt is missing; delete"
    out = tmp_path / "out"
    before = snapshot(run_dir, tmp_path)
    code, err = run(cli.purify_main, ["--checkpoint", run_dir, "--output", out, good], capsys)
    assert_one_line_error(code, err, expected)
    if damage != "config_json":
        assert "and rerun train.py to redo the" in err
    assert snapshot(run_dir, tmp_path) == before


def test_purify_py_makes_the_grid_folder_and_writes(workdir, tmp_path, capsys, inputs):
    """The good path beside the bad ones: a --grid in a folder that does not exist yet is made
    (it used to fail after the PNGs were written)."""
    good, _ = inputs
    code, err = run(cli.purify_main, ["--checkpoint", workdir, "--output", tmp_path / "out",
                                      "--grid", tmp_path / "new" / "grid.png", good], capsys)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        f"good_{i:05d}.png" for i in range(3)]
    assert (tmp_path / "new" / "grid.png").stat().st_size > 1000


# --------------------------------------------------------------------------------- evaluate.py

def test_evaluate_py_refuses_bad_input_before_any_work(workdir, tmp_path, capsys):
    run_dir = _copy(workdir, tmp_path)
    (run_dir / "a_file_here").write_text("x")
    corrupt = tmp_path / "corrupt"
    shutil.copytree(workdir, corrupt)
    (corrupt / "config.json").write_bytes(b"\x00\x01garbage")
    cases = [
        ([f"--config.workdir={tmp_path / 'absent'}"], "does not exist; train it first"),
        ([f"--config.workdir={run_dir}", "--config.evaluate.eps=-0.5"],
         "evaluate.eps must lie in [0, 1]"),
        ([f"--config.workdir={run_dir}", "--config.evaluate.attacks=('pgd7',)"],
         "unknown attack 'pgd7' in evaluate.attacks"),
        ([f"--config.workdir={run_dir}", "--config.evaluate.defenses=('magic',)"],
         "unknown defense 'magic' in evaluate.defenses"),
        ([f"--config.workdir={run_dir}", "--config.evaluate.epss=0.1"],
         "unknown config field config.evaluate.epss"),
        ([f"--config.workdir={run_dir}", "--config.evaluate.batch_size=0"],
         "config.evaluate.batch_size must be >= 1, got 0"),
        ([f"--config.workdir={run_dir}", "--config.evaluate.output=a/b"],
         "evaluate.output must be a folder name inside the workdir, got 'a/b'"),
        ([f"--config.workdir={run_dir}", "--config.evaluate.output=a_file_here"],
         "is a file; expected a folder"),
        ([f"--config.workdir={corrupt}"], "config.json is unreadable"),
        ([f"--config.workdir={run_dir}", "--sav"], "evaluate.py: unknown argument '--sav'"),
    ]
    before = snapshot(tmp_path)
    for extra, expected in cases:
        code, err = run(cli.evaluate_cli, ["--config", SMOKE, *extra], capsys)
        assert_one_line_error(code, err, expected)
        assert snapshot(tmp_path) == before, extra


# --------------------------------------------------------------------- the public functions

@pytest.fixture(scope="module")
def loaded(workdir):
    return srdjax.load_purifier(workdir), srdjax.load_defense(workdir, classifier="baseline")


def _good_images(n=4):
    return jnp.asarray(cifar_test_images(n)[0], jnp.float32) / 255


IMAGE_CASES = {
    "rank3": (lambda x: x[0], "images must be NHWC with rank 4, got shape (32, 32, 3)"),
    "rank5": (lambda x: x[None], "images must be NHWC with rank 4"),
    "channels_first": (lambda x: jnp.transpose(x, (0, 3, 1, 2)),
                       "images must have 3 channels last (NHWC)"),
    "uint8": (lambda x: (x * 255).astype(jnp.uint8),
              "must be floating point in [0, 1], got dtype uint8 (uint8 images: divide by 255)"),
    "bool": (lambda x: x > 0.5, "must be floating point in [0, 1], got dtype bool"),
    "0_255": (lambda x: x * 255, "(0-255 values? divide by 255)"),
    "negative": (lambda x: x - 0.5, "images must lie in [0, 1], got values in [-0."),
    "nan": (lambda x: x.at[0, 0, 0, 0].set(jnp.nan), "images contains NaN or infinite values"),
    "inf": (lambda x: x.at[1, 2, 3, 0].set(jnp.inf), "images contains NaN or infinite values"),
    "empty": (lambda x: x[:0], "images is an empty batch"),
    "wrong_size": (lambda x: x[:, :16, :16], "images are 16x16 but this purifier was built "
                                             "for 32x32"),
    "a_list": (lambda x: x.tolist(), "images must be an array [N, H, W, C], got list"),
    "numpy_nan": (lambda x: np.where(np.asarray(x) > 0.9, np.nan, np.asarray(x)),
                  "images contains NaN"),
}


@pytest.mark.parametrize("entry", ["purifier", "srdjax.purify", "defense"])
def test_public_functions_refuse_bad_images(workdir, loaded, entry):
    purifier, defense = loaded
    fn = {"purifier": purifier, "defense": defense,
          "srdjax.purify": lambda x: srdjax.purify(purifier, x)}[entry]
    x = _good_images()
    before = snapshot(workdir)
    for name, (make, expected) in IMAGE_CASES.items():
        with pytest.raises(SrdjaxError) as info:
            fn(make(x))
        assert expected in str(info.value), (name, str(info.value))
        assert "\n" not in str(info.value)
    assert snapshot(workdir) == before


def test_checked_and_unchecked_agree_and_checks_skip_under_jit(loaded):
    """The checks run on concrete images only: under grad (as in an attack) the checked
    function traces through (tests/test_purifier.py does the same for purify under jit), and
    equals the documented unchecked one."""
    purifier, defense = loaded
    x = _good_images(2)
    np.testing.assert_array_equal(purifier(x), purifier.unchecked(x))
    np.testing.assert_array_equal(purifier(x), srdjax.purify_unchecked(purifier, x))
    np.testing.assert_allclose(defense(x), defense.unchecked(x), rtol=1e-6)
    g = jax.grad(lambda im: defense(im)[:, 0].sum())(x)
    assert g.shape == x.shape and bool(jnp.isfinite(g).all())
    # Unchecked, NaN passes through silently: that is why the public functions check.
    assert bool(jnp.isnan(defense.unchecked(x.at[0].set(jnp.nan))).any())


def test_loaders_refuse_bad_workdirs(workdir, tmp_path):
    for path, expected in ((tmp_path / "absent", "is not an srdjax checkpoint directory"),
                           (tmp_path, "is not an srdjax checkpoint directory")):
        with pytest.raises(SrdjaxError, match=expected):
            srdjax.load_purifier(path)
        with pytest.raises(SrdjaxError, match=expected):
            srdjax.load_defense(path)
    before = snapshot(workdir)
    with pytest.raises(SrdjaxError, match="classifier must be one of 'baseline', 'robust', 'purified_at', got 'pgd'"):
        srdjax.load_defense(workdir, classifier="pgd")
    run_dir = _copy(workdir, tmp_path)
    _flip_a_byte(run_dir / "robust" / "final")
    with pytest.raises(SrdjaxError, match="stage 'robust': .* does not match the sha256"):
        srdjax.load_purifier(run_dir)
    with pytest.raises(SrdjaxError, match="stage 'robust': "):
        srdjax.load_defense(run_dir, classifier="baseline")
    (run_dir / "config.json").write_text("[1, 2]")
    with pytest.raises(SrdjaxError, match="is not an srdjax config"):
        srdjax.load_purifier(run_dir)
    assert snapshot(workdir) == before
