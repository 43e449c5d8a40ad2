"""Stage purified_at: the classifier behind the purifier, adversarially trained through it."""
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import srdjax
from srdjax import config_checks, loading, parallel, purified_training, purify_variants, stages
from srdjax import training
from srdjax.checks import SrdjaxError
from srdjax.data import load_dataset
from srdjax.models import apply_model
from tests.helpers import smoke_config

EPS = 8 / 255


def _section(**overrides):
    c = smoke_config("/unused").purified_at
    for k, v in overrides.items():
        c[k] = v
    return c


@pytest.fixture(scope="module")
def setup(smoke_workdir):
    ctx = loading.context(smoke_workdir)
    graphdef, params, stats = stages.load_classifier(ctx, "robust")
    purifier = srdjax.load_purifier(smoke_workdir)
    test = load_dataset(ctx.config.data, "test", ctx.config.seed)
    x = jnp.asarray(test.x[:8].astype(np.float32) / 255.0)
    y = jnp.asarray(test.y[:8])
    return smoke_workdir, ctx, graphdef, params, stats, purifier, x, y


def test_at_eps_zero_it_trains_on_the_purification_of_the_clean_images(setup):
    _, _, graphdef, params, stats, purifier, x, y = setup
    adversary = purified_training.make_adversary(graphdef, _section(), 0.0, 1e-3, 0.0)
    x_adv, purified = adversary(purifier, params, stats, x, y, jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(x_adv), np.asarray(x))
    # The purification inside the training step is the public purify's, to float32 rounding.
    np.testing.assert_allclose(np.asarray(purified), np.asarray(purifier(x)), atol=1e-6)


def test_the_attack_is_fgsm_rs_on_the_deployed_defense_plus_the_selector_margin(setup):
    workdir, _, graphdef, params, stats, purifier, x, y = setup
    beta, step = 0.5, 1.25 * EPS
    section = _section(selector_weight=beta)
    key = jax.random.key(7)
    x_adv, purified = purified_training.make_adversary(graphdef, section, EPS, step, 0.0)(
        purifier, params, stats, x, y, key)
    # Reference: the same one-step attack written against load_defense (the defense as users
    # get it, with its BPDA gradient) and the selector attack's own margin.
    defense = srdjax.load_defense(workdir, classifier="robust").unchecked

    def objective(v):
        return (training.cross_entropy(defense(v), y)
                + beta * purify_variants.nearest_margin(purifier, y, v))

    start = jnp.clip(x + jax.random.uniform(key, x.shape, x.dtype, -EPS, EPS), 0.0, 1.0)
    grad = jax.grad(lambda v: jnp.sum(objective(v)))(start)
    expected = jnp.clip(jnp.clip(start + step * jnp.sign(grad), x - EPS, x + EPS), 0.0, 1.0)
    np.testing.assert_allclose(np.asarray(x_adv), np.asarray(expected), atol=1e-6)
    assert float(jnp.max(jnp.abs(x_adv - x))) <= EPS + 1e-6
    np.testing.assert_allclose(np.asarray(purified), np.asarray(purifier(x_adv)), atol=1e-6)
    # One step along the sign of the gradient raises the objective it climbs.
    assert float(objective(x_adv).mean()) > float(objective(x).mean())


def test_each_device_attacks_its_own_images_with_its_own_key(setup):
    _, _, graphdef, params, stats, purifier, x, y = setup
    mesh = parallel.make_mesh()
    assert mesh.size == 2
    section = _section()
    loss_fn = purified_training.make_purified_loss(graphdef, section, purifier, mesh, EPS,
                                                   1.25 * EPS)
    key = jax.random.key(3)
    xs, ys = parallel.shard_global(mesh, np.asarray(x), np.asarray(y))
    loss, (_, metrics) = jax.jit(loss_fn)(params, stats, xs, ys, {}, key)
    # Reference on one device: each half of the batch attacked with fold_in(key, device), the
    # classifier then trained (BatchNorm in training mode) on the whole purified batch.
    adversary = purified_training.make_adversary(graphdef, section, EPS, 1.25 * EPS, 0.0)
    halves = [adversary(purifier, params, stats, x[i * 4:(i + 1) * 4], y[i * 4:(i + 1) * 4],
                        jax.random.fold_in(key, i))[1] for i in range(2)]
    logits, _, _ = apply_model(graphdef, params, stats, jnp.concatenate(halves), train=True)
    expected = training.cross_entropy(logits, y, float(section.label_smoothing)).mean()
    np.testing.assert_allclose(float(loss), float(expected), rtol=1e-5)
    assert float(metrics["acc"]) == pytest.approx(float((logits.argmax(-1) == y).mean()))


def test_the_stage_trains_from_robust_and_reports_the_purified_test_accuracy(smoke_workdir,
                                                                             tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(smoke_workdir, workdir)
    config = smoke_config(workdir)
    config.stages = ("purified_at",)
    summary = stages.run(config)["purified_at"]
    assert summary["step"] == 200 // 50
    ctx = stages.Context(config)
    _, robust_params, _ = stages.load_classifier(ctx, "robust")
    _, params, _ = stages.load_classifier(ctx, "purified_at")
    changed = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), robust_params, params)
    assert max(jax.tree.leaves(changed)) > 0
    # The summary's accuracy of purify → purified_at against the whole defense as loaded.
    test = ctx.dataset("test")
    defense = srdjax.load_defense(workdir, classifier="purified_at")
    logits = defense(jnp.asarray(test.x.astype(np.float32) / 255.0))
    reference = float(np.mean(np.asarray(logits).argmax(-1) == test.y))
    # Training purifies through uint8 files' rounding; a prediction or two may differ.
    assert abs(summary["purified_test_acc"] - reference) <= 2 / len(test)
    # The stage's fingerprint holds its section: another β is another model.
    config.purified_at.selector_weight = 2.0
    with pytest.raises(SrdjaxError, match="purified_at"):
        stages.run(config)


def test_bad_purified_at_settings_are_refused_before_any_work():
    config = smoke_config("/unused")
    config.purified_at.init = "pgd"
    with pytest.raises(SrdjaxError, match="purified_at.init"):
        config_checks.check_config(config)
    config = smoke_config("/unused")
    config.stages = ("purified_at",)
    del config["purified_at"]
    with pytest.raises(SrdjaxError, match="no purified_at section"):
        config_checks.check_config(config)
    with pytest.raises(SrdjaxError, match="selector_weight"):
        purified_training.check_section(ml_collections.ConfigDict(
            {**_section().to_dict(), "selector_weight": -1.0}))
