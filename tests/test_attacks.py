"""Attacks against known answers: the analytic worst case of linear models, the ε-ball and [0, 1],
the FGSM <= PGD <= APGD order on a small trained CNN, Square against the linear analysis."""
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.special
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jax.tree_util import Partial

from srdjax import attacks, defenses
from srdjax.checks import SrdjaxError

DATA_DIR = Path(os.environ.get(
    "SRDJAX_DATA_DIR", Path(__file__).resolve().parents[1].parent / "shared/data/cifar10"))
SHAPE = (8, 8, 3)
KEY = jax.random.key(0)


def _linear(weights, bias=None):
    w = jnp.asarray(weights, jnp.float32)
    b = jnp.zeros(w.shape[1]) if bias is None else jnp.asarray(bias, jnp.float32)
    return Partial(lambda w, b, x: x.reshape(x.shape[0], -1) @ w + b, w, b)


@pytest.fixture(scope="module")
def linear2():
    """Two-class linear model, interior images (no [0, 1] clipping at the ε used) and labels."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(int(np.prod(SHAPE)), 2)) * 0.05
    x = jnp.asarray(rng.uniform(0.3, 0.7, (32,) + SHAPE), jnp.float32)
    logits_fn = _linear(w)
    y = jnp.argmax(logits_fn(x), axis=-1)
    # Per sample, (w_wrong - w_true) as an image: the direction that lowers the margin fastest.
    diff = (w[:, 1 - np.asarray(y)] - w[:, np.asarray(y)]).T.reshape(x.shape)
    return logits_fn, x, y, diff


def _margin(logits_fn, x, y):
    logits = np.array(logits_fn(x))
    true = logits[np.arange(len(y)), y]
    logits[np.arange(len(y)), y] = -np.inf
    return true - logits.max(axis=1)


def test_losses_match_numpy():
    logits = np.random.default_rng(1).normal(size=(6, 5)).astype(np.float32)
    y, t = np.array([0, 1, 2, 3, 4, 0]), np.array([1, 2, 3, 4, 0, 3])
    true = logits[np.arange(6), y]
    other = np.where(np.eye(5, dtype=bool)[y], -np.inf, logits).max(axis=1)
    top = -np.sort(-logits, axis=1)
    expected = {
        "ce": scipy.special.logsumexp(logits, axis=1) - true,
        "margin": np.minimum(other - true, 0.5),
        "dlr": -(true - other) / (top[:, 0] - top[:, 2]),
        "targeted_dlr": -(true - logits[np.arange(6), t])
                        / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3])),
    }
    got = {
        "ce": attacks.ce_loss(logits, y), "margin": attacks.margin_loss(logits, y, 0.5),
        "dlr": attacks.dlr_loss(logits, y), "targeted_dlr": attacks.targeted_dlr_loss(logits, y, t),
    }
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_linf_attacks_reach_the_analytic_worst_case(linear2):
    logits_fn, x, y, diff = linear2
    eps = 0.03
    worst = x + eps * jnp.sign(diff)
    results = {
        "fgsm": attacks.fgsm(logits_fn, x, y, eps=eps),
        "pgd": attacks.pgd(logits_fn, x, y, eps=eps, key=KEY, steps=10, restarts=2),
        "cw": attacks.cw(logits_fn, x, y, eps=eps, key=KEY, steps=10),
        "apgd": attacks.apgd(logits_fn, x, y, eps=eps, key=KEY, steps=10, best_loss=True),
    }
    for name, x_adv in results.items():
        # Exact up to one float32 rounding of x + eps.
        np.testing.assert_allclose(x_adv, worst, atol=1e-6, rtol=0, err_msg=name)
    # A whole defense as logits_fn: JPEG masks the gradient (FGSM does not move); with BPDA's
    # straight-through gradient the attack is the analytic one again.
    masked = lambda u: logits_fn(defenses.jpeg(u))
    np.testing.assert_array_equal(attacks.fgsm(masked, x, y, eps=eps), x)
    through = lambda u: logits_fn(defenses.bpda(defenses.jpeg)(u))
    np.testing.assert_allclose(attacks.fgsm(through, x, y, eps=eps), worst, atol=1e-6)
    # The worst case lowers the margin by exactly eps * ||w_true - w_wrong||_1.
    drop = _margin(logits_fn, x, y) - _margin(logits_fn, results["pgd"], y)
    np.testing.assert_allclose(drop, eps * np.abs(diff).sum(axis=(1, 2, 3)), rtol=1e-4)


def test_l2_attack_reaches_eps_along_the_weight_difference(linear2):
    logits_fn, x, y, diff = linear2
    eps = 0.5
    worst = x + eps * diff / np.sqrt((diff ** 2).sum(axis=(1, 2, 3), keepdims=True))
    one_step = attacks.pgd(logits_fn, x, y, eps=eps, key=KEY, steps=1, step_size=eps, norm="l2",
                           random_start=False)
    np.testing.assert_allclose(one_step, worst, atol=1e-6)
    # From a random start, projections shrink the off-direction part by ~2/3 a step; near the
    # optimum the loss is flat to second order in that part, so the best iterate kept can sit
    # ~1e-4 off while its margin drop is the analytic eps * ||w_true - w_wrong||_2 to 1e-5.
    many = attacks.pgd(logits_fn, x, y, eps=eps, key=KEY, steps=50, step_size=eps / 2, norm="l2")
    np.testing.assert_allclose(many, worst, atol=1e-3)
    drop = _margin(logits_fn, x, y) - _margin(logits_fn, many, y)
    np.testing.assert_allclose(drop, eps * np.sqrt((diff ** 2).sum(axis=(1, 2, 3))), rtol=1e-5)
    np.testing.assert_allclose(attacks.fgsm(logits_fn, x, y, eps=eps, norm="l2"), worst, atol=1e-6)


def test_targeted_attacks_reach_the_target(linear2):
    logits_fn, x, y, diff = linear2
    # Two classes: targeting the other class is the untargeted worst case.
    np.testing.assert_allclose(attacks.fgsm(logits_fn, x, y, eps=0.03, target=1 - y),
                               x + 0.03 * jnp.sign(diff), atol=1e-6)
    rng = np.random.default_rng(2)
    logits_fn5 = _linear(rng.normal(size=(int(np.prod(SHAPE)), 5)))
    y5 = jnp.argmax(logits_fn5(x), axis=-1)
    target = (y5 + jnp.asarray(rng.integers(1, 5, len(y5)))) % 5
    for name, attack in [("pgd", attacks.pgd), ("cw", attacks.cw), ("apgd", attacks.apgd)]:
        x_adv = attack(logits_fn5, x, y5, eps=0.25, key=KEY, steps=20, target=target)
        np.testing.assert_array_equal(jnp.argmax(logits_fn5(x_adv), -1), target, err_msg=name)
    # (On 8x8 images the official schedule keeps squares too large to steer for the first 200
    # queries; stretched to the budget, 300 queries reach every target.)
    x_adv = attacks.square(logits_fn5, x, y5, eps=0.25, key=KEY, n_queries=300, target=target,
                           rescale_schedule=True)
    np.testing.assert_array_equal(jnp.argmax(logits_fn5(x_adv), -1), target)


def test_square_succeeds_exactly_where_the_linear_analysis_allows():
    rng = np.random.default_rng(6)
    w = rng.normal(size=(int(np.prod(SHAPE)), 2)) * 0.05
    d = w[:, 1] - w[:, 0]
    # Images spread on both sides of the decision boundary (the bias puts 0.5 on it), so margins
    # range from ~0 to 0.15 * ||d||_1, away from [0, 1] clipping.
    a = rng.uniform(-1, 1, (48, 1))
    x = 0.5 + 0.15 * a * np.sign(d) + rng.uniform(-0.03, 0.03, (48, d.size))
    x = jnp.asarray(x.reshape((48,) + SHAPE), jnp.float32)
    logits_fn = _linear(w, [0.0, -0.5 * d.sum()])
    y = jnp.argmax(logits_fn(x), axis=-1)
    margin = _margin(logits_fn, x, y)
    reach = np.abs(d).sum()  # margin drop per unit of eps at the worst vertex
    eps = float(np.median(margin / reach))
    # The analytic attack succeeds with 40% to spare: Square as the official code runs it never
    # moves the last row and column on its own (its positions stop at H - s - 1), a quarter of
    # an 8x8 image, and reaches squares of one pixel, which d's per-pixel signs need, only after
    # 1,000 iterations.
    possible = margin < 0.6 * eps * reach
    impossible = margin > eps * reach        # nothing in the ball succeeds
    assert possible.sum() >= 10 and impossible.sum() >= 10
    x_adv = attacks.square(logits_fn, x, y, eps=eps, key=KEY, n_queries=2000)
    fooled = np.asarray(jnp.argmax(logits_fn(x_adv), -1) != y)
    assert fooled[possible].all()
    assert not fooled[impossible].any()
    assert np.abs(np.asarray(x_adv - x)).max() <= eps + 1e-6


def _tanh_net(seed, classes=10):
    rng = np.random.default_rng(seed)
    w1 = jnp.asarray(rng.normal(size=(int(np.prod(SHAPE)), 32)) * 0.3, jnp.float32)
    w2 = jnp.asarray(rng.normal(size=(32, classes)), jnp.float32)
    return Partial(lambda w1, w2, x: jnp.tanh(x.reshape(x.shape[0], -1) @ w1 - 0.5) @ w2, w1, w2)


def test_every_attack_stays_in_the_ball_and_the_box():
    rng = np.random.default_rng(3)
    x = rng.uniform(0, 1, (16,) + SHAPE).astype(np.float32)
    x[:, :2] = np.round(x[:, :2])  # pixels at 0 and 1, where clipping matters
    x = jnp.asarray(x)
    logits_fn = _tanh_net(4)
    y = jnp.argmax(logits_fn(x), -1)
    linf, l2 = 0.1, 1.5
    runs = {
        ("fgsm", "linf"): attacks.fgsm(logits_fn, x, y, eps=linf),
        ("fgsm", "l2"): attacks.fgsm(logits_fn, x, y, eps=l2, norm="l2"),
        ("pgd", "linf"): attacks.pgd(logits_fn, x, y, eps=linf, key=KEY, steps=5, restarts=2),
        ("pgd", "l2"): attacks.pgd(logits_fn, x, y, eps=l2, key=KEY, steps=5, norm="l2"),
        ("apgd-dlr", "linf"): attacks.apgd(logits_fn, x, y, eps=linf, key=KEY, steps=8, loss="dlr"),
        ("apgd-ce", "l2"): attacks.apgd(logits_fn, x, y, eps=l2, key=KEY, steps=8, norm="l2"),
        ("apgd-t", "linf"): attacks.apgd_targeted(logits_fn, x, y, eps=linf, key=KEY, steps=8,
                                                  n_target_classes=2),
        ("apgd-t", "l2"): attacks.apgd_targeted(logits_fn, x, y, eps=l2, key=KEY, steps=8,
                                                norm="l2", n_target_classes=2),
        ("square", "linf"): attacks.square(logits_fn, x, y, eps=linf, key=KEY, n_queries=50),
        ("square", "l2"): attacks.square(logits_fn, x, y, eps=l2, key=KEY, n_queries=50,
                                         norm="l2"),
    }
    # (CW and pgd_on_loss share PGD's loop and projections.)
    for (name, norm), x_adv in runs.items():
        assert x_adv.shape == x.shape and x_adv.dtype == x.dtype, name
        delta = np.asarray(x_adv - x).reshape(len(x), -1)
        assert np.asarray(x_adv).min() >= 0 and np.asarray(x_adv).max() <= 1, name
        if norm == "linf":
            assert np.abs(delta).max() <= linf + 1e-6, name
        else:
            assert np.linalg.norm(delta, axis=1).max() <= l2 * (1 + 1e-5), name
        assert np.abs(delta).max() > 0, name  # the attack moved
    # eps = 0 returns the images themselves.
    np.testing.assert_array_equal(attacks.pgd(logits_fn, x, y, eps=0.0, key=KEY, steps=3), x)



def test_an_images_result_does_not_depend_on_its_batch():
    """Random draws are keyed by (key, image id): a batch attacked whole, in halves, or permuted
    (each image with its id) gives every image exactly the same result."""
    rng = np.random.default_rng(8)
    logits_fn = _tanh_net(4)
    x = jnp.asarray(rng.uniform(0, 1, (16,) + SHAPE), jnp.float32)
    y = jnp.argmax(logits_fn(x), -1)
    ids, perm = jnp.arange(16), rng.permutation(16)
    runs = {
        "pgd": lambda u, v, i: attacks.pgd(logits_fn, u, v, eps=0.05, key=KEY, steps=3,
                                           restarts=2, ids=i),
        "pgd-l2": lambda u, v, i: attacks.pgd(logits_fn, u, v, eps=0.5, key=KEY, steps=3,
                                              norm="l2", ids=i),
        "apgd": lambda u, v, i: attacks.apgd(logits_fn, u, v, eps=0.05, key=KEY, steps=5, ids=i),
        "square": lambda u, v, i: attacks.square(logits_fn, u, v, eps=0.05, key=KEY,
                                                 n_queries=20, ids=i),
    }
    for name, run in runs.items():
        whole = np.asarray(run(x, y, None))
        assert np.abs(whole - np.asarray(x)).max() > 0, name
        halves = np.concatenate([run(x[:8], y[:8], ids[:8]), run(x[8:], y[8:], ids[8:])])
        np.testing.assert_array_equal(halves, whole, err_msg=name)
        np.testing.assert_array_equal(np.asarray(run(x[perm], y[perm], ids[perm])), whole[perm],
                                      err_msg=name)

def test_pgd_on_loss_maximises_each_samples_own_loss(linear2):
    _, x, _, _ = linear2
    direction = jnp.asarray(np.random.default_rng(5).normal(size=x.shape), jnp.float32)
    loss_fn = lambda u: jnp.sum(u * direction, axis=(1, 2, 3))
    x_adv = attacks.pgd_on_loss(loss_fn, x, eps=0.05, key=KEY, steps=8, step_size=0.02)
    np.testing.assert_allclose(x_adv, x + 0.05 * jnp.sign(direction), atol=1e-6)
    # No gradient leaks through the result (stop_gradient at the end).
    grad = jax.grad(lambda u: attacks.pgd_on_loss(loss_fn, u, eps=0.05, key=KEY, steps=2).sum())(x)
    np.testing.assert_array_equal(grad, jnp.zeros_like(x))


@pytest.fixture(scope="module")
def trained_cnn():
    """A small CNN trained for 300 Adam steps on 2,000 CIFAR-10 training images (~4 s), and the
    test images among the first 512 that it classifies correctly."""
    train_path, test_path = DATA_DIR / "train_1.npz", DATA_DIR / "test.npz"
    if not train_path.exists():
        pytest.skip(f"CIFAR-10 not found at {DATA_DIR}")
    with np.load(train_path, allow_pickle=False) as data:
        x, y = data["x"][:2000].astype(np.float32) / 255, data["y"][:2000].astype(np.int32)
    with np.load(test_path, allow_pickle=False) as data:
        xt, yt = data["x"][:512].astype(np.float32) / 255, data["y"][:512].astype(np.int32)

    def conv(h, w):
        return jax.lax.conv_general_dilated(h, w, (2, 2), "SAME",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def apply(p, images):
        h = jax.nn.relu(conv(images - 0.5, p["c1"]))
        h = jax.nn.relu(conv(h, p["c2"]))
        return h.reshape(h.shape[0], -1) @ p["w"] + p["b"]

    k = jax.random.split(jax.random.key(0), 3)
    params = {"c1": jax.random.normal(k[0], (3, 3, 3, 16)) * np.sqrt(2 / 27),
              "c2": jax.random.normal(k[1], (3, 3, 16, 32)) * np.sqrt(2 / 144),
              "w": jax.random.normal(k[2], (2048, 10)) * np.sqrt(0.5 / 2048), "b": jnp.zeros(10)}
    tx = optax.adam(2e-3)

    @jax.jit
    def step(p, state, xb, yb):
        grads = jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
            apply(p, xb), yb).mean())(p)
        updates, state = tx.update(grads, state, p)
        return optax.apply_updates(p, updates), state

    state, rng = tx.init(params), np.random.default_rng(0)
    for _ in range(300):
        idx = rng.integers(0, len(x), 64)
        params, state = step(params, state, x[idx], y[idx])
    logits_fn = Partial(apply, params)
    correct = np.asarray(jnp.argmax(logits_fn(xt), -1)) == yt
    assert correct.mean() > 0.3  # it learned something (chance is 0.1)
    return logits_fn, jnp.asarray(xt[correct]), jnp.asarray(yt[correct])


def test_success_rates_order_fgsm_pgd_apgd(trained_cnn):
    logits_fn, x, y = trained_cnn
    eps = 2 / 255

    def fooled(x_adv):
        return np.asarray(jnp.argmax(logits_fn(x_adv), -1) != y)

    x_fgsm = attacks.fgsm(logits_fn, x, y, eps=eps)
    x_pgd = attacks.pgd(logits_fn, x, y, eps=eps, key=KEY, steps=10)
    apgd = fooled(attacks.apgd(logits_fn, x, y, eps=eps, key=KEY, steps=10)) | fooled(
        attacks.apgd(logits_fn, x, y, eps=eps, key=KEY, steps=10, loss="dlr"))
    rates = fooled(x_fgsm).mean(), fooled(x_pgd).mean(), apgd.mean()
    assert 0.2 < rates[0] <= rates[1] <= rates[2], rates
    # PGD climbs the loss that FGSM's single step only estimates.
    ce = lambda x_adv: float(attacks.ce_loss(logits_fn(x_adv), y).mean())
    assert ce(x_fgsm) < ce(x_pgd)


def test_sharded_batch_and_no_retracing(trained_cnn):
    logits_fn, x, y = trained_cnn
    x, y = x[:64], y[:64]
    reference = attacks.pgd(logits_fn, x, y, eps=2 / 255, key=KEY, steps=3)
    mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
    batch = NamedSharding(mesh, PartitionSpec("data"))
    xs, ys = jax.device_put(x, batch), jax.device_put(y, batch)
    sharded = attacks.pgd(logits_fn, xs, ys, eps=2 / 255, key=KEY, steps=3)
    np.testing.assert_allclose(sharded, reference, atol=1e-6)
    assert sharded.sharding.is_equivalent_to(xs.sharding, 4)
    # Under the caller's jit nothing goes through the host.
    run = jax.jit(lambda u, v, k: attacks.square(logits_fn, u, v, eps=2 / 255, key=k, n_queries=5))
    key = jax.device_put(KEY, NamedSharding(mesh, PartitionSpec()))
    run(xs, ys, key)
    with jax.transfer_guard("disallow"):
        run(xs, ys, key).block_until_ready()
    # The same function object: new eps, key and images reuse the compiled attack.
    traces = []
    counted = lambda u: (traces.append(1), logits_fn(u))[1]
    attacks.pgd(counted, x, y, eps=1 / 255, key=KEY, steps=2)
    first = len(traces)
    attacks.pgd(counted, x[::-1], y[::-1], eps=3 / 255, key=jax.random.key(9), steps=2)
    assert first > 0 and len(traces) == first


def test_apgd_halves_its_step_to_an_interior_maximum():
    # CE of this 2-class model peaks where the image mean is 0.5, inside the ball: a fixed sign
    # step oscillates around it at about half its size; APGD starts at 2 eps and must halve at
    # (nearly) every one of its 8 checkpoints to end within 2 eps / 2^7 of it.
    def logits_fn(x):
        z = 50 * (x.mean(axis=(1, 2, 3)) - 0.5) ** 2
        return jnp.stack([z, jnp.zeros_like(z)], -1)
    rng = np.random.default_rng(7)
    offset = rng.choice([-1, 1], (16, 1, 1, 1)) * rng.uniform(0.02, 0.06, (16, 1, 1, 1))
    x = jnp.asarray(np.clip(0.5 + offset + rng.uniform(-0.1, 0.1, (16,) + SHAPE), 0, 1),
                    jnp.float32)
    eps = 0.1
    x_adv = attacks.apgd(logits_fn, x, jnp.zeros(16, jnp.int32), eps=eps, key=KEY, steps=100,
                         best_loss=True)
    assert np.abs(np.asarray(x_adv.mean(axis=(1, 2, 3))) - 0.5).max() < 2 * eps / 2 ** 7


def _official_checkpoints(n_iter):
    """The official APGD loop's bookkeeping (autopgd_base.py), transcribed: after which
    iterations it checks conditions 1 and 2."""
    k = max(int(0.22 * n_iter), 1)
    n_iter_min, size_decr = max(int(0.06 * n_iter), 1), max(int(0.03 * n_iter), 1)
    out, counter3 = [], 0
    for i in range(n_iter):
        counter3 += 1
        if counter3 == k:
            out.append(i + 1)
            k = max(k - size_decr, n_iter_min)
            counter3 = 0
    return out


def test_apgd_checkpoints_and_square_schedule():
    # The official code for 100 iterations (the paper's p_j = .22, .41, ... give the same).
    assert attacks.apgd_checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    for steps in (1, 5, 10, 37, 250, 1000):
        assert attacks.apgd_checkpoints(steps) == _official_checkpoints(steps), steps
    # Andriushchenko et al. 2020, p_init 0.05 on 32x32: side round(sqrt(p * 1024)), p halving
    # after iterations 10, 50, 200, ... (not rescaled to the budget, as AutoAttack runs it).
    sizes = attacks.square_sizes(10000, 0.05, 32, 32)
    assert sizes[0] == 7 and sizes[11] == 5 and sizes[51] == 4 and sizes[9999] == 1
    assert (np.diff(sizes) <= 0).all() and len(sizes) == 10000


def test_registry():
    pgd20 = attacks.attack_by_name("pgd20")
    assert pgd20.func is attacks.pgd and pgd20.keywords["steps"] == 20
    assert attacks.attack_by_name("apgd-dlr").keywords["loss"] == "dlr"
    assert attacks.attack_by_name("pgd100", restarts=5).keywords == {"steps": 100, "restarts": 5}
    with pytest.raises(SrdjaxError, match="unknown attack 'pgd7'.*fgsm.*apgd-ce.*square"):
        attacks.attack_by_name("pgd7")


def test_bad_inputs(linear2):
    logits_fn, x, y, _ = linear2
    cases = [
        (lambda: attacks.pgd(logits_fn, x, y, eps=-0.1, key=KEY), "eps must be a finite number"),
        (lambda: attacks.pgd(logits_fn, x, y, eps=0.1, key=KEY, steps=0), "steps must be an int"),
        (lambda: attacks.apgd(logits_fn, x, y, eps=0.1, key=KEY, steps=0), "steps must be"),
        (lambda: attacks.fgsm(logits_fn, x * 3, y, eps=0.1), r"must lie in \[0, 1\]"),
        (lambda: attacks.pgd(logits_fn, x, y[:5], eps=0.1, key=KEY), "labels must have shape"),
        (lambda: attacks.square(logits_fn, x, y, eps=0.1, key=KEY, target=y[:3]), "target labels"),
        (lambda: attacks.pgd(logits_fn, x, y, eps=0.1, key=KEY, norm="l1"), "unknown norm 'l1'"),
        (lambda: attacks.pgd(logits_fn, x, y, eps=0.1, key=KEY, loss="hinge"), "unknown loss"),
        (lambda: attacks.apgd(logits_fn, x, y, eps=0.1, key=KEY, loss="margin"), "unknown loss"),
        (lambda: attacks.square(logits_fn, x, y, eps=0.1, key=KEY, n_queries=0), "n_queries"),
        (lambda: attacks.pgd(logits_fn, x, y, eps=0.1, key=None), "key must be"),
        (lambda: attacks.pgd("model", x, y, eps=0.1, key=KEY), "logits_fn must be a callable"),
        (lambda: attacks.apgd(logits_fn, x, y, eps=0.1, key=KEY, loss="dlr"), "at least 3 classes"),
    ]
    for call, message in cases:
        with pytest.raises(SrdjaxError, match=message):
            call()


@pytest.mark.parametrize("name", ["fgsm", "pgd", "apgd", "square"])
def test_host_loops_equal_one_compiled_program(trained_cnn, name, monkeypatch):
    # Host loops (one jitted step per iteration, the CPU default) and one fused program (a
    # fori_loop: 25 steps and 30 queries are past UNROLL_MAX) run the same iterations.
    logits_fn, x, y = trained_cnn
    x, y = x[:32], y[:32]
    run = {"fgsm": lambda: attacks.fgsm(logits_fn, x, y, eps=2 / 255),
           "pgd": lambda: attacks.pgd(logits_fn, x, y, eps=2 / 255, key=KEY, steps=25,
                                      restarts=2, loss="dlr"),
           "apgd": lambda: attacks.apgd(logits_fn, x, y, eps=2 / 255, key=KEY, steps=25),
           "square": lambda: attacks.square(logits_fn, x, y, eps=4 / 255, key=KEY,
                                            n_queries=30)}[name]
    out = {}
    for mode in ("host", "fused"):
        monkeypatch.setattr(attacks, "LOOPS", mode)
        out[mode] = np.asarray(run())
    assert np.abs(out["host"] - x).max() > 0  # it moved
    # Float reassociation between the two programs may flip a sign step at a near-zero
    # gradient; all but a few pixels agree exactly and none by more than 2 ε.
    differ = np.abs(out["host"] - out["fused"]) > 1e-6
    assert differ.mean() < 0.01, differ.mean()
    np.testing.assert_allclose(out["host"], out["fused"], atol=2 * 4 / 255)


def test_square_rebatched_to_the_unfooled_rows_gives_the_same_images(trained_cnn, monkeypatch):
    """Host loops re-batch Square to the rows it has not fooled yet; draws are keyed per row, so
    the images are those of the whole batch run to the end (as one fused program runs it), and
    the later queries really ran on fewer rows."""
    logits_fn, x, y = trained_cnn
    x, y = x[:32], y[:32]
    sizes = []
    host_apply = attacks.loops._host_apply

    def recording(rule, settings, consts, *args):
        if rule is attacks.square_attack._square_body:
            sizes.append(consts.x.shape[0])
        return host_apply(rule, settings, consts, *args)

    out = {}
    for mode, every in (("fused", 10 ** 9), ("host", 4)):
        monkeypatch.setattr(attacks, "LOOPS", mode)
        monkeypatch.setattr(attacks, "SQUARE_COMPACT_EVERY", every)
        monkeypatch.setattr(attacks.loops, "_host_apply", recording)
        out[mode] = np.asarray(attacks.square(logits_fn, x, y, eps=8 / 255, key=KEY,
                                              n_queries=40))
    assert sizes[0] == 32 and min(sizes) < 32, sizes       # it re-batched
    fooled = np.asarray(jnp.argmax(logits_fn(out["host"]), -1) != y)
    assert 0 < fooled.sum() < 32
    # As in test_host_loops_equal_one_compiled_program: the same images up to float
    # reassociation flipping a rare near-tie.
    differ = np.abs(out["host"] - out["fused"]) > 1e-6
    assert differ.mean() < 0.01, differ.mean()
    np.testing.assert_allclose(out["host"], out["fused"], atol=2 * 8 / 255)


def test_bad_loop_mode(linear2, monkeypatch):
    logits_fn, x, y, _ = linear2
    monkeypatch.setattr(attacks, "LOOPS", "sometimes")
    with pytest.raises(SrdjaxError, match="LOOPS must be"):
        attacks.pgd(logits_fn, x, y, eps=0.01, key=KEY, steps=2)
