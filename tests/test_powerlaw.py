"""Power-law fits recover known exponents, and their standard errors mean what they say."""

import math

import numpy as np
import pytest

from chainrule.sweeps.powerlaw import fit_power_law, fit_power_law_offset, pareto_frontier

N = np.geomspace(1e4, 1e7, 10)  # parameter counts of a ladder


def test_exact_points_give_the_exact_law():
    fit = fit_power_law(N, 7.0 * N ** -0.076)
    assert fit.alpha == pytest.approx(0.076, rel=1e-9)
    assert fit.a == pytest.approx(7.0, rel=1e-9)
    assert fit.alpha_se == pytest.approx(0.0, abs=1e-9)
    offset = fit_power_law_offset(N, 1.7 + 30.0 * N ** -0.3)
    assert offset.irreducible == pytest.approx(1.7, rel=1e-6)
    assert offset.alpha == pytest.approx(0.3, rel=1e-6)
    assert offset.a == pytest.approx(30.0, rel=1e-5)


def test_slope_and_error_match_a_reference_regression():
    """Against numpy's least squares with the textbook covariance s^2 (X^T X)^-1."""
    rng = np.random.default_rng(1)
    y = 3.0 * N ** -0.2 * np.exp(rng.normal(0.0, 0.05, N.size))
    fit = fit_power_law(N, y)
    design = np.stack([np.ones(N.size), np.log(N)], axis=1)
    coef, rss, *_ = np.linalg.lstsq(design, np.log(y), rcond=None)
    cov = rss[0] / (N.size - 2) * np.linalg.inv(design.T @ design)
    assert fit.alpha == pytest.approx(-coef[1], rel=1e-9)
    assert fit.a == pytest.approx(math.exp(coef[0]), rel=1e-9)
    assert fit.alpha_se == pytest.approx(math.sqrt(cov[1, 1]), rel=1e-9)


def test_standard_error_covers_the_true_exponent_at_its_nominal_rate():
    """Over 400 noisy ladders the exponent lies within 2 s.e. about 92% of the time (the t
    distribution with 8 degrees of freedom), and the s.e. matches the estimates' spread."""
    rng = np.random.default_rng(0)
    alpha, hits, estimates, errors = 0.095, 0, [], []
    for _ in range(400):
        y = 5.0 * N ** -alpha * np.exp(rng.normal(0.0, 0.02, N.size))
        fit = fit_power_law(N, y)
        hits += abs(fit.alpha - alpha) <= 2 * fit.alpha_se
        estimates.append(fit.alpha)
        errors.append(fit.alpha_se)
    assert 0.87 <= hits / 400 <= 0.97
    assert np.std(estimates) == pytest.approx(np.mean(errors), rel=0.15)
    assert np.mean(estimates) == pytest.approx(alpha, abs=3 * np.std(estimates) / 20)


def test_irreducible_term_is_recovered_from_noisy_points():
    rng = np.random.default_rng(3)
    x = np.geomspace(1e4, 1e8, 12)
    y = 1.2 + 40.0 * x ** -0.35 * np.exp(rng.normal(0.0, 0.01, x.size))
    fit = fit_power_law_offset(x, y)
    assert abs(fit.alpha - 0.35) <= 3 * fit.alpha_se
    assert abs(fit.irreducible - 1.2) <= 3 * fit.irreducible_se
    assert fit.alpha_se < 0.05 and fit.irreducible_se < 0.1
    pure = fit_power_law(x, y)  # a pure power law through the same points flattens out
    assert pure.alpha < 0.35 and pure.rmse_log > fit.rmse_log


def test_pareto_frontier_matches_brute_force():
    rng = np.random.default_rng(4)
    x, y = rng.uniform(1, 100, 40), rng.uniform(1, 5, 40)
    brute = [i for i in range(40)
             if not any((x[j] <= x[i] and y[j] < y[i]) or (x[j] < x[i] and y[j] <= y[i])
                        for j in range(40))]
    assert sorted(pareto_frontier(x, y).tolist()) == sorted(brute)


@pytest.mark.parametrize("x, y, match", [
    ([1e3, 1e4], [2.0, -1.0], "positive"),
    ([1e3, 1e3, 1e3], [2.0, 1.9, 1.8], "distinct x"),
    ([1e3, 1e4], [2.0], "one length"),
])
def test_bad_points_are_refused(x, y, match):
    with pytest.raises(ValueError, match=match):
        fit_power_law(x, y)


def test_two_points_fit_without_an_error():
    fit = fit_power_law([1e3, 1e5], [2.0, 1.0])
    assert fit.alpha == pytest.approx(math.log(2) / math.log(100))
    assert math.isnan(fit.alpha_se) and "n/a" in fit.describe()
