"""Evaluation: BPDA gradients, adaptive attacks, the cascade and its resuming, the verdict, reports,
evaluate.py."""
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

from srdjax import cascade, defenses, evaluation, parallel, report, stats
from srdjax import purifier as pur
import srdjax.patches
from srdjax.attacks import whole_defense
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
            patches = srdjax.patches._extract(pur._split(p, u)[1], 4, 2)
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


# ------------------------------------------------------------------------------ the cascade


def _mesh():
    return parallel.make_mesh(jax.devices()[:2])


def _full_matrix(d, names, x, y, clean, s, mesh, source=None):
    """Every attack on every clean-correct image (no cascade): per attack, correct after it."""
    rows = np.flatnonzero(clean)
    out = {}
    for a in names:
        target = source if a in cascade.TRANSFER_SOURCES else d
        adv = cascade.attack_rows(a, target, x, y, rows, eps=s.eps, s=s, mesh=mesh)
        correct = np.zeros(len(y), bool)
        correct[rows] = cascade.predict(d, adv, np.arange(len(rows)), s.batch_size, mesh) == y[rows]
        out[a] = correct
    return out


def test_the_cascade_gives_the_worst_case_of_every_attack_on_every_image():
    """A tiny classifier behind bit-depth reduction (BPDA), 14 images, a cascade of a transfer
    attack, FGSM, PGD, APGD-CE and Square: per image, the first attack that breaks it in the
    cascade is the first in order that breaks it when every attack runs on every image (the
    attacks' draws are keyed per image, so batch composition does not matter), and the images
    none breaks are the same. Some images are broken early and skipped by later attacks, and
    later attacks break images earlier ones missed, so the test does test the skipping."""
    names = ("transfer-baseline", "fgsm", "pgd20", "apgd-ce", "square")
    s = _settings(batch_size=4, attacks=names, eps=2 / 255, pgd20_steps=5, apgd_steps=5,
                  square_queries=20, transfer_steps=3)
    clf, mesh = _classifier(seed=3), _mesh()
    d = evaluation.make_defense("bit_depth", clf, s=s)
    source = evaluation.make_defense("none", _classifier(seed=4))
    x = np.asarray(_images(n=14, size=8, seed=5))
    y = np.asarray(cascade.predict(d, x, np.arange(14), 4, mesh), np.int32)
    y[[2, 9]] = (y[[2, 9]] + 1) % 10                       # two clean errors
    clean = y == cascade.predict(d, x, np.arange(14), 4, mesh)
    shared = cascade.SharedImages(x, y, s, mesh, {"baseline": source})
    broken_by, seconds = cascade.run(d, names, x, y, clean, eps=s.eps, s=s, mesh=mesh,
                                     cache=None, cell_parts={}, stages_used=(), shared=shared)
    full = _full_matrix(d, names, x, y, clean, s, mesh, source)
    expected = np.where(clean, stats.ROBUST, stats.CLEAN_ERROR)
    for j, a in reversed(list(enumerate(names))):
        expected[clean & ~full[a]] = j
    np.testing.assert_array_equal(broken_by, expected)
    assert set(seconds) == set(names)
    first = np.sum(clean & ~full[names[0]])
    assert 0 < first < clean.sum() and len(set(broken_by[broken_by >= 0])) >= 2
    assert np.sum(broken_by == stats.ROBUST) < np.sum(clean & full[names[0]])


def test_eps_zero_breaks_no_image_in_the_cascade():
    """Every attack at ε = 0 returns x itself, through the sharded cascade (2 devices, padded
    batches), against a BPDA defense and (transfer) the bare model: nothing is broken."""
    names = ("fgsm", "pgd20", "apgd-dlr", "square", "transfer-baseline")
    s = _settings(batch_size=4, attacks=names, eps=0.0)
    clf, mesh = _classifier(), _mesh()
    d = evaluation.make_defense("bit_depth", clf, s=s)
    x = np.asarray(_images(n=7, size=8))
    y = np.asarray([0, 1, 2, 3, 4, 5, 6], np.int32)
    clean = evaluation.predict_correct(d, x, y, s, mesh)
    shared = cascade.SharedImages(x, y, s, mesh, {"baseline": evaluation.make_defense("none", clf)})
    broken_by, seconds = cascade.run(d, names, x, y, clean, eps=0.0, s=s, mesh=mesh, cache=None,
                                     cell_parts={}, stages_used=(), shared=shared)
    np.testing.assert_array_equal(broken_by, np.where(clean, -1, -2))
    assert clean.any() and set(seconds) == set(names)


def test_selector_success_at_eps_zero_is_the_per_image_clean_choice(tmp_path):
    """At ε = 0 the selector attack returns x, so the selector success (2 devices, a padded
    last batch) is purify's clean cluster choice per image, wrong class or not."""
    p, d = _purify_defense()
    s = _settings(batch_size=4, attacks=("selector",), eps=0.0)
    x = np.asarray(_images(n=7))
    y = np.asarray([0, 1, 1, 0, 1, 0, 0], np.int32)
    mesh = _mesh()
    shared = cascade.SharedImages(x, y, s, mesh, {}, d)
    np.testing.assert_array_equal(shared.images("selector", 0.0), x)
    cache = cascade.CellCache(tmp_path, {st: "x" for st in evaluation.PURIFY_STAGES}, "code")
    out = evaluation._selector_outcome(d, shared, x, y, s, mesh, cache)
    expected = np.asarray(whole_defense.selector_success(p, jnp.asarray(x), jnp.asarray(y)))
    assert 0 < expected.sum() < len(y)                       # both outcomes occur
    np.testing.assert_array_equal(out["wrong"], expected)
    np.testing.assert_array_equal(out["true_cluster"], ~expected)


# ------------------------------------------------------------------------------ the verdict


def _kept(n, idx):
    v = np.zeros(n, bool)
    v[list(idx)] = True
    return v


@pytest.mark.parametrize("ours, theirs, expected", [
    (range(0, 44), range(30, 68), "srd_robust does not beat PGD-AT"),   # 22.0 vs 19.0 of 200
    (range(0, 44), range(6, 44), "srd_robust beats PGD-AT"),   # every disagreement for ours
    (range(0, 120), range(80, 120), "srd_robust beats PGD-AT"),
    (range(0, 30), range(0, 50), "PGD-AT beats srd_robust"),
    (range(0, 30), range(0, 34), "srd_robust does not beat PGD-AT"),
])
def test_the_verdict_compares_the_named_defense_by_mcnemar(ours, theirs, expected):
    """The verdict is about `compare` (srd_robust) even where srd_baseline keeps more images;
    its p-value is scipy's exact binomial test on the discordant images, its interval the
    Clopper–Pearson interval of b / (b + c) mapped to the difference."""
    import scipy.stats
    n = 200
    robust = {"pgd_at": _kept(n, theirs), "srd_robust": _kept(n, ours),
              "srd_baseline": _kept(n, range(0, 150))}
    text, c = report.verdict_against_pgd_at("srd_robust", robust)
    assert text.startswith(expected) and c["defense"] == "srd_robust" and c["n"] == n
    diff = robust["srd_robust"].astype(int) - robust["pgd_at"]
    b, cc = int(np.sum(diff > 0)), int(np.sum(diff < 0))
    assert (c["b"], c["c"]) == (b, cc)
    ref = scipy.stats.binomtest(b, b + cc, 0.5)
    assert c["p_value"] == pytest.approx(ref.pvalue, rel=1e-9)
    ci = ref.proportion_ci(method="exact")
    np.testing.assert_allclose([c["difference"], c["low"], c["high"]],
                               [diff.mean(), (b + cc) / n * (2 * ci.low - 1),
                                (b + cc) / n * (2 * ci.high - 1)], atol=1e-9)
    assert f"{100 * robust['srd_robust'].mean():.1f}%" in text
    assert "srd_baseline" not in text


def test_the_verdict_without_the_named_defense_says_so():
    text, c = report.verdict_against_pgd_at("srd_robust", {"pgd_at": np.ones(3, bool)})
    assert c is None and text.startswith("srd_robust not among this run's defenses")


# ------------------------------------------------------------------------------ end to end

DEFENSES3 = ("none", "pgd_at", "srd_baseline")
ATTACKS3 = ("transfer-robust", "fgsm", "pgd20", "selector")


def _overrides(**more):
    return {"evaluate.defenses": DEFENSES3, "evaluate.attacks": ATTACKS3,
            "evaluate.compare": "srd_baseline", **more}


@pytest.fixture(scope="module")
def evaluated(smoke_workdir, tmp_path_factory):
    """The smoke run evaluated with 20 images, 3 defenses, a cascade of 4 short attacks."""
    workdir = tmp_path_factory.mktemp("eval") / "w"
    shutil.copytree(smoke_workdir, workdir)
    return workdir, evaluation.evaluate(smoke_config(workdir, **_overrides()))


def _per_image(workdir, name="evaluation"):
    with np.load(workdir / name / "per_image.npz", allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def test_evaluate_writes_the_reports(evaluated):
    workdir, result = evaluated
    out = workdir / "evaluation"
    assert {"results.json", "results.md", "robust_vs_eps.png", "per_image.npz"} <= {
        p.name for p in out.iterdir()}
    assert (out / "robust_vs_eps.png").stat().st_size > 5000
    saved = json.loads((out / "results.json").read_text())
    assert saved["n"] == 20 and saved["defenses"] == list(DEFENSES3)
    assert saved["attacks"] == list(ATTACKS3) and saved["compare"] == "srd_baseline"
    assert saved["eps"] == pytest.approx(8 / 255) and saved["curve"]["eps"][0] == 0.0
    assert saved["sanity"]["eps0_equals_clean"]["passed"]
    assert set(saved["sanity"]["unbounded"]["robust"]) == set(saved["defenses"])
    assert saved["robust_after"]["none"]["selector"] is None
    assert saved["versus_pgd_at"]["defense"] == "srd_baseline"
    assert saved["verdict"].startswith("srd_baseline ") or saved["verdict"].startswith("PGD-AT")
    md = (out / "results.md").read_text()
    assert "Sanity checks" in md and "deterministic" in md and "McNemar" in md


def test_json_and_markdown_agree(evaluated):
    workdir, _ = evaluated
    saved = json.loads((workdir / "evaluation" / "results.json").read_text())
    table = report.parse_markdown_table((workdir / "evaluation" / "results.md").read_text())
    assert list(table) == saved["defenses"]
    for n in saved["defenses"]:
        expected = {"clean": saved["clean"][n], "worst case": saved["worst_case"][n],
                    **saved["robust_after"][n]}
        for column, value in expected.items():
            assert table[n][column] == (None if value is None else
                                        pytest.approx(100 * value, abs=0.05)), (n, column)
        lo, hi = saved["worst_case_interval"][n]
        assert table[n]["95% interval"] == f"{100 * lo:.1f}–{100 * hi:.1f}"


def test_reported_figures_are_computed_from_the_per_image_results(evaluated):
    """Every accuracy, count, interval and the McNemar test of the report follow from the
    per-image broken_by arrays (references: numpy, scipy.stats.binomtest)."""
    import scipy.stats
    workdir, result = evaluated
    per = _per_image(workdir)
    assert per["y"].shape == (20,) and np.bincount(per["y"]).tolist() == [2] * 10
    for n in result["defenses"]:
        b = per[f"{n}/broken_by"]
        assert result["clean"][n] == pytest.approx(np.mean(b != -2))
        assert result["worst_case"][n] == pytest.approx(np.mean(b == -1))
        ci = scipy.stats.binomtest(int(np.sum(b == -1)), 20).proportion_ci(method="exact")
        np.testing.assert_allclose(result["worst_case_interval"][n], [ci.low, ci.high],
                                   atol=1e-9)
        for j, a in enumerate(result["attacks"]):
            if result["robust_after"][n][a] is not None:
                assert result["robust_after"][n][a] == pytest.approx(
                    np.mean((b == -1) | (b > j)))
                assert result["broken_by"][n][a] == np.sum(b == j)
    ours, theirs = per["srd_baseline/broken_by"] == -1, per["pgd_at/broken_by"] == -1
    bb, cc = int(np.sum(ours & ~theirs)), int(np.sum(~ours & theirs))
    v = result["versus_pgd_at"]
    assert (v["b"], v["c"]) == (bb, cc)
    assert v["p_value"] == pytest.approx(
        1.0 if bb + cc == 0 else scipy.stats.binomtest(bb, bb + cc, 0.5).pvalue, rel=1e-9)


def test_saved_cells_table_is_the_run_per_image_results_at_its_eps(evaluated):
    """`evaluate.py --saved` reads the fixture's cells: at ε = 8/255, per defense and attack,
    the images still correct after it and every earlier one, as in the report."""
    workdir, result = evaluated
    per = _per_image(workdir)
    cells, older = report.saved_cells(workdir / "evaluation" / "cells")
    assert older == 0
    main = {(c["defense"], c["attack"]): c for c in cells
            if 0.03 < c["eps"] < 0.04 and c["part"] == "cascade"}
    assert {c["part"] for c in cells} == {"cascade", "curve"}
    assert set(main) == {(n, a) for n in result["defenses"] for a in result["worst_case_over"][n]
                         if (per[f"{n}/broken_by"] == -1).any()
                         or (per[f"{n}/broken_by"] >= result["attacks"].index(a)).any()}
    for (n, a), c in main.items():
        b = per[f"{n}/broken_by"]
        j = result["attacks"].index(a)
        np.testing.assert_array_equal(c["rows"], np.flatnonzero((b == -1) | (b >= j)))
        np.testing.assert_array_equal(c["correct"], (b[c["rows"]] == -1) | (b[c["rows"]] > j))
    out = subprocess.run([sys.executable, str(REPO / "evaluate.py"), "--config",
                          str(REPO / "configs" / "smoke.py"), f"--config.workdir={workdir}",
                          f"--config.evaluate.attacks={ATTACKS3!r}", "--saved"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rows = {line.split("|")[1].strip(): [v.strip() for v in line.split("|")[2:-1]]
            for line in out.stdout.splitlines() if line.startswith("| ") and "---" not in line}
    assert rows["defense"][-2:] == ["robust so far", "cells"]
    for n in result["defenses"]:
        assert rows[n][-2] == f"{100 * result['worst_case'][n]:.1f}", (n, rows[n])


def test_a_killed_evaluation_resumes_to_the_same_result(evaluated):
    """A run stopped after k computed cells (as a kill would stop it), then the same command:
    the cells saved before the stop are reused, the rest computed, and the per-image result is
    the uninterrupted run's. A deleted or corrupt cell runs again; a changed defense option
    re-attacks only that defense; resume=False re-attacks everything."""
    workdir, first = evaluated
    total = first["cells"]["run"]
    assert first["cells"]["resumed"] == 0 and total >= 10
    out = "evaluation_killed"
    with pytest.raises(cascade.CascadeStopped):
        evaluation.evaluate(smoke_config(workdir, **_overrides(**{"evaluate.output": out})),
                            stop_after=4)
    assert len(list((workdir / out / "cells").glob("*.npz"))) == 4
    resumed = evaluation.evaluate(smoke_config(workdir, **_overrides(**{"evaluate.output": out})))
    assert resumed["cells"] == {"run": total - 4, "resumed": 4,
                                "attack_seconds": pytest.approx(resumed["cells"]["attack_seconds"])}
    want = _per_image(workdir)
    for key, value in _per_image(workdir, out).items():
        np.testing.assert_array_equal(value, want[key], err_msg=key)
    assert resumed["verdict"] == first["verdict"]

    again = evaluation.evaluate(smoke_config(workdir, **_overrides(**{"evaluate.output": out})))
    assert again["cells"]["run"] == 0 and again["cells"]["resumed"] == total
    assert f"{total} of {total} attack cells resumed" in (workdir / out / "results.md").read_text()
    saved = sorted((workdir / out / "cells").glob("srd_baseline.*.npz"))
    saved[0].unlink()
    saved[1].write_bytes(b"not an npz file")
    again = evaluation.evaluate(smoke_config(workdir, **_overrides(**{"evaluate.output": out})))
    assert again["cells"]["run"] == 2
    for key, value in _per_image(workdir, out).items():
        np.testing.assert_array_equal(value, want[key], err_msg=key)
    fresh = evaluation.evaluate(smoke_config(workdir, **_overrides(
        **{"evaluate.output": out, "evaluate.resume": False})))
    assert fresh["cells"]["run"] == total and fresh["cells"]["resumed"] == 0


def test_saved_cells_keep_the_newest_of_a_cell_and_skip_what_is_not_a_cell(tmp_path):
    cache = cascade.CellCache(tmp_path, {}, "code")
    rng = np.random.default_rng(0)
    rows = np.arange(2, 12)
    first, second, other = (rng.random(10) < 0.5 for _ in range(3))
    text = "jpeg under {} at eps 0.0313725: 10 of 12 images attacked (cascade)"
    cache.save("a", rows, first, 1.0, text.format("pgd20"))
    cache.save("b", rows, other, 2.0, text.format("fgsm"))
    cache.save("c", rows, second, 3.0, text.format("pgd20"))
    for name, t in (("a", 0), ("b", 5), ("c", 10)):  # a and c: the same cell; c is newer
        os.utime(tmp_path / f"{name}.npz", (1e9 + t, 1e9 + t))
    cache.save("s", rows, first, 0.0, "selector success at eps 0.0313725")
    cache.save("v", rows, first, 0.0, "jpeg under pgd20 at eps 0.0313725: 10 of 12 images "
                                      "attacked (curve)")
    (tmp_path / "broken.npz").write_bytes(b"not an npz")
    cells, older = report.saved_cells(tmp_path)
    assert sorted((c["attack"], c["file"]) for c in cells) == [("fgsm", "b.npz"),
                                                                ("pgd20", "c.npz"),
                                                                ("pgd20", "v.npz")]
    assert older == 1
    md = report.saved_cells_markdown(tmp_path, order=("fgsm", "pgd20"))
    row = next(line for line in md.splitlines() if line.startswith("| jpeg"))
    assert md.splitlines()[2] == "| defense | fgsm | pgd20 | robust so far | cells |"
    low = min(other.sum(), second.sum()) / 12
    assert row == (f"| jpeg | {100 * other.sum() / 12:.1f} | {100 * second.sum() / 12:.1f} | "
                   f"{100 * low:.1f} | 2 |")
    assert md.endswith("1 older file(s) of the same cells passed over.")
    with pytest.raises(SrdjaxError, match="no saved evaluation cells"):
        report.saved_cells_markdown(tmp_path / "none")
    with pytest.raises(SrdjaxError, match="no saved cells at eps 0.5"):
        report.saved_cells_markdown(tmp_path, eps=0.5)


# ------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("field,value,message", [
    ("defenses", ("none", "jpg"), "unknown defense 'jpg'.*known defenses: none, jpeg"),
    ("attacks", ("pgd20", "cw"), "unknown attack 'cw'.*known attacks: fgsm, pgd20"),
    ("attacks", ("pgd20", "fgsm", "pgd20"), "names an attack twice"),
    ("compare", "pgd_at", "evaluate.compare must name the defense compared with PGD-AT"),
    ("compare", "srd", "evaluate.compare must name .*got 'srd'"),
    ("eps", 8.0, r"evaluate.eps must lie in \[0, 1\].*got 8.0"),
    ("eps_list", (0.0, -0.1), r"evaluate.eps_list must lie in \[0, 1\]"),
])
def test_bad_settings_get_one_clear_error(field, value, message):
    with pytest.raises(SrdjaxError, match=message):
        _settings(**{field: value})


def test_a_checkpoint_missing_a_stage_names_it_and_the_defense(smoke_workdir, tmp_path):
    shutil.copytree(smoke_workdir, tmp_path / "w", ignore=shutil.ignore_patterns("evaluation"))
    shutil.rmtree(tmp_path / "w" / "dictionaries")
    shutil.rmtree(tmp_path / "w" / "pgd_at")
    config = smoke_config(tmp_path / "w", **{"evaluate.defenses": ("none", "srd_robust"),
                                             "evaluate.attacks": ("fgsm", "transfer-pgd_at")})
    with pytest.raises(SrdjaxError, match="no finished stage 'dictionaries' "
                                          r"\(needed by defense srd_robust\); 'pgd_at' "
                                          r"\(needed by the transfer-pgd_at attack\)"):
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
            f"--config.evaluate.attacks={ATTACKS3!r}", "--config.evaluate.compare=srd_baseline",
            f"--config.distributed.coordinator=127.0.0.1:{port}",
            "--config.distributed.num_processes=2"]
    procs = [subprocess.Popen(args + [f"--config.distributed.process_id={i}"], cwd=REPO,
                              env=_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert "worst case" in outs[0][0] and "worst case" not in outs[1][0]
    one = _per_image(workdir)
    two = _per_image(workdir, "evaluation_2proc")
    assert set(two) == {"test_index", "y", "srd_baseline/broken_by"}
    for key in two:
        np.testing.assert_array_equal(one[key], two[key], err_msg=key)
