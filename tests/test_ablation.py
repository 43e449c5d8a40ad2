"""The purifier ablation's machinery: disjoint screening and report subsets, purify-time
overrides in the cells' keys, and benchmarks/ablation.py end to end on the smoke run."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from srdjax import evaluation, stats
from srdjax.checks import SrdjaxError
from srdjax.data import class_balanced_subset
from tests.helpers import REPO, smoke_config


def _today(y, per_class, seed):
    """class_balanced_subset as it was before it could exclude images."""
    rng = np.random.default_rng(seed)
    return np.sort(np.concatenate([rng.choice(np.flatnonzero(y == c), per_class, replace=False)
                                   for c in np.unique(y)]))


def _settings(**evaluate):
    c = smoke_config("/unused")
    for k, v in evaluate.items():
        c.evaluate[k] = v
    return evaluation.Settings.from_config(c)


def test_screen_and_report_subsets_are_disjoint_class_balanced_and_report_is_unchanged():
    y = np.random.default_rng(5).integers(0, 10, 3000)
    report = evaluation.evaluated_subset(y, _settings(test_per_class=40))
    np.testing.assert_array_equal(report, _today(y, 40, 0))
    np.testing.assert_array_equal(class_balanced_subset(y, 40, 0), _today(y, 40, 0))
    screen = evaluation.evaluated_subset(y, _settings(test_per_class=30, subset="screen",
                                                      report_per_class=40))
    assert len(np.intersect1d(screen, report)) == 0 and len(np.unique(screen)) == 300
    np.testing.assert_array_equal(np.bincount(y[screen], minlength=10), np.full(10, 30))
    # The screen subset avoids exactly the report subset of report_per_class per class.
    other = evaluation.evaluated_subset(y, _settings(test_per_class=30, subset="screen",
                                                     report_per_class=41))
    assert not np.array_equal(other, screen)
    with pytest.raises(SrdjaxError, match="subset='screen' needs"):
        _settings(test_per_class=0, subset="screen", report_per_class=40)


TINY = {"evaluate.attacks": ("transfer-pgd_at", "fgsm", "selector"), "evaluate.eps_list": (),
        "evaluate.curve_per_class": 0, "evaluate.batch_size": 10}


@pytest.fixture(scope="module")
def workdir(smoke_workdir, tmp_path_factory):
    w = tmp_path_factory.mktemp("ablation") / "w"
    shutil.copytree(smoke_workdir, w)
    return w


def test_purify_overrides_enter_the_cell_keys(workdir):
    """λ given as its trained value reuses every cell of the default run; another sparsity
    reuses none."""
    def run(**purify):
        c = smoke_config(workdir, **TINY, **{"evaluate.defenses": ("srd_robust",),
                                             "evaluate.output": "keys",
                                             "evaluate.test_per_class": 1})
        for k, v in purify.items():
            c.evaluate.purify[k] = v
        return evaluation.evaluate(c)

    first = run()
    assert first["cells"]["run"] > 0 and first["purify"]["lam"] == 5.0
    again = run(lam=5.0)
    assert again["cells"]["run"] == 0 and again["cells"]["resumed"] == first["cells"]["run"]
    other = run(sparsity=2)
    assert other["cells"]["resumed"] == 0 and other["purify"]["sparsity"] == 2


def test_the_ablation_command_makes_the_table_from_per_image_results(workdir, tmp_path):
    import benchmarks.ablation as ablation
    out = tmp_path / "abl"
    rows = "nearest,reconstruction,sparsity_half,robust,pgd_at,clusters_one_per_class"
    overrides = [f"--config.{k}={','.join(v) if isinstance(v, tuple) else v}"
                 for k, v in TINY.items() if k != "evaluate.eps_list"]
    r = ablation.main(["--config", str(REPO / "configs" / "smoke.py"),
                       f"--config.workdir={workdir}", "--config.evaluate.eps_list=()",
                       *overrides, "--screen-per-class", "1", "--report-per-class", "1",
                       "--confirm", "1", "--rows", rows, "--out", str(out)])
    assert {p.name for p in tmp_path.iterdir()} >= {"abl.json", "abl.md", "abl.png"}
    assert json.loads((tmp_path / "abl.json").read_text())["chosen"] == r["chosen"]
    screen = {m["row"]: m for m in r["screen"]["rows"]}
    assert set(screen) == {"nearest", "reconstruction", "sparsity_half", "robust", "pgd_at"}
    assert screen["sparsity_half"]["purify"]["sparsity"] == 2
    assert screen["reconstruction"]["purify"]["choice"] == "reconstruction"
    ref = np.load(f"{screen['pgd_at']['output']}/per_image.npz")
    theirs = ref["pgd_at/broken_by"] == stats.ROBUST
    for m in r["screen"]["rows"] + r["report"]["rows"]:
        per = np.load(f"{m['output']}/per_image.npz")
        broken = per[f"{m['defense']}/broken_by"]
        assert m["worst_case"] == np.mean(broken == -1) and m["clean"] == np.mean(broken != -2)
        if m["defense"] != "pgd_at":
            ref_out = next(x["output"] for x in (r["screen"] if m in r["screen"]["rows"]
                                                 else r["report"])["rows"]
                           if x["row"] == "pgd_at")
            their = np.load(f"{ref_out}/per_image.npz")["pgd_at/broken_by"] == -1
            ours = broken == -1
            v = m["versus_pgd_at"]
            assert (v["b"], v["c"]) == (int(np.sum(ours & ~their)), int(np.sum(~ours & their)))
            assert v["difference"] == pytest.approx((v["b"] - v["c"]) / len(ours))
    # The other purifier rows are paired with the paper's row on the same images, and carry
    # their own evaluation's cluster-choice figures.
    paper = np.load(f"{screen['nearest']['output']}/per_image.npz")["srd_robust/broken_by"] == -1
    for name in ("reconstruction", "sparsity_half"):
        m = screen[name]
        ours = np.load(f"{m['output']}/per_image.npz")["srd_robust/broken_by"] == -1
        v = m["versus_paper"]
        assert (v["b"], v["c"]) == (int(np.sum(ours & ~paper)), int(np.sum(~ours & paper)))
        own = json.loads((Path(m["output"]) / "results.json").read_text())["selector"]
        assert m["true_choice_clean"] == own["clean_true_cluster_rate"]
        assert m["selector_success"] == own["success_rate"]
    assert screen["nearest"]["versus_paper"] is None and screen["robust"]["versus_paper"] is None
    assert screen["robust"]["selector_success"] is None
    assert len(theirs) == 10
    # The screen and report images are disjoint; the chosen row is reported.
    report = {m["row"]: m for m in r["report"]["rows"]}
    assert set(report) == {r["chosen"][0], "robust", "pgd_at"}
    rep_index = np.load(f"{report['pgd_at']['output']}/per_image.npz")["test_index"]
    assert len(np.intersect1d(rep_index, ref["test_index"])) == 0
    # The nearest row is what evaluate() gives srd_robust on the same screen subset.
    direct = evaluation.evaluate(smoke_config(workdir, **TINY, **{
        "evaluate.defenses": ("srd_robust", "pgd_at"), "evaluate.output": "direct",
        "evaluate.subset": "screen", "evaluate.test_per_class": 1,
        "evaluate.report_per_class": 1}))
    assert screen["nearest"]["worst_case"] == direct["worst_case"]["srd_robust"]
    assert screen["nearest"]["clean"] == direct["clean"]["srd_robust"]
    assert screen["pgd_at"]["worst_case"] == direct["worst_case"]["pgd_at"]
    not_run = {m["row"]: m for m in r["not_run"]}
    assert set(not_run) == {"clusters_one_per_class"}
    assert "--config.cluster.k_max=1" in not_run["clusters_one_per_class"]["command"]
    md = (tmp_path / "abl.md").read_text()
    assert "not run: needs training" in md and "| reconstruction |" in md
    # Each variant's own evaluation report says how it purified and on which images.
    own = (Path(screen["reconstruction"]["output"]) / "results.md").read_text()
    assert "cluster choice reconstruction" in own and "the screening subset" in own


@pytest.mark.parametrize("field,value,message", [
    ("purify.choice", "best", "config.evaluate.purify.choice must be one of"),
    ("purify.top", 0, "config.evaluate.purify.top must be in"),
    ("purify.lam", -1.0, "config.evaluate.purify.lam must be >= 0"),
    ("purify.sparsity", -1, "config.evaluate.purify.sparsity must be >= 0"),
    ("subset", "all", "config.evaluate.subset must be one of"),
    ("report_per_class", -1, "config.evaluate.report_per_class must be >= 0"),
])
def test_bad_purify_and_subset_fields_get_one_clear_error(field, value, message):
    from srdjax.config_checks import check_config
    c = smoke_config("/unused")
    section, _, name = ("evaluate." + field).rpartition(".")
    target = c
    for part in section.split("."):
        target = target[part]
    target[name] = value
    with pytest.raises(SrdjaxError, match=message.replace(".", r"\.")):
        check_config(c)


def test_a_config_without_the_new_fields_is_the_paper_s_purify_on_the_report_subset():
    """Workdirs saved before these fields existed keep loading, with today's behaviour."""
    from srdjax.config_checks import check_config
    c = smoke_config("/unused")
    for name in ("purify", "subset", "report_per_class"):
        del c.evaluate[name]
    check_config(c)
    s = evaluation.Settings.from_config(c)
    assert (s.purify, s.subset) == (evaluation.purify_variants.NEAREST, "report")


def test_the_report_states_the_purify_variant_and_the_subset():
    from srdjax import report
    r = {"purify": {"choice": "top_classes", "top": 3, "lam": 2.5, "sparsity": 8},
         "subset": {"name": "screen", "report_per_class": 100}}
    assert report._variant_text(r) == (
        " Purification: cluster choice top_classes (top 3), Tikhonov λ 2.5, OMP sparsity 8."
        " Images: the screening subset, disjoint from the report subset of 100 per class.")
    assert report._variant_text({}) == ""
