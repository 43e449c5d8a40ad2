"""FAB-T against known answers: the projections onto a hyperplane inside the box against scipy's
LP and QP solvers, the analytic minimal perturbation of linear models, the targets' order, ε = 0,
a model that cannot be broken, and the same result whatever the batch, sharding or loop mode."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jax.tree_util import Partial
from scipy.optimize import linprog, minimize

from srdjax import attacks
from srdjax.attacks import fab
from srdjax.checks import SrdjaxError

SHAPE = (4, 4, 3)
D = int(np.prod(SHAPE))
KEY = jax.random.key(0)
# On a linear model FAB's first step overshoots the boundary by eta = 1.05, steps back by
# beta = 0.9 to 0.945, and its second step lands at 1.05 - 0.05 * 0.945 * (1 - alpha) with
# alpha = 0.055 / 1.055: 1.005213 times the distance, its closest point (later steps settle
# farther, near 1.0087).
FAB_LINEAR_RATIO = 1.05 - 0.05 * 0.945 * (1 - 0.055 / 1.055)


def _linear(w, b):
    return Partial(lambda w, b, x: x.reshape(x.shape[0], -1) @ w + b,
                   jnp.asarray(w, jnp.float32), jnp.asarray(b, jnp.float32))


def _size(d, norm):
    d = np.asarray(d, np.float64).reshape(len(d), -1)
    return np.abs(d).max(1) if norm == "linf" else np.linalg.norm(d, axis=1)


def _boundary_distances(w, b, x, y, norm):
    """[n, C] distance from each image to the hyperplane where class t's logit equals the true
    one (inf for t = y): margin / ||w_t - w_y||_1 in L∞, / ||.||_2 in L2."""
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    logits = x @ w + b
    rows = np.arange(len(x))
    margin = logits[rows, y][:, None] - logits
    dw = w[None, :, :] - w[:, y].T[:, :, None]           # [n, D, C]
    dual = np.abs(dw).sum(1) if norm == "linf" else np.sqrt((dw ** 2).sum(1))
    out = margin / np.where(dual > 0, dual, 1.0)
    out[rows, y] = np.inf
    return out


# ------------------------------------------------------------ projections


def _cases(seed, n, dims):
    """Random points in [0, 1] (a fifth of the coordinates on the box's faces), hyperplanes with
    some zero weights, and offsets from on the plane to beyond the box's reach."""
    rng = np.random.default_rng(seed)
    t = rng.uniform(0, 1, (n, dims))
    t[:, :dims // 5] = rng.integers(0, 2, (n, dims // 5))
    w = rng.normal(size=(n, dims)) * rng.exponential(size=(n, dims))
    w[rng.uniform(size=(n, dims)) < 0.15] = 0.0
    reach = np.abs(w).sum(1) * rng.choice([0.0, 0.05, 0.3, 1.0, 3.0], n)
    b = (w * t).sum(1) + reach * rng.uniform(0, 1, n) * rng.choice([-1, 1], n)
    return t, w, b


def _box_bounds(t):
    return [(-ti, 1 - ti) for ti in t]


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_projection_matches_scipy(norm):
    t, w, b = _cases(1, 40, 10)
    d = np.asarray(fab.PROJECTIONS[norm](*(jnp.asarray(a, jnp.float32) for a in (t, w, b))))
    assert np.all(t + d >= -1e-6) and np.all(t + d <= 1 + 1e-6)
    feasible = 0
    for ti, wi, bi, di in zip(t, w, b, d):
        if norm == "linf":
            # min s subject to |d_j| <= s, w·d = b - w·t, t + d in the box.
            dims = len(ti)
            ub = np.block([[np.eye(dims), -np.ones((dims, 1))], [-np.eye(dims), -np.ones((dims, 1))]])
            ref = linprog(np.r_[np.zeros(dims), 1.0], A_ub=ub, b_ub=np.zeros(2 * dims),
                          A_eq=np.r_[wi, 0.0][None], b_eq=[bi - wi @ ti],
                          bounds=_box_bounds(ti) + [(0, None)], method="highs")
            ok, value = ref.status == 0, ref.fun
        else:
            ref = minimize(lambda v: 0.5 * v @ v, np.zeros_like(ti), jac=lambda v: v,
                           bounds=_box_bounds(ti), method="SLSQP",
                           constraints=[{"type": "eq", "fun": lambda v: wi @ v - (bi - wi @ ti),
                                         "jac": lambda v: wi}],
                           options={"ftol": 1e-14, "maxiter": 1000})
            ok = ref.success and abs(wi @ ref.x - (bi - wi @ ti)) < 1e-8
            value = np.linalg.norm(ref.x)
        if ok:
            feasible += 1
            # float32 projections against float64 solvers: 1e-5 relative to the plane's scale.
            assert abs(wi @ (ti + di) - bi) <= 1e-5 * (np.abs(wi).sum() + abs(bi))
            assert _size(di[None], norm)[0] == pytest.approx(value, abs=2e-5)
            if norm == "l2":     # the L2 projection is unique
                np.testing.assert_allclose(di, ref.x, atol=2e-5)
        else:
            # Out of the box's reach: the move to the box corner that goes farthest toward it.
            side = np.sign(wi @ ti - bi) or 1.0
            corner = np.where(side * wi > 0, -ti, np.where(side * wi < 0, 1 - ti, 0.0))
            if norm == "l2":
                corner[np.abs(wi) <= 1e-8] = 0.0
            np.testing.assert_allclose(di, corner, atol=1e-6)
    assert 10 <= feasible < len(t)     # both kinds of case occurred


def test_projection_of_a_point_on_the_plane_is_zero():
    t, w, _ = _cases(2, 8, 12)
    b = (w * t).sum(1)
    for project in fab.PROJECTIONS.values():
        np.testing.assert_allclose(project(jnp.asarray(t), jnp.asarray(w), jnp.asarray(b)), 0.0,
                                   atol=1e-7)


# ------------------------------------------------------------ the attack on linear models


@pytest.fixture(scope="module")
def linear10():
    """Ten-class linear model with interior images (no box edge at the distances involved)."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(D, 10)) * 0.3
    b = rng.normal(size=10) * 0.3
    x = rng.uniform(0.35, 0.65, (24,) + SHAPE).astype(np.float32)
    y = np.argmax(x.reshape(24, -1) @ w + b, axis=1)
    return w, b, x, y


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_two_class_linear_model_minimal_perturbation(norm):
    """One boundary: FAB's closest point is FAB_LINEAR_RATIO times the analytic distance."""
    rng = np.random.default_rng(3)
    w, b = rng.normal(size=(D, 2)) * 0.3, np.zeros(2)
    x = rng.uniform(0.35, 0.65, (16,) + SHAPE).astype(np.float32)
    y = np.argmax(x.reshape(16, -1) @ w, axis=1)
    opt = _boundary_distances(w, b, x, y, norm).min(1)
    # The analytic minimiser (overshot by 1.05) stays inside the box: x lies in [0.35, 0.65].
    direction = np.abs(w[:, 1] - w[:, 0])
    reach = opt if norm == "linf" else opt * direction.max() / np.linalg.norm(direction)
    assert 1.05 * reach.max() < 0.35
    adv = fab.fab_targeted(_linear(w, b), jnp.asarray(x), jnp.asarray(y), eps=1.0, key=KEY,
                           norm=norm, n_target_classes=1)
    np.testing.assert_allclose(_size(adv - x, norm) / opt, FAB_LINEAR_RATIO, rtol=2e-4)
    assert np.all(np.argmax(np.asarray(adv).reshape(16, -1) @ w, 1) != y)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_linear_model_broken_exactly_below_eps(linear10, norm):
    w, b, x, y = linear10
    opt = _boundary_distances(w, b, x, y, norm).min(1)
    eps = float(np.median(opt))
    # Rows whose optimum lies within FAB's overshoot of eps could go either way.
    clear = (opt * FAB_LINEAR_RATIO * 1.001 < eps) | (opt > eps)
    assert clear.sum() >= 20
    adv = np.asarray(attacks.attack_by_name("fab-t")(_linear(w, b), jnp.asarray(x),
                                                      jnp.asarray(y), eps=eps, key=KEY, norm=norm))
    assert adv.shape == x.shape and adv.dtype == x.dtype
    broken = np.argmax(adv.reshape(len(x), -1) @ w + b, 1) != y
    np.testing.assert_array_equal(broken[clear], (opt < eps)[clear])
    size = _size(adv - x, norm)
    assert np.all(size <= eps) and np.all(size[~broken] == 0)
    assert np.all(size[broken] >= opt[broken] * (1 - 1e-5))
    assert adv.min() >= 0 and adv.max() <= 1


def test_targets_ranked_by_clean_logits(linear10):
    w, b, x, _ = linear10
    logits = x.reshape(len(x), -1) @ w + b
    np.testing.assert_array_equal(fab.fab_targets(jnp.asarray(logits), 9),
                                  np.argsort(-logits, axis=1, kind="stable")[:, 1:10])
    np.testing.assert_array_equal(fab.fab_targets(jnp.asarray(logits), 3),
                                  np.argsort(-logits, axis=1, kind="stable")[:, 1:4])


def test_targets_tried_in_rank_order():
    """Class 1 is ranked second but its logit does not depend on the image; class 2, ranked third,
    is within reach: one target fails, two succeed through class 2."""
    rng = np.random.default_rng(4)
    w = np.zeros((D, 3))
    w[:, 2] = rng.normal(size=D)
    x = rng.uniform(0.4, 0.6, (6,) + SHAPE).astype(np.float32)
    b = np.array([2.0, 1.5, 1.0 - (x.reshape(6, -1) @ w[:, 2]).max()])
    logits_fn, y = _linear(w, b), np.zeros(6, np.int32)
    ranks = np.argsort(-np.asarray(logits_fn(x)), axis=1)
    assert np.all(ranks[:, 1] == 1) and np.all(ranks[:, 2] == 2)
    eps = 2 * _boundary_distances(w, b, x, y, "linf")[:, 2].max()
    one = fab.fab_targeted(logits_fn, x, y, eps=eps, key=KEY, n_target_classes=1, steps=20)
    two = fab.fab_targeted(logits_fn, x, y, eps=eps, key=KEY, n_target_classes=2, steps=20)
    np.testing.assert_array_equal(one, x)
    assert np.all(np.argmax(logits_fn(two), 1) == 2)


def test_eps_zero_changes_nothing(linear10):
    w, b, x, y = linear10
    y = y.copy()
    y[:3] = (y[:3] + 1) % 10          # three misclassified clean images, left as they are too
    adv = fab.fab_targeted(_linear(w, b), jnp.asarray(x), jnp.asarray(y), eps=0.0, key=KEY,
                           steps=10)
    np.testing.assert_array_equal(adv, x)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_unbreakable_model_stays_unbroken(norm):
    """Class 0's logit is 3; the others are tanh of an MLP, below 1 everywhere: the whole box
    (eps = 10) holds no adversarial example, though every gradient is non-zero."""
    rng = np.random.default_rng(5)
    w1, w2 = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((D, 16), (16, 4)))

    def logits_fn(x):
        hidden = jnp.tanh(x.reshape(x.shape[0], -1) @ w1)
        return jnp.concatenate([jnp.full((x.shape[0], 1), 3.0), jnp.tanh(hidden @ w2)], 1)
    x = jnp.asarray(rng.uniform(0, 1, (8,) + SHAPE), jnp.float32)
    adv = fab.fab_targeted(logits_fn, x, jnp.zeros(8, jnp.int32), eps=10.0, key=KEY, norm=norm,
                           n_target_classes=4, steps=20)
    np.testing.assert_array_equal(adv, x)


# ------------------------------------------------------------ per-image results


@pytest.fixture(scope="module")
def mlp():
    rng = np.random.default_rng(6)
    w1, w2 = rng.normal(size=(D, 32)) * 0.4, rng.normal(size=(32, 10)) * 0.4
    logits_fn = Partial(lambda w1, w2, x: jnp.tanh(x.reshape(x.shape[0], -1) @ w1) @ w2,
                        jnp.asarray(w1, jnp.float32), jnp.asarray(w2, jnp.float32))
    x = jnp.asarray(rng.uniform(0, 1, (16,) + SHAPE), jnp.float32)
    return logits_fn, x, jnp.argmax(logits_fn(x), axis=1)


def test_same_result_whatever_batch_sharding_or_loop_mode(mlp, monkeypatch):
    """With random restarts (drawn per image id), an image's result is the same alone, in its
    batch split over two devices, and with the loop fused into one program."""
    logits_fn, x, y = mlp
    kw = dict(eps=0.015, key=KEY, steps=6, n_target_classes=3, restarts=2)
    full = np.asarray(fab.fab_targeted(logits_fn, x, y, **kw))
    broken = np.argmax(logits_fn(full), 1) != y
    assert 0 < broken.sum() < len(y)
    assert np.all(_size(full - x, "linf") <= 0.015)
    part = np.asarray(fab.fab_targeted(logits_fn, x[5:9], y[5:9], ids=jnp.arange(5, 9), **kw))
    np.testing.assert_array_equal(part, full[5:9])
    mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
    rows = NamedSharding(mesh, PartitionSpec("data"))
    sharded = fab.fab_targeted(logits_fn, jax.device_put(x, rows), jax.device_put(y, rows), **kw)
    np.testing.assert_array_equal(sharded, full)
    monkeypatch.setattr(attacks, "LOOPS", "fused")
    monkeypatch.setattr(attacks, "UNROLL_MAX", 0)     # loops, not 6 x 6 unrolled steps, compile
    fused = np.asarray(fab.fab_targeted(logits_fn, x, y, **kw))
    np.testing.assert_allclose(fused, full, atol=1e-6)


def test_bad_settings_raise(mlp):
    logits_fn, x, y = mlp
    with pytest.raises(SrdjaxError, match="n_target_classes"):
        fab.fab_targeted(logits_fn, x, y, eps=0.1, key=KEY, n_target_classes=10)
    with pytest.raises(SrdjaxError, match="norm"):
        fab.fab_targeted(logits_fn, x, y, eps=0.1, key=KEY, norm="l1")
