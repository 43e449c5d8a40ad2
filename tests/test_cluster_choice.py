"""The purifier ablation's cluster choices against brute-force references."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from srdjax import cluster_choice, clusters, frequency, resynthesis, purifier as pur
from srdjax.checks import SrdjaxError
from srdjax.models import apply_model, create_model, split_model

PATCH, STRIDE, SPARSITY = 4, 2, 3


@pytest.fixture(scope="module")
def setup():
    """A purifier of a small random model with 3 classes of 2 clusters each and random unit
    dictionaries, a classifier, and 6 images."""
    graphdef, params, stats = split_model(create_model("small_cnn", 3, 0, widths=(4, 6)))
    rng = np.random.default_rng(0)
    k = 6
    cs = clusters.ClusterSet(
        means=jnp.asarray(rng.normal(size=(k, 6)) * 0.3, jnp.float32),
        stds=jnp.ones((k, 6), jnp.float32), class_ids=jnp.array([0, 0, 1, 1, 2, 2], jnp.int32),
        index_in_class=jnp.array([0, 1] * 3, jnp.int32), counts=jnp.full(k, 5, jnp.int32))
    d = rng.normal(size=(k, 24, PATCH * PATCH * 3))
    d /= np.linalg.norm(d, axis=-1, keepdims=True)
    options = pur.PurifyOptions(image_size=(8, 8), patch_size=PATCH, stride=STRIDE,
                                sparsity=SPARSITY, pad=4, image_chunk=3)
    p = pur.make_purifier(graphdef, params, stats, cs, jnp.asarray(d, jnp.float32), options)
    classify = lambda v: apply_model(graphdef, params, stats, v)[0]
    x = jax.random.uniform(jax.random.key(1), (6, 8, 8, 3), minval=0.1, maxval=0.9)
    return p, classify, x


def _split(p, x):
    return frequency.split(x, method="tikhonov", lam=p.options.lam, pad=p.options.pad)


def _rebuild(p, k, high):
    return np.asarray(resynthesis.reconstruct_high(p.dictionaries, jnp.asarray(k, jnp.int32),
                                                  high, PATCH, SPARSITY, stride=STRIDE))


def test_reconstruction_choice_is_the_dictionary_of_least_error(setup):
    p, _, x = setup
    low, high = _split(p, x)
    n, k_all = x.shape[0], p.dictionaries.shape[0]
    rebuilt = [_rebuild(p, np.full(n, k), high) for k in range(k_all)]   # one cluster at a time
    errors = np.stack([((r - np.asarray(high)) ** 2).sum(axis=(1, 2, 3)) for r in rebuilt], 1)
    np.testing.assert_allclose(cluster_choice.reconstruction_errors(p, x), errors, rtol=1e-4)
    out, chosen = cluster_choice.purify_by_reconstruction(p, x)
    best = errors.argmin(1)
    np.testing.assert_array_equal(chosen, best)
    assert len(set(best.tolist())) > 1        # the images do not all pick one dictionary
    expected = np.clip(np.asarray(low) + np.stack([rebuilt[b][i] for i, b in enumerate(best)]),
                       0, 1)
    np.testing.assert_allclose(out, expected, atol=1e-5)


def _ranked_classes(p, x):
    """Per image, (class, its nearest cluster) sorted by that cluster's distance."""
    dist = np.asarray(clusters.cluster_distances(p.latent(x), p.clusters))
    ids = np.asarray(p.clusters.class_ids)
    out = []
    for row in dist:
        best = {c: np.flatnonzero(ids == c)[np.argmin(row[ids == c])] for c in np.unique(ids)}
        out.append(sorted(best.values(), key=lambda j: (row[j], j)))
    return np.array(out)


def test_top_class_clusters_are_each_top_class_nearest_cluster(setup):
    p, _, x = setup
    ranked = _ranked_classes(p, x)
    for top in (1, 2, 3):
        np.testing.assert_array_equal(cluster_choice.top_class_clusters(p, x, top),
                                      ranked[:, :top])
    # top = 1 is the paper's choice: the nearest cluster of any class.
    np.testing.assert_array_equal(ranked[:, 0], pur.choose_cluster(p, x))
    with pytest.raises(SrdjaxError, match="at most the 3 classes"):
        cluster_choice.top_class_clusters(p, x, 4)


def test_top_class_combination_averages_the_probabilities_of_each_rebuild(setup):
    p, classify, x = setup
    low, high = _split(p, x)
    ranked = _ranked_classes(p, x)
    probs = [jax.nn.softmax(classify(jnp.clip(low + _rebuild(p, ranked[:, r], high), 0, 1)))
             for r in range(2)]
    expected = np.log((np.asarray(probs[0]) + np.asarray(probs[1])) / 2)
    got = jax.jit(cluster_choice.top_class_log_probs, static_argnums=(1, 3))(p, classify, x, 2)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    one = cluster_choice.top_class_log_probs(p, classify, x, 1)
    np.testing.assert_allclose(one, jax.nn.log_softmax(classify(pur.purify(p, x))), atol=1e-5)
