"""Evaluation: BPDA gradients, adaptive attacks, the per-image worst case, reports, evaluate.py."""
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import Partial

from srdjax import defenses, evaluation, parallel, report
from srdjax.attacks import whole_defense
from srdjax import purifier as pur
from srdjax.attacks import ce_loss
from srdjax.checks import SrdjaxError
from srdjax.models import create_model, split_model
from tests.helpers import REPO, smoke_config
from tests.test_purifier import _images, _tiny_purifier


def _classifier(num_classes=10, seed=0):
    return whole_defense.Classifier(*split_model(create_model("small_cnn", num_classes, seed,
                                                         widths=(4, 6))))


def _settings(**overrides):
    c = smoke_config("/unused")
    for k, v in overrides.items():
        c.evaluate[k] = v
    return evaluation.Settings.from_config(c)


def _loss_grad(logits_fn, x, y):
    return jax.jit(jax.grad(lambda xx: jnp.sum(ce_loss(logits_fn(xx), y))))(x)


# ------------------------------------------------------------------------------ BPDA


def test_bpda_gradient_of_an_identity_like_transform_equals_the_plain_gradient():
    """16-bit rounding moves no value by more than 1/(2·65535): its BPDA gradient is the
    classifier's own gradient (to that perturbation), while differentiating the rounding itself
    gives exactly zero, the gradient masking BPDA exists to undo."""
    clf, x = _classifier(), _images(n=4, size=8)
    y = jnp.array([0, 3, 5, 9])
    d = evaluation.make_defense("bit_depth", clf, s=_settings(bit_depth=16))
    plain = _loss_grad(clf, x, y)
    np.testing.assert_allclose(_loss_grad(Partial(whole_defense.attack_logits, d), x, y), plain,
                               rtol=1e-3, atol=1e-4 * float(jnp.abs(plain).max()))
    masked = _loss_grad(lambda xx: clf(defenses.bit_depth(xx, bits=16)), x, y)
    assert float(jnp.abs(masked).max()) == 0.0


def test_jpeg_is_straight_through_and_blur_exact():
    """JPEG: the gradient is the classifier's gradient at jpeg(x), passed straight through.
    Blur: the exact gradient Rᵀ G C of the separable blur R X C, with R and C built in numpy."""
    clf, x = _classifier(), _images(n=2, size=16)
    y = jnp.array([1, 2])
    s = _settings(jpeg_quality=50, blur_sigma=1.0)
    jpeg = evaluation.make_defense("jpeg", clf, s=s)
    # Two compiled programs (fused differently): equal to float32 rounding, rtol 1e-5.
    np.testing.assert_allclose(_loss_grad(Partial(whole_defense.attack_logits, jpeg), x, y),
                               _loss_grad(clf, defenses.jpeg(x, quality=50), y),
                               rtol=1e-5, atol=1e-7)
    blur = evaluation.make_defense("blur", clf, s=s)
    g_out = np.asarray(_loss_grad(clf, defenses.gaussian_blur(x, sigma=1.0), y), np.float64)
    rows = defenses._blur_matrix(16, 1.0, 4.0)
    expected = np.einsum("ih,nijc,jw->nhwc", rows, g_out, rows)
    np.testing.assert_allclose(_loss_grad(Partial(whole_defense.attack_logits, blur), x, y),
                               expected, rtol=1e-4, atol=1e-7)


# ------------------------------------------------------------------------------ adaptive


def _purify_defense(seed=0):
    p = _tiny_purifier(seed=seed)
    return p, whole_defense.Defense("srd", "purify", None, _classifier(2, seed), p)


def test_selector_margin_matches_numpy_and_the_attack_raises_it():
    p, x = _tiny_purifier(), _images(n=6)
    y = jnp.array([0, 1, 0, 1, 0, 1])
    z = np.asarray(p.latent(x), np.float64)
    d = ((((z[:, None] - np.asarray(p.clusters.means)[None]) / np.asarray(p.clusters.stds))
          ** 2).sum(-1) / z.shape[1])
    own = np.asarray(p.clusters.class_ids)[None] == np.asarray(y)[:, None]
    expected = np.where(own, d, np.inf).min(1) - np.where(own, np.inf, d).min(1)
    before = whole_defense.selector_margin(p, y, x)
    np.testing.assert_allclose(before, expected, rtol=1e-4, atol=1e-5)
    # Positive margin <=> purify picks a wrong class's cluster.
    np.testing.assert_array_equal(whole_defense.selector_success(p, x, y), expected > 0)
    x_adv = whole_defense.selector_attack(p, x, y, eps=0.1, key=jax.random.key(0), steps=10)
    assert float(jnp.abs(x_adv - x).max()) <= 0.1 + 1e-6
    assert np.all(np.asarray(whole_defense.selector_margin(p, y, x_adv)) > np.asarray(before))


def test_surrogate_value_is_the_real_defense_and_its_gradient_the_soft_one():
    p, d = _purify_defense()
    x, y = _images(n=3), jnp.array([0, 1, 1])
    grad = lambda fn, u: jax.grad(lambda v: jnp.sum(ce_loss(fn(v), y)))(u)  # noqa: E731

    @jax.jit      # one program: every purify inside shares one compilation
    def outputs(u):
        forced = []
        for k in range(2):          # purify forced to cluster k, before the clip
            k = jnp.full((3,), k, jnp.int32)
            patches = pur.dict_lib._extract(pur._split(p, u)[1], 4, 2)
            forced.append(pur._linear_given_choices(p, u, k, pur._supports(p, k, patches)[0]))
        return {"real": whole_defense.defense_logits(d, u),
                "surrogate": whole_defense.surrogate_logits(p, d.classifier, u, top=2,
                                                            temperature=1.0),
                "grad_top1": grad(Partial(whole_defense._surrogate(1, 1.0), p, d.classifier), u),
                "grad_bpda": grad(Partial(whole_defense.attack_logits, d), u),
                "soft": whole_defense.soft_purify(p, u, top=2, temperature=0.5), "forced": forced}

    out = outputs(x)
    np.testing.assert_array_equal(out["surrogate"], out["real"])
    # top = 1: the soft weight is 1, so the gradient is purify_bpda's (checked against the
    # hand-computed Jacobian in test_purifier).
    np.testing.assert_allclose(out["grad_top1"], out["grad_bpda"], rtol=1e-4, atol=1e-6)
    # top = 2: both clusters' rebuilt images mixed by softmax(-d / T), weights from numpy.
    z = np.asarray(p.latent(x), np.float64)
    dist = ((z[:, None] - np.asarray(p.clusters.means)[None]) ** 2).sum(-1) / z.shape[1]
    w = np.exp(-dist / 0.5)
    w /= w.sum(1, keepdims=True)
    mixed = sum(w[:, k, None, None, None] * np.asarray(out["forced"][k]) for k in range(2))
    np.testing.assert_allclose(out["soft"], np.clip(mixed, 0, 1), atol=1e-5)


def test_eot_averages_random_draws_and_is_exact_when_nothing_is_random():
    w = jax.random.normal(jax.random.key(0), (8 * 8 * 3, 4))
    f = lambda x: x.reshape(x.shape[0], -1) @ w  # noqa: E731
    x = _images(n=2)
    noisy = whole_defense.eot_logits(lambda xx, k: f(xx) + jax.random.normal(k, (2, 4)), 4000,
                                jax.random.key(1))
    # Mean of 4000 unit normals: standard error 1/63; 5 standard errors.
    np.testing.assert_allclose(noisy(x), f(x), atol=5 / np.sqrt(4000))
    np.testing.assert_array_equal(noisy(x), noisy(x))    # pure: the same x, the same draws
    assert float(jnp.abs(noisy(x) - noisy(x + 1e-3)).max()) > 0  # a new iterate, new draws
    np.testing.assert_allclose(jax.grad(lambda xx: noisy(xx).sum())(x),
                               jax.grad(lambda xx: f(xx).sum())(x), rtol=1e-5, atol=1e-6)
    exact = whole_defense.eot_logits(lambda xx, k: f(xx), 3, jax.random.key(1))
    np.testing.assert_allclose(exact(x), f(x), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------ the matrix


def test_worst_case_is_the_per_image_minimum_over_attacks():
    rng = np.random.default_rng(0)
    clean = rng.random(50) < 0.8
    adv = {a: rng.random(50) < 0.5 for a in ("fgsm", "pgd20", "square")}
    expected = np.array([clean[i] and all(v[i] for v in adv.values()) for i in range(50)])
    np.testing.assert_array_equal(report.worst_case(clean, adv), expected)
    assert report.worst_case(clean, adv).mean() <= min(v.mean() for v in adv.values())


def _kept(n, idx):
    v = np.zeros(n, bool)
    v[list(idx)] = True
    return v


@pytest.mark.parametrize("ours, theirs, expected", [
    (range(0, 44), range(30, 68), "does not beat PGD-AT beyond chance"),  # 22.0 vs 19.0 of 200
    (range(0, 44), range(6, 44), "beats PGD-AT"),  # the same, but every disagreement for ours
    (range(0, 120), range(80, 120), "beats PGD-AT"),
    (range(0, 30), range(0, 50), "does not beat PGD-AT under the worst case: its best"),
])
def test_verdict_beats_pgd_at_only_when_the_paired_interval_is_above_zero(ours, theirs, expected):
    import scipy.stats
    n = 200
    per_image = {"pgd_at": _kept(n, theirs), "srd_robust": _kept(n, ours),
                 "srd_baseline": _kept(n, range(0, 10))}
    worst = {k: v.mean() for k, v in per_image.items()}
    text, c = report._verdict(list(per_image), worst, per_image)
    assert expected in text and c["defense"] == "srd_robust" and c["n"] == n
    # reference: the mean of the per-image differences and scipy's standard error of it
    diff = per_image["srd_robust"].astype(float) - per_image["pgd_at"]
    half = scipy.stats.norm.ppf(0.975) * scipy.stats.sem(diff, ddof=0)
    np.testing.assert_allclose([c["difference"], c["low"], c["high"]],
                               [diff.mean(), diff.mean() - half, diff.mean() + half], atol=1e-4)
    assert (c["only_ours"], c["only_theirs"]) == (np.sum(diff > 0), np.sum(diff < 0))
    assert f"{100 * worst['srd_robust']:.1f}% " in text + " "


@pytest.mark.parametrize("ours, theirs", [(np.ones(5, bool), np.ones(4, bool)),
                                          (np.ones(5, bool), np.ones(5)),
                                          (np.ones((2, 3), bool), np.ones((2, 3), bool)),
                                          (np.ones(0, bool), np.ones(0, bool))])
def test_paired_difference_refuses_unpaired_input(ours, theirs):
    with pytest.raises(SrdjaxError, match="two non-empty 1-d boolean arrays of the same length"):
        report.paired_difference(ours, theirs)


def test_eps_zero_attacks_give_the_clean_prediction_for_every_image():
    """Every attack at ε = 0 returns x itself, through the sharded matrix (2 devices, a padded
    last batch of 3 real rows in 4), against a BPDA defense and (transfer) the bare model."""
    s = _settings(batch_size=4, attacks=("fgsm", "pgd20", "apgd-dlr", "square", "transfer"))
    clf = _classifier()
    built = {"bit_depth": evaluation.make_defense("bit_depth", clf, s=s)}
    x = np.asarray(_images(n=7, size=8))
    y = np.asarray([0, 1, 2, 3, 4, 5, 6], np.int32)
    mesh = parallel.make_mesh(jax.devices()[:2])
    clean = {n: evaluation.predict_correct(d, x, y, s, mesh) for n, d in built.items()}
    run = evaluation.attack_matrix(built, s.attacks, x, y, eps=0.0, s=s, mesh=mesh,
                                   source=evaluation.make_defense("none", clf))
    for n in built:
        for a in s.attacks:
            np.testing.assert_array_equal(run["correct"][n][a], clean[n], err_msg=f"{n} {a}")
    assert set(run["seconds"]["bit_depth"]) == set(s.attacks)


def test_selector_success_through_the_matrix_is_the_per_image_clean_success_at_eps_zero():
    """At ε = 0 the selector attack returns x, so the matrix's selector success (2 devices, a
    padded last batch) is purify's clean cluster choice per image, wrong class or not."""
    p, d = _purify_defense()
    s = _settings(batch_size=4, attacks=("selector",))
    x = np.asarray(_images(n=7))
    y = np.asarray([0, 1, 1, 0, 1, 0, 0], np.int32)
    mesh = parallel.make_mesh(jax.devices()[:2])
    run = evaluation.attack_matrix({"srd": d}, s.attacks, x, y, eps=0.0, s=s, mesh=mesh)
    expected = np.asarray(whole_defense.selector_success(p, jnp.asarray(x), jnp.asarray(y)))
    assert 0 < expected.sum() < len(y)                       # both outcomes occur
    np.testing.assert_array_equal(run["selector_wrong"], expected)
    np.testing.assert_array_equal(run["correct"]["srd"]["selector"],
                                  evaluation.predict_correct(d, x, y, s, mesh))


# ------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def evaluated(smoke_workdir, tmp_path_factory):
    """The smoke run evaluated with 20 images, 3 defenses, 2 short attacks."""
    workdir = tmp_path_factory.mktemp("eval") / "w"
    shutil.copytree(smoke_workdir, workdir)
    config = smoke_config(workdir, **{"evaluate.defenses": ("none", "jpeg", "srd_baseline"),
                                      "evaluate.attacks": ("fgsm", "pgd20")})
    return workdir, evaluation.evaluate(config)


def test_evaluate_writes_the_three_reports(evaluated):
    workdir, result = evaluated
    out = workdir / "evaluation"
    assert {"results.json", "results.md", "robust_vs_eps.png", "per_image.npz"} <= {
        p.name for p in out.iterdir()}
    assert (out / "robust_vs_eps.png").stat().st_size > 5000
    saved = json.loads((out / "results.json").read_text())
    assert saved["n"] == 20 and saved["defenses"] == ["none", "jpeg", "srd_baseline"]
    assert saved["eps"] == pytest.approx(8 / 255) and saved["curve"]["eps"][0] == 0.0
    assert saved["sanity"]["eps0_equals_clean"]["passed"]
    assert set(saved["sanity"]["unbounded"]["robust"]) == set(saved["defenses"])
    assert saved["seconds"]["srd_baseline"]["pgd20"] > 0
    md = (out / "results.md").read_text()
    assert "Sanity checks" in md and "deterministic" in md and "run time" in md


def test_json_and_markdown_agree(evaluated):
    workdir, _ = evaluated
    saved = json.loads((workdir / "evaluation" / "results.json").read_text())
    table = report.parse_markdown_table((workdir / "evaluation" / "results.md").read_text())
    assert list(table) == saved["defenses"]
    for n in saved["defenses"]:
        expected = {"clean": saved["clean"][n], "worst case": saved["worst_case"][n],
                    **saved["robust"][n]}
        assert set(table[n]) == set(expected)
        for column, value in expected.items():
            assert table[n][column] == pytest.approx(100 * value, abs=0.05), (n, column)


def test_reported_accuracies_are_the_per_image_results(evaluated):
    workdir, result = evaluated
    with np.load(workdir / "evaluation" / "per_image.npz") as f:
        per = {k: f[k] for k in f.files}
    assert per["y"].shape == (20,) and np.bincount(per["y"]).tolist() == [2] * 10
    for n in result["defenses"]:
        clean = per[f"{n}/clean"]
        adv = [per[f"{n}/{a}"] for a in result["attacks"]]
        assert result["clean"][n] == pytest.approx(clean.mean())
        for a, v in zip(result["attacks"], adv):
            assert result["robust"][n][a] == pytest.approx((clean & v).mean())
        worst = np.logical_and.reduce([clean] + adv)
        np.testing.assert_array_equal(per[f"{n}/worst_case"], worst)
        assert result["worst_case"][n] == pytest.approx(worst.mean())


def test_saved_cells_table_is_the_run_per_image_results_at_its_eps(evaluated):
    """`evaluate.py --saved` reads the fixture's cells: at ε = 8/255 they are the per-image
    results of the report (the ε = 0 curve and unbounded cells are left out), and the lowest
    result so far is the per-image minimum over the attacks."""
    workdir, result = evaluated
    with np.load(workdir / "evaluation" / "per_image.npz") as f:
        per = {k: f[k] for k in f.files}
    cells, older = report.saved_cells(workdir / "evaluation" / "cells")
    assert older == 0
    assert sorted({c["eps"] for c in cells}) == pytest.approx([0.0, 8 / 255, 1.0], rel=1e-5)
    main = {(c["defense"], c["attack"]): c for c in cells if c["eps"] > 0.03 and c["eps"] < 0.04}
    assert set(main) == {(n, a) for n in result["defenses"] for a in result["attacks"]}
    for (n, a), c in main.items():
        np.testing.assert_array_equal(c["correct"], per[f"{n}/{a}"])
    out = subprocess.run([sys.executable, str(REPO / "evaluate.py"), "--config",
                          str(REPO / "configs" / "smoke.py"), f"--config.workdir={workdir}",
                          "--saved"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rows = {line.split("|")[1].strip(): [v.strip() for v in line.split("|")[2:-1]]
            for line in out.stdout.splitlines() if line.startswith("| ") and "---" not in line}
    assert rows["defense"] == result["attacks"] + ["lowest so far", "cells"]
    for n in result["defenses"]:
        lowest = np.logical_and.reduce([per[f"{n}/{a}"] for a in result["attacks"]]).mean()
        assert rows[n] == [f"{100 * per[f'{n}/{a}'].mean():.1f}" for a in result["attacks"]] + [
            f"{100 * lowest:.1f}", str(len(result["attacks"]))]


def test_saved_cells_keep_the_newest_of_a_cell_and_skip_what_is_not_a_cell(tmp_path):
    cache = evaluation.CellCache(tmp_path, {})
    rng = np.random.default_rng(0)
    first, second, other = (rng.random(10) < 0.5 for _ in range(3))
    cache.save("a", first, 1.0, "jpeg under pgd20 at eps 0.0313725, 10 images")
    cache.save("b", other, 2.0, "jpeg under fgsm at eps 0.0313725, 10 images")
    cache.save("c", second, 3.0, "jpeg under pgd20 at eps 0.0313725, 10 images")
    for name, t in (("a", 0), ("b", 5), ("c", 10)):  # a and c: the same cell; c is newer
        os.utime(tmp_path / f"{name}.npz", (1e9 + t, 1e9 + t))
    cache.save("s", first, 0.0, "selector success at eps 0.0313725")
    (tmp_path / "broken.npz").write_bytes(b"not an npz")
    cells, older = report.saved_cells(tmp_path)
    assert sorted((c["attack"], c["file"]) for c in cells) == [("fgsm", "b.npz"),
                                                                ("pgd20", "c.npz")]
    assert older == 1
    text = report.saved_cells_markdown(tmp_path)
    row = next(line for line in text.splitlines() if line.startswith("| jpeg"))
    lowest = (second & other).mean()
    assert text.splitlines()[2] == "| defense | pgd20 | fgsm | lowest so far | cells |"
    assert row == (f"| jpeg | {100 * second.mean():.1f} | {100 * other.mean():.1f} | "
                   f"{100 * lowest:.1f} | 2 |")
    assert text.endswith("1 older file(s) of the same cells passed over.")
    with pytest.raises(SrdjaxError, match="no saved evaluation cells"):
        report.saved_cells_markdown(tmp_path / "none")
    with pytest.raises(SrdjaxError, match="no saved cells at eps 0.5"):
        report.saved_cells_markdown(tmp_path, eps=0.5)


def test_a_stopped_evaluation_resumes_from_its_saved_cells(evaluated):
    """The cells saved by the fixture's run are reused by the same command (same per-image
    results, nothing re-attacked); a deleted or corrupt cell file is attacked again; a changed
    defense option re-attacks only that defense; resume=False re-attacks everything."""
    workdir, first = evaluated
    cells = sorted((workdir / "evaluation" / "cells").glob("*.npz"))
    # 3 defenses × (2 attacks at ε = 8/255, pgd20 at ε = 0 for the curve, the unbounded check).
    assert len(cells) == 3 * 4 and first["cells"] == {
        "run": 12, "resumed": 0, "attack_seconds": pytest.approx(sum(
            v or 0.0 for per in first["seconds"].values() for v in per.values()), abs=0.2)}
    out = workdir / "evaluation_resumed"
    shutil.copytree(workdir / "evaluation" / "cells", out / "cells")
    overrides = {"evaluate.defenses": ("none", "jpeg", "srd_baseline"),
                 "evaluate.attacks": ("fgsm", "pgd20"), "evaluate.output": out.name}

    def per_image(name):
        with np.load(workdir / name / "per_image.npz", allow_pickle=False) as f:
            return {k: f[k] for k in f.files}

    resumed = evaluation.evaluate(smoke_config(workdir, **overrides))
    assert resumed["cells"]["run"] == 0 and resumed["cells"]["resumed"] == 12
    assert resumed["seconds"] == first["seconds"]
    assert "12 of 12 attack cells resumed" in (out / "results.md").read_text()
    want = per_image("evaluation")
    for key, value in per_image(out.name).items():
        np.testing.assert_array_equal(value, want[key], err_msg=key)

    saved = sorted((out / "cells").glob("*.npz"))
    saved[0].unlink()
    saved[1].write_bytes(b"not an npz file")
    again = evaluation.evaluate(smoke_config(workdir, **overrides))
    assert again["cells"]["run"] == 2 and again["cells"]["resumed"] == 10
    for key, value in per_image(out.name).items():
        np.testing.assert_array_equal(value, want[key], err_msg=key)

    changed = evaluation.evaluate(smoke_config(workdir, **overrides,
                                               **{"evaluate.jpeg_quality": 40}))
    assert changed["cells"]["run"] == 4 and changed["cells"]["resumed"] == 8    # jpeg's 4
    fresh = evaluation.evaluate(smoke_config(workdir, **overrides,
                                             **{"evaluate.resume": False}))
    assert fresh["cells"]["run"] == 12 and fresh["cells"]["resumed"] == 0


# ------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("field,value,message", [
    ("defenses", ("none", "jpg"), "unknown defense 'jpg'.*known defenses: none, jpeg"),
    ("attacks", ("pgd20", "cw"), "unknown attack 'cw'.*known attacks: fgsm, pgd20"),
    ("eps", 8.0, r"evaluate.eps must lie in \[0, 1\].*got 8.0"),
    ("eps_list", (0.0, -0.1), r"evaluate.eps_list must lie in \[0, 1\]"),
])
def test_bad_settings_get_one_clear_error(field, value, message):
    with pytest.raises(SrdjaxError, match=message):
        _settings(**{field: value})


def test_a_checkpoint_missing_a_stage_names_it_and_the_defense(smoke_workdir, tmp_path):
    shutil.copytree(smoke_workdir, tmp_path / "w", ignore=shutil.ignore_patterns("evaluation"))
    shutil.rmtree(tmp_path / "w" / "dictionaries")
    config = smoke_config(tmp_path / "w", **{"evaluate.defenses": ("none", "srd_robust")})
    with pytest.raises(SrdjaxError, match="no finished stage 'dictionaries' "
                                          r"\(needed by defense srd_robust\)"):
        evaluation.evaluate(config)


def test_evaluate_py_reports_bad_input_on_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "evaluate.py", "--config", "configs/smoke.py",
         f"--config.workdir={tmp_path}", "--config.evaluate.eps=-0.5"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: evaluate.eps must lie in [0, 1]"), proc.stderr


def test_evaluate_py_on_two_processes_gives_the_one_process_results(evaluated, tmp_path):
    """evaluate.py under jax.distributed (two processes, one CPU device each) attacks every
    image as the one-process run on two devices does, and process 0 alone writes the reports."""
    from tests.test_multihost import _env, _free_port
    workdir, _ = evaluated
    port = _free_port()
    args = [sys.executable, "evaluate.py", "--config", "configs/smoke.py",
            f"--config.workdir={workdir}", "--config.evaluate.output=evaluation_2proc",
            "--config.evaluate.defenses=('srd_baseline',)", "--config.evaluate.curve_per_class=1",
            "--config.evaluate.attacks=('fgsm','pgd20')",
            f"--config.distributed.coordinator=127.0.0.1:{port}",
            "--config.distributed.num_processes=2"]
    procs = [subprocess.Popen(args + [f"--config.distributed.process_id={i}"], cwd=REPO,
                              env=_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert "worst case" in outs[0][0] and "worst case" not in outs[1][0]
    one = np.load(workdir / "evaluation" / "per_image.npz", allow_pickle=False)
    two = np.load(workdir / "evaluation_2proc" / "per_image.npz", allow_pickle=False)
    assert set(two.files) < set(one.files) and len(two.files) == 2 + 4  # index, y, 4 results
    for key in two.files:
        np.testing.assert_array_equal(one[key], two[key], err_msg=key)
