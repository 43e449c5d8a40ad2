"""srdjax.stats against scipy.stats.binomtest (p-values and exact intervals), to 1e-9."""
import numpy as np
import pytest
import scipy.stats

from srdjax import stats
from srdjax.checks import SrdjaxError

CASES = [(0, 1), (1, 1), (0, 10), (3, 10), (10, 10), (44, 200), (1, 1000), (178, 1000),
         (500, 1000), (999, 1000), (0, 1000), (7, 31)]


@pytest.mark.parametrize("k, n", CASES)
@pytest.mark.parametrize("alpha", [0.05, 0.01])
def test_clopper_pearson_is_scipy_exact_interval(k, n, alpha):
    ref = scipy.stats.binomtest(k, n).proportion_ci(confidence_level=1 - alpha, method="exact")
    np.testing.assert_allclose(stats.clopper_pearson(k, n, alpha), [ref.low, ref.high],
                               rtol=0, atol=1e-9)


@pytest.mark.parametrize("b, m", [(0, 1), (1, 1), (6, 13), (7, 13), (24, 31), (0, 40), (3, 3),
                                  (0, 0), (120, 200), (350, 700), (31, 90)])
def test_binomial_test_half_is_scipy_binomtest(b, m):
    ref = 1.0 if m == 0 else scipy.stats.binomtest(b, m, 0.5).pvalue
    assert stats.binomial_test_half(b, m) == pytest.approx(ref, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("seed, n", [(0, 200), (1, 1000), (2, 50)])
def test_mcnemar_and_paired_interval_from_per_image_results(seed, n):
    rng = np.random.default_rng(seed)
    ours, theirs = rng.random(n) < 0.3, rng.random(n) < 0.25
    b, c = int(np.sum(ours & ~theirs)), int(np.sum(~ours & theirs))
    got = stats.paired_difference(ours, theirs)
    assert (got["b"], got["c"], got["n"]) == (b, c, n)
    assert got["difference"] == pytest.approx(ours.mean() - theirs.mean(), abs=1e-15)
    ref = scipy.stats.binomtest(b, b + c, 0.5)
    assert got["p_value"] == pytest.approx(ref.pvalue, rel=1e-9)
    ci = ref.proportion_ci(method="exact")
    m = b + c
    np.testing.assert_allclose([got["low"], got["high"]],
                               [m / n * (2 * ci.low - 1), m / n * (2 * ci.high - 1)], atol=1e-9)
    assert got["low"] <= got["difference"] <= got["high"]


def test_the_interval_excludes_zero_exactly_when_mcnemar_rejects():
    """The conditional interval inverts the exact test: 0 outside it <=> p < alpha."""
    n = 1000
    for b in range(0, 40):
        for c in range(0, 40):
            ours = np.zeros(n, bool)
            theirs = np.zeros(n, bool)
            ours[:b] = True
            theirs[b:b + c] = True
            r = stats.paired_difference(ours, theirs)
            assert (r["p_value"] < 0.05) == (r["low"] > 0 or r["high"] < 0), (b, c, r)


def test_no_discordant_images_give_p_one_and_a_zero_interval():
    same = np.array([True, False, True])
    r = stats.paired_difference(same, same)
    assert (r["b"], r["c"], r["p_value"], r["low"], r["high"]) == (0, 0, 1.0, 0.0, 0.0)


@pytest.mark.parametrize("ours, theirs", [(np.ones(5, bool), np.ones(4, bool)),
                                          (np.ones(5, bool), np.ones(5)),
                                          (np.ones((2, 3), bool), np.ones((2, 3), bool)),
                                          (np.ones(0, bool), np.ones(0, bool))])
def test_unpaired_input_is_refused(ours, theirs):
    with pytest.raises(SrdjaxError, match="two non-empty 1-d boolean arrays of the same length"):
        stats.paired_difference(ours, theirs)


@pytest.mark.parametrize("k, n", [(-1, 5), (6, 5), (1.5, 5), (0, 0)])
def test_bad_counts_are_refused(k, n):
    with pytest.raises(SrdjaxError):
        stats.clopper_pearson(k, n)
