"""The stage runner end to end on the smoke config: checkpoints, skipping, kill and resume."""
import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from srdjax import stages
from srdjax.checks import SrdjaxError
from tests.helpers import REPO, smoke_config


def _final_params(workdir, stage="baseline"):
    ctx = stages.Context(smoke_config(workdir))
    _, params, stats = stages.load_classifier(ctx, stage)
    return jax.device_get((params, stats))


@pytest.fixture(scope="module")
def finished(smoke_workdir):
    return smoke_workdir, json.loads((smoke_workdir / "summary.json").read_text())


def test_smoke_run_checkpoints_every_stage_and_a_second_run_skips(finished):
    workdir, summaries = finished
    for stage in ("baseline", "cluster", "dictionaries", "robust", "pgd_at"):
        assert (workdir / stage / "DONE.json").exists(), stage
        assert (workdir / stage / "final").is_dir(), stage
    assert (workdir / "baseline" / "curves.png").exists()
    assert 0.0 <= summaries["baseline"]["test_acc"] <= 1.0
    assert summaries["baseline"]["n_test"] == 100 and summaries["baseline"]["n_train"] == 200
    assert summaries["cluster"]["n_clustered"] == 200
    assert len(summaries["cluster"]["k_per_class"]) == 10
    assert summaries["dictionaries"]["n_dictionaries"] == summaries["cluster"]["n_clusters"]
    assert (workdir / "purify" / "grid.png").exists()
    assert summaries["purify"]["n_test"] == 100
    for key in ("baseline_raw_acc", "baseline_purified_acc", "robust_raw_acc",
                "cluster_of_true_class"):
        assert 0.0 <= summaries["purify"][key] <= 1.0
    mtime = (workdir / "robust" / "DONE.json").stat().st_mtime
    again = stages.run(smoke_config(workdir))
    assert again["baseline"]["test_acc"] == summaries["baseline"]["test_acc"]
    assert (workdir / "robust" / "DONE.json").stat().st_mtime == mtime


@pytest.mark.parametrize("stage,kill_at", [("baseline", 3), ("robust", 2)])
def test_killed_run_resumes_to_the_same_parameters(finished, tmp_path, stage, kill_at):
    """Stages before `stage` are copied from the finished run; `stage` is killed mid-epoch
    (after `kill_at` steps), resumed, and must end where the uninterrupted run ended."""
    import shutil
    order = ("baseline", "cluster", "dictionaries", "robust")
    for before in order[:order.index(stage)]:
        shutil.copytree(finished[0] / before, tmp_path / before)
    config = smoke_config(tmp_path, stages=(stage,))
    stages.run(config, stop_after_steps=kill_at)
    assert not (tmp_path / stage / "DONE.json").exists()
    stages.run(config)
    reference, resumed = _final_params(finished[0], stage), _final_params(tmp_path, stage)
    for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(resumed)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_workdir_from_another_config_is_refused(finished):
    config = smoke_config(finished[0], **{"baseline.lr": 0.05})
    with pytest.raises(SrdjaxError, match="another config .*baseline.lr: 0.2 there, 0.05 now"):
        stages.run(config)


def test_bad_config_values_are_named():
    with pytest.raises(SrdjaxError, match="unknown stage 'bogus'"):
        stages.run(smoke_config("/tmp/unused", stages=("bogus",)))
    with pytest.raises(SrdjaxError, match="config.baseline.batch_size must be >= 1, got 0"):
        stages.run(smoke_config("/tmp/unused", **{"baseline.batch_size": 0}))
    with pytest.raises(SrdjaxError, match=r"config.purify.image_chunk must be >= 0, got -1"):
        stages.run(smoke_config("/tmp/unused", **{"purify.image_chunk": -1}))


def test_missing_stage_is_reported(tmp_path):
    ctx = stages.Context(smoke_config(tmp_path))
    with pytest.raises(SrdjaxError, match="no finished 'baseline' stage"):
        stages.load_classifier(ctx, "baseline")


def test_train_py_reports_user_errors_in_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "train.py", "--config", "configs/smoke.py",
         f"--config.workdir={tmp_path}", "--config.model.name=vgg"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: unknown model 'vgg'; expected one of ['resnet18', 'small_cnn', 'wide_resnet']")
    assert not (tmp_path / "baseline").exists()
