"""The robust stage's training attacks, its overfitting watch and the twins' configs."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from srdjax import robust, stages, training
from srdjax.checks import SrdjaxError

EPS = 8 / 255


def _linear_case(n=6, seed=0):
    """Images and a per-sample linear loss <W_i, x_i>: its gradient is W_i, so an FGSM step
    moves every pixel by sign(W_i) exactly."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1, (n, 8, 8, 3)).astype(np.float32)
    w = rng.normal(size=x.shape).astype(np.float32)
    loss = lambda v: jnp.sum(v * w, axis=(1, 2, 3))
    return x, w, loss


def test_fgsm_rs_is_one_signed_step_from_a_uniform_start_projected_on_the_ball():
    x, w, loss = _linear_case()
    key = jax.random.key(3)
    out = np.asarray(robust.fgsm_rs(loss, jnp.asarray(x), eps=EPS, step_size=1.25 * EPS, key=key))
    start = np.clip(x + np.asarray(jax.random.uniform(key, x.shape, jnp.float32, -EPS, EPS)), 0, 1)
    expected = np.clip(np.clip(start + 1.25 * EPS * np.sign(w), x - EPS, x + EPS), 0, 1)
    np.testing.assert_allclose(out, expected, atol=1e-7)
    delta = out - x
    assert np.abs(delta).max() <= EPS + 1e-6
    # A step of 1.25 ε outweighs any start in the ball: every pixel the box leaves free ends on
    # the gradient's side of x.
    free = (x > EPS) & (x < 1 - EPS)
    assert np.all(np.sign(delta[free]) == np.sign(w[free]))


def test_n_fgsm_steps_from_2eps_noise_and_is_not_projected_on_the_ball():
    x, w, loss = _linear_case()
    key = jax.random.key(4)
    out = np.asarray(robust.n_fgsm(loss, jnp.asarray(x), noise=2 * EPS, step_size=EPS, key=key))
    eta = np.asarray(jax.random.uniform(key, x.shape, jnp.float32, -2 * EPS, 2 * EPS))
    expected = np.clip(np.clip(x + eta, 0, 1) + EPS * np.sign(w), 0, 1)
    np.testing.assert_allclose(out, expected, atol=1e-7)
    delta = np.abs(out - x)
    assert delta.max() <= 3 * EPS + 1e-6
    # Not projected: |η + ε·sign ∇| > ε wherever η lies on the gradient's side of 0 (η uniform
    # on [-2ε, 2ε]): half of the pixels, a few fewer where [0, 1] clips.
    outside = np.mean(delta > EPS + 1e-6)
    assert 0.4 < outside < 0.55, outside


def test_training_attack_follows_the_config_and_bad_sections_are_refused():
    x, w, loss = _linear_case(n=2)
    section = ml_collections.ConfigDict(dict(attack="n_fgsm", attack_steps=1, eps=8.0,
                                             step_size=8.0, noise=16.0, latent_weight=0.0,
                                             distance="sigma"))
    eps, step, noise = robust.check_section(section)
    assert (eps, step, noise) == pytest.approx((8 / 255, 8 / 255, 16 / 255))
    key = jax.random.key(0)
    np.testing.assert_array_equal(
        robust.training_attack(section, eps, step, noise)(loss, jnp.asarray(x), key),
        robust.n_fgsm(loss, jnp.asarray(x), noise=noise, step_size=step, key=key))
    with pytest.raises(SrdjaxError, match="robust.attack must be one of"):
        robust.check_section(ml_collections.ConfigDict({**section.to_dict(), "attack": "fgsm"}))


def test_collapse_guard_fires_on_a_collapse_and_keeps_the_best_epoch():
    guard = robust.CollapseGuard(drop=0.2)
    history = [0.30, 0.36, 0.34, 0.05]   # catastrophic overfitting in epoch 4
    fired = [guard.update(e + 1, a, {"w": np.full(2, e + 1.0)}) for e, a in enumerate(history)]
    assert fired == [False, False, False, True]
    assert guard.best_epoch == 2 and guard.best_acc == pytest.approx(0.36)
    np.testing.assert_array_equal(guard.best_weights["w"], [2.0, 2.0])
    assert guard.summary()["collapse_at_epoch"] == 4 and guard.summary()["rolled_back"]
    # Noise of a few points is not a collapse; a floor catches a run that never learns.
    calm = robust.CollapseGuard(drop=0.2)
    assert not any(calm.update(e, a) for e, a in enumerate([0.30, 0.25, 0.31, 0.27], 1))
    assert robust.CollapseGuard(drop=0.2, floor=0.1).update(1, 0.05)


def test_fit_ends_when_stop_says_so_and_a_resume_trains_no_further(tmp_path):
    """`training.fit`'s stop rule, with a step that only counts (no network)."""
    from srdjax import parallel
    from srdjax.checkpoints import StageStore
    from srdjax.data import Dataset
    mesh = parallel.make_mesh(jax.devices()[:1])
    state = training.TrainState(jnp.zeros((), jnp.int32), {"w": jnp.zeros(())}, {}, {})

    def step(state, x, y, extras, key):
        return state.replace(step=state.step + 1, params={"w": state.params["w"] + 1}), {}

    ds = Dataset(np.zeros((8, 4, 4, 3), np.uint8), np.zeros(8, np.int32), ("a",))
    store = StageStore(tmp_path, "robust", {})
    seen = []
    stop = lambda epoch, st, row: seen.append(epoch) or epoch == 2
    kw = dict(epochs=5, batch_size=4, seed=0, desc="t")
    out, row = training.fit(store, state, step, lambda s: {}, ds, {}, mesh, stop=stop, **kw)
    assert int(out.step) == 4 and seen == [1, 2] and row["stopped"]
    again, row2 = training.fit(StageStore(tmp_path, "robust", {}), state, step, lambda s: {},
                               ds, {}, mesh, stop=stop, **kw)
    assert int(again.step) == 4 and seen == [1, 2] and row2["stopped"]


@pytest.mark.parametrize("name", ["cifar10_quick", "cifar10", "smoke"])
def test_twins_train_with_the_same_section_but_the_latent_weight(name):
    import importlib
    config = importlib.import_module(f"configs.{name}").get_config()
    robust_sec = stages.twin_section(config, config.robust.latent_weight).to_dict()
    pgd_at_sec = stages.twin_section(config, 0.0).to_dict()
    assert robust_sec.pop("latent_weight") > 0 and pgd_at_sec.pop("latent_weight") == 0
    assert robust_sec == pgd_at_sec
    assert {"robust", "pgd_at"} <= set(config.stages)


def test_pgd_check_scores_the_images_attacks_pgd_finds():
    """The overfitting watch's accuracy is that of srdjax.attacks.pgd's images, in eval mode."""
    from srdjax import attacks
    from srdjax.models import apply_model, create_model, split_model
    from tests.helpers import cifar_test_images
    graphdef, params, stats = split_model(create_model("small_cnn", 10, 0, widths=(4, 8)))
    x8, y = cifar_test_images(8)
    x = jnp.asarray(x8, jnp.float32) / 255
    key = jax.random.key(5)
    clean, adv = robust.make_pgd_check(graphdef, EPS, 2 / 255, 3)(params, stats, x, y, key)
    logits = lambda v: apply_model(graphdef, params, stats, v)[0]
    x_adv = attacks.pgd(logits, x, y, eps=EPS, key=key, steps=3, step_size=2 / 255)
    assert float(clean) == pytest.approx(np.mean(np.asarray(logits(x)).argmax(-1) == y))
    assert float(adv) == pytest.approx(np.mean(np.asarray(logits(x_adv)).argmax(-1) == y))
