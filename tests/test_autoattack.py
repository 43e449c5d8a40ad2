"""AutoAttack's attacks and the standard suite against known answers: a linear model's exact
minimal L∞ / L2 perturbation (broken with eps above it, never below), a model no attack can
break, eps = 0, the targets' order, the official settings, and the cascade's per-image result
against every attack run on every image."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import Partial

from srdjax import attacks
from srdjax.attacks import suite as aa
from srdjax.checks import SrdjaxError

SHAPE = (8, 8, 3)
D = int(np.prod(SHAPE))
KEY = jax.random.key(0)
# Cheap suites for the tests (the standard settings are checked against the official ones).
CHEAP = {"apgd-ce": {"steps": 10}, "apgd-t": {"steps": 10, "n_target_classes": 3},
         "fab-t": {"steps": 10, "n_target_classes": 3}, "square": {"n_queries": 60}}
LINEAR = {**CHEAP, "apgd-t": {"steps": 20}, "square": {"n_queries": 200}}


def _linear(w, b):
    return Partial(lambda w, b, x: x.reshape(x.shape[0], -1) @ w + b,
                   jnp.asarray(w, jnp.float32), jnp.asarray(b, jnp.float32))


@pytest.fixture(scope="module")
def linear10():
    """A ten-class linear model, images inside [0.3, 0.7] (no box edge within the eps used), the
    labels it predicts, and per image the exact minimal perturbation that changes its class:
    min over j of margin_j / ||w_y - w_j||_q (q = 1 for L∞, 2 for L2)."""
    rng = np.random.default_rng(0)
    w, b = rng.normal(size=(D, 10)) * 0.05, rng.normal(size=10) * 0.05
    x = rng.uniform(0.3, 0.7, (32,) + SHAPE).astype(np.float32)
    logits = x.reshape(32, -1) @ w + b
    y = logits.argmax(1)
    diff = w[:, y].T[:, :, None] - w[None]                     # [n, d, classes]
    margin = logits[np.arange(32), y][:, None] - logits         # [n, classes]
    others = np.arange(10)[None] != y[:, None]
    need = {norm: np.where(others, margin / np.maximum(size(diff), 1e-12), np.inf).min(1)
            for norm, size in (("linf", lambda d: np.abs(d).sum(1)),
                               ("l2", lambda d: np.sqrt((d ** 2).sum(1))))}
    return _linear(w, b), jnp.asarray(x), jnp.asarray(y), need


def _fooled(logits_fn, x_adv, y):
    return np.asarray(jnp.argmax(logits_fn(x_adv), -1) != y)


def _in_ball(x_adv, x, eps, norm):
    delta = np.asarray(x_adv - x).reshape(len(x), -1)
    size = np.abs(delta).max(1) if norm == "linf" else np.linalg.norm(delta, axis=1)
    return np.all(size <= eps * (1 + 1e-5) + 1e-7) and np.asarray(x_adv).min() >= 0 \
        and np.asarray(x_adv).max() <= 1


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_attacks_break_exactly_where_the_linear_optimum_allows(linear10, norm):
    """Every image whose optimum is below eps / 1.25 is broken by APGD-T and by the suite; no
    attack breaks an image whose optimum is above eps; unbroken images come back as they were."""
    logits_fn, x, y, need = linear10
    need = need[norm]
    eps = float(np.median(need))
    possible, impossible = need < eps / 1.25, need > eps
    assert possible.sum() >= 8 and impossible.sum() >= 8
    outs = {
        "apgd-ce": attacks.apgd(logits_fn, x, y, eps=eps, key=KEY, norm=norm, steps=20),
        "apgd-t": attacks.apgd_targeted(logits_fn, x, y, eps=eps, key=KEY, norm=norm, steps=20),
        "square": attacks.square(logits_fn, x, y, eps=eps, key=KEY, norm=norm, n_queries=200),
    }
    x_aa, broken_by = attacks.autoattack(logits_fn, x, y, eps=eps, norm=norm, key=KEY,
                                         overrides=LINEAR)
    outs["autoattack"] = x_aa
    for name, x_adv in outs.items():
        fooled = _fooled(logits_fn, x_adv, y)
        assert not fooled[impossible].any(), name
        assert _in_ball(x_adv, x, eps, norm), name
        np.testing.assert_array_equal(np.asarray(x_adv)[~fooled], np.asarray(x)[~fooled], name)
    assert _fooled(logits_fn, outs["apgd-t"], y)[possible].all()
    np.testing.assert_array_equal(broken_by >= 0, _fooled(logits_fn, x_aa, y))
    assert (np.asarray(broken_by)[possible] >= 0).all()
    assert (np.asarray(broken_by)[impossible] == -1).all()


def test_nothing_breaks_a_constant_model_or_moves_at_eps_zero(linear10):
    logits_fn, x, y, _ = linear10
    constant = Partial(lambda c, u: c + 0.0 * u.reshape(u.shape[0], -1)[:, :1],
                       jnp.linspace(0.0, 1.0, 10))
    y_const = jnp.full(len(x), 9, jnp.int32)
    for fn, labels, eps in ((constant, y_const, 0.3), (logits_fn, y, 0.0)):
        for name, x_adv in {
            "apgd-ce": attacks.apgd(fn, x, labels, eps=eps, key=KEY, steps=5),
            "apgd-t": attacks.apgd_targeted(fn, x, labels, eps=eps, key=KEY, steps=5,
                                            n_target_classes=3),
            "square-linf": attacks.square(fn, x, labels, eps=eps, key=KEY, n_queries=20),
            "square-l2": attacks.square(fn, x, labels, eps=eps, key=KEY, n_queries=20,
                                        norm="l2"),
        }.items():
            np.testing.assert_array_equal(x_adv, x, err_msg=f"{name} eps={eps}")
        x_aa, broken_by = attacks.autoattack(fn, x, labels, eps=eps, key=KEY, overrides=CHEAP)
        np.testing.assert_array_equal(x_aa, x)
        np.testing.assert_array_equal(broken_by, -1)


def test_apgd_t_targets_follow_the_clean_ranking(linear10):
    logits_fn, x, _, _ = linear10
    logits = np.asarray(logits_fn(x))
    np.testing.assert_array_equal(attacks.apgd_targets(logits_fn, x, 9),
                                  np.argsort(-logits, axis=1, kind="stable")[:, 1:10])
    np.testing.assert_array_equal(attacks.apgd_targets(logits_fn, x, 3),
                                  np.argsort(-logits, axis=1, kind="stable")[:, 1:4])


def test_standard_settings_are_the_official_ones():
    # fra31/auto-attack, autoattack.py: AutoAttack.__init__ and set_version("standard").
    assert attacks.STANDARD_SUITE == ("apgd-ce", "apgd-t", "fab-t", "square")
    assert aa.STANDARD_SETTINGS == {
        "apgd-ce": dict(steps=100, restarts=1, loss="ce"),
        "apgd-t": dict(steps=100, n_target_classes=9),
        "fab-t": dict(steps=100, n_target_classes=9),
        "square": dict(n_queries=5000, p_init=0.8)}
    # The defaults of the attacks themselves are the official ones too.
    assert attacks.attack_by_name("square").keywords == {"n_queries": 5000, "p_init": 0.8}
    assert attacks.attack_by_name("apgd-t").keywords == {"steps": 100, "n_target_classes": 9}


@pytest.fixture(scope="module")
def mlp():
    """A small random tanh network (10 classes) that each attack has its own images to break:
    logits x1000 saturate CE (APGD-CE stalls where DLR does not), and images whose first channel
    is bright on average give no gradient at all (only Square breaks those)."""
    rng = np.random.default_rng(4)
    w1 = jnp.asarray(rng.normal(size=(D, 32)) * 0.3, jnp.float32)
    w2 = jnp.asarray(rng.normal(size=(32, 10)), jnp.float32)

    def masked(w1, w2, u):
        net = lambda v: jnp.tanh(v.reshape(v.shape[0], -1) @ w1 - 0.5) @ w2
        bright = (u[..., 0].mean(axis=(1, 2)) > 0.5)[:, None]
        return 1000 * jnp.where(bright, net(jax.lax.stop_gradient(u)), net(u))

    fn = Partial(masked, w1, w2)
    x = jnp.asarray(rng.uniform(0, 1, (32,) + SHAPE), jnp.float32)
    y = np.array(jnp.argmax(fn(x), -1))
    y[:4] = (y[:4] + 1) % 10                 # four images misclassified clean
    return fn, x, jnp.asarray(y)


def test_cascade_equals_every_attack_on_every_image(mlp, monkeypatch):
    """broken_by[i] is the first attack (run alone on every image, key fold_in(key, j)) that
    breaks image i, -1 if none, -2 where the clean image is misclassified; x_adv is that
    attack's image; robust accuracy is the per-image AND of the attacks run alone. Also traced
    inside jit (every row attacked, merged by mask)."""
    fn, x, y = mlp
    eps = 0.02
    x_aa, broken_by = attacks.autoattack(fn, x, y, eps=eps, key=KEY, overrides=CHEAP)
    broken_by = np.asarray(broken_by)
    clean = np.asarray(jnp.argmax(fn(x), -1) == y)
    expected, x_expected, fooled = np.where(clean, -1, -2), np.array(x), []
    for j, (name, attack, settings) in enumerate(aa._suite(10, CHEAP)):
        out = np.asarray(attack(fn, x, y, eps=eps, key=jax.random.fold_in(KEY, j), norm="linf",
                                **settings))
        fooled.append(_fooled(fn, out, y))
        first = fooled[-1] & (expected == -1)
        expected[first], x_expected[first] = j, out[first]
    np.testing.assert_array_equal(broken_by, expected)
    np.testing.assert_array_equal(x_aa, x_expected)
    assert (broken_by[:4] == -2).all() and (broken_by == -1).sum() >= 4
    assert {0, 1, 3} <= set(broken_by.tolist())     # APGD-CE, APGD-T and Square each broke some
    assert np.mean(broken_by == -1) == np.mean(clean & ~np.any(fooled, axis=0))
    monkeypatch.setattr(attacks, "UNROLL_MAX", 0)     # loops, not unrolled: a faster compile
    traced = jax.jit(lambda u, v, k: attacks.autoattack(fn, u, v, eps=eps, key=k,
                                                        overrides=CHEAP))(x, y, KEY)
    np.testing.assert_array_equal(traced[1], broken_by)
    np.testing.assert_allclose(traced[0], x_aa, atol=1e-6)


def test_bad_input(mlp):
    fn, x, y = mlp
    with pytest.raises(SrdjaxError, match="unknown AutoAttack version 'plus'"):
        attacks.autoattack(fn, x, y, eps=0.03, key=KEY, version="plus")
    with pytest.raises(SrdjaxError, match="unknown norm 'l1'"):
        attacks.autoattack(fn, x, y, eps=0.03, key=KEY, norm="l1")
    with pytest.raises(SrdjaxError, match="unknown attack 'fab' in overrides"):
        attacks.autoattack(fn, x, y, eps=0.03, key=KEY, overrides={"fab": {}})
    with pytest.raises(SrdjaxError, match="ids must be integers of shape"):
        attacks.autoattack(fn, x, y, eps=0.03, key=KEY, ids=np.arange(3))
    three = Partial(lambda u: u.reshape(u.shape[0], -1)[:, :3])
    with pytest.raises(SrdjaxError, match="at least 4 classes"):
        attacks.autoattack(three, x, jnp.zeros(len(x), jnp.int32), eps=0.03, key=KEY)
