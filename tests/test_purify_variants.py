"""Purify-time variants of the purification defense: deployed values against the cluster-choice
functions, BPDA gradients against plain autodiff of the linear maps given the choices, and the
selector margins against numpy (a tiny purifier: 3 classes of 2 clusters, 8x8 images)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from srdjax import cluster_choice, patches, purify_variants
from srdjax import purifier as pur
from srdjax.attacks import whole_defense
from srdjax.checks import SrdjaxError
from srdjax.purify_variants import Variant
from tests.test_cluster_choice import setup  # noqa: F401  (the fixture)

Y = jnp.array([0, 1, 2, 0, 1, 2], jnp.int32)


def _defense(setup, variant):
    p, classify, _ = setup
    # A Classifier-like callable: the tiny model's logits.
    return whole_defense.Defense("srd", "purify", variant, classify, p)


def _held_reference(p, classify, x, ks, combine):
    """Plain autodiff (no custom rule) of combine([classifier(clip(L_t(x)) + L_t(u) − L_t(x))]):
    L_t the linear map of purify with clusters ks[t] and OMP's supports at x, so the value is
    the deployed one and the gradient is L_t's, straight through the clip."""
    o = p.options

    def linear(u, k, support):
        low, high = pur._split(p, u)
        return low + pur._project_high(p, k, support, high)

    held = []
    for k in ks:
        high = pur._split(p, x)[1]
        support, _ = pur._supports(p, k, patches._extract(high, o.patch_size, o.stride))
        held.append((k, support, jnp.clip(linear(x, k, support), 0.0, 1.0)))

    def fn(u):
        return combine([classify(out + linear(u, k, s) - linear(x, k, s)) for k, s, out in held])
    return fn


def _grad(fn, x, w):
    return jax.grad(lambda u: jnp.sum(w * fn(u)))(x)


def test_reconstruction_defense_and_its_bpda_gradient(setup):
    p, classify, x = setup
    d = _defense(setup, Variant("reconstruction"))
    purified, k = cluster_choice.purify_by_reconstruction(p, x)
    deployed = whole_defense.defense_logits(d, x)
    np.testing.assert_allclose(deployed, classify(purified), atol=1e-5)
    np.testing.assert_allclose(whole_defense.attack_logits(d, x), deployed, atol=1e-5)
    w = jax.random.normal(jax.random.key(3), deployed.shape)
    got = _grad(lambda u: whole_defense.attack_logits(d, u), x, w)
    expected = _grad(_held_reference(p, classify, x, [k], lambda outs: outs[0]), x, w)
    assert float(jnp.abs(expected).max()) > 0
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6 * float(jnp.abs(expected).max()))
    # A choice other than the nearest cluster's, for at least one image: not the paper's purify.
    assert np.any(np.asarray(k) != np.asarray(pur.choose_cluster(p, x)))


def test_top_classes_defense_and_its_bpda_gradient(setup):
    p, classify, x = setup
    d = _defense(setup, Variant("top_classes", top=2))
    deployed = whole_defense.defense_logits(d, x)
    np.testing.assert_allclose(deployed, cluster_choice.top_class_log_probs(p, classify, x, 2),
                               atol=1e-6)
    np.testing.assert_allclose(whole_defense.attack_logits(d, x), deployed, atol=1e-5)
    ks = cluster_choice.top_class_clusters(p, x, 2)
    mean_softmax = lambda outs: jnp.log(sum(jax.nn.softmax(o, -1) for o in outs) / 2)  # noqa
    w = jax.random.normal(jax.random.key(4), deployed.shape)
    got = _grad(lambda u: whole_defense.attack_logits(d, u), x, w)
    expected = _grad(_held_reference(p, classify, x, [ks[:, 0], ks[:, 1]], mean_softmax), x, w)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6 * float(jnp.abs(expected).max()))
    # top = 1 decides as the paper's purify does, and its gradient is purify_bpda's softmax's.
    one = whole_defense.defense_logits(_defense(setup, Variant("top_classes", top=1)), x)
    np.testing.assert_array_equal(jnp.argmax(one, -1), jnp.argmax(classify(pur.purify(p, x)), -1))


def test_nearest_variant_is_the_paper_defense(setup):
    p, classify, x = setup
    for option in (None, Variant()):
        d = _defense(setup, option)
        np.testing.assert_array_equal(whole_defense.defense_logits(d, x),
                                      classify(pur.purify(p, x)))
        np.testing.assert_array_equal(whole_defense.attack_logits(d, x),
                                      classify(pur.purify_bpda(p, x)))


def _class_min(p, values):
    ids = np.asarray(p.clusters.class_ids)
    return np.stack([values[:, ids == c].min(1) for c in np.unique(ids)], 1)   # [N, classes]


def test_selector_margins_match_numpy_and_the_choice(setup):
    p, _, x = setup
    y = np.asarray(Y)
    errors = _class_min(p, np.asarray(cluster_choice.reconstruction_errors(p, x), np.float64))
    own = np.arange(3)[None] == y[:, None]
    expected = errors[own] - np.where(own, np.inf, errors).min(1)
    got = purify_variants.reconstruction_margin(p, Y, x)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    np.testing.assert_array_equal(purify_variants.true_choice(Variant("reconstruction"), p, x, Y),
                                  expected < 0)
    dist = _class_min(p, np.asarray(purify_variants.latent_distances(p, x), np.float64))
    for top in (1, 2):
        others = np.sort(np.where(own, np.inf, dist), 1)[:, top - 1]
        margin = purify_variants.top_classes_margin(p, Y, x, top=top)
        np.testing.assert_allclose(margin, dist[own] - others, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(
            purify_variants.true_choice(Variant("top_classes", top=top), p, x, Y),
            dist[own] - others < 0)
    np.testing.assert_allclose(purify_variants.top_classes_margin(p, Y, x, top=1),
                               whole_defense.selector_margin(p, Y, x), rtol=1e-6)


@pytest.mark.parametrize("variant", [Variant("reconstruction"), Variant("top_classes", top=2)])
def test_the_selector_attack_raises_the_margin_of_the_variant_s_own_choice(setup, variant):
    p, _, x = setup
    margin = purify_variants.selector_margin(variant)
    before = np.asarray(margin(p, Y, x))
    x_adv = whole_defense.selector_attack(p, x, Y, eps=0.1, key=jax.random.key(0), steps=5,
                                          variant=variant)
    assert float(jnp.abs(x_adv - x).max()) <= 0.1 + 1e-6
    after = np.asarray(margin(p, Y, x_adv))
    assert np.all(after > before), (before, after)


def test_apply_replaces_lam_and_sparsity_and_keeps_the_dictionaries(setup):
    p, _, x = setup
    same, used = purify_variants.apply(p, Variant())
    assert same.options == p.options and used == Variant(lam=p.options.lam,
                                                         sparsity=p.options.sparsity)
    q, used = purify_variants.apply(p, Variant(lam=1.0, sparsity=1))
    assert (q.options.lam, q.options.sparsity, used.lam, used.sparsity) == (1.0, 1, 1.0, 1)
    assert q.dictionaries is p.dictionaries
    assert not np.allclose(pur.purify(q, x), pur.purify(p, x), atol=1e-3)
    with pytest.raises(SrdjaxError, match="sparsity 49 exceeds"):
        purify_variants.apply(p, Variant(sparsity=49))
    with pytest.raises(SrdjaxError, match="purify top 4 exceeds the purifier's 3 classes"):
        purify_variants.apply(p, Variant("top_classes", top=4))
    with pytest.raises(SrdjaxError, match="unknown purify choice 'best'"):
        Variant("best")
