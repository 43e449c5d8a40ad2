"""The jitted, data-parallel step: the same result on a 2-device mesh as on 1 device."""
import jax
import ml_collections
import numpy as np
import pytest

from srdjax import parallel, training
from srdjax.checks import SrdjaxError
from srdjax.models import apply_model, create_model, split_model
from tests.helpers import cifar_test_images


def _one_step(mesh, x, y):
    graphdef, params, stats = split_model(create_model("small_cnn", 10, 0, widths=(8, 16, 16)))
    cfg = ml_collections.ConfigDict(dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4,
                                         schedule="constant", warmup_fraction=0.1))
    tx = training.make_optimizer(cfg, 10)

    def loss_fn(params, stats, x, y, extras, key):
        logits, _, stats = apply_model(graphdef, params, stats, x, train=True)
        return training.cross_entropy(logits, y, 0.1).mean(), (stats, {})

    step = training.make_train_step(graphdef, tx, loss_fn, mesh, crop_pad=2, flip=True)
    state = parallel.replicate(mesh, training.init_state(params, stats, tx))
    xb, yb = parallel.shard_batch(mesh, x, y)
    for _ in range(2):
        state, metrics = step(state, xb, yb, {}, jax.random.key(0))
    return jax.device_get(state), float(metrics["loss"])


def test_two_device_step_equals_one_device_step():
    assert jax.device_count() >= 2, "tests/conftest.py forces 2 host devices"
    x, y = cifar_test_images(32)
    s1, loss1 = _one_step(parallel.make_mesh(jax.devices()[:1]), x, y)
    s2, loss2 = _one_step(parallel.make_mesh(jax.devices()[:2]), x, y)
    assert abs(loss1 - loss2) < 1e-5
    for a, b in zip(jax.tree.leaves((s1.params, s1.batch_stats)),
                    jax.tree.leaves((s2.params, s2.batch_stats))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_sharded_batch_is_laid_out_across_devices():
    mesh = parallel.make_mesh()
    xb = parallel.shard_batch(mesh, np.zeros((8, 4), np.float32))
    assert len(xb.addressable_shards) == 2
    assert {s.data.shape for s in xb.addressable_shards} == {(4, 4)}
    with pytest.raises(SrdjaxError, match="not divisible by the 2 devices"):
        parallel.shard_batch(mesh, np.zeros((5, 4)))
    with pytest.raises(SrdjaxError, match="not divisible"):
        parallel.check_batch_size(7, mesh)


def test_cross_entropy_with_label_smoothing_matches_numpy():
    logits = np.array([[2.0, 0.5, -1.0], [0.0, 0.0, 3.0]], np.float32)
    y = np.array([0, 1])
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    target = np.full((2, 3), 0.2 / 3) + 0.8 * np.eye(3)[y]
    expected = -(target * np.log(p)).sum(1)
    np.testing.assert_allclose(training.cross_entropy(logits, y, 0.2), expected, rtol=1e-5)


def _learning_rates(cfg, total):
    """The schedule's learning rate at every step: plain SGD on a unit gradient updates by -lr."""
    tx = training.make_optimizer(cfg, total)
    params = {"w": np.ones(())}
    state = tx.init(params)
    lrs = []
    for _ in range(total):
        updates, state = tx.update({"w": np.ones(())}, state, params)
        lrs.append(-float(updates["w"]))
    return np.array(lrs)


def test_onecycle_schedule_warms_up_to_the_peak_then_decays_linearly_to_zero():
    cfg = ml_collections.ConfigDict(dict(lr=0.2, momentum=0.0, nesterov=False, weight_decay=0.0,
                                         schedule="onecycle", warmup_fraction=0.25))
    lrs = _learning_rates(cfg, 100)
    t = np.arange(100)
    expected = np.where(t < 25, 0.02 + 0.18 * t / 25, 0.2 * (1 - (t - 25) / 75))
    np.testing.assert_allclose(lrs, expected, rtol=1e-5, atol=1e-7)
    with pytest.raises(SrdjaxError, match="schedule"):
        training.make_optimizer(ml_collections.ConfigDict({**cfg.to_dict(), "schedule": "x"}), 10)


def test_cyclic_schedule_is_the_triangle_from_zero_to_the_peak_and_back():
    """Wong et al. 2020's schedule: 0 → lr linearly over the warm-up, then linearly to 0."""
    cfg = ml_collections.ConfigDict(dict(lr=0.1, momentum=0.0, nesterov=False, weight_decay=0.0,
                                         schedule="cyclic", warmup_fraction=0.4))
    lrs = _learning_rates(cfg, 50)
    t = np.arange(50)
    expected = np.where(t < 20, 0.1 * t / 20, 0.1 * (1 - (t - 20) / 30))
    np.testing.assert_allclose(lrs, expected, rtol=1e-5, atol=1e-7)
    assert max(lrs) == pytest.approx(0.1) and lrs[0] == 0.0
