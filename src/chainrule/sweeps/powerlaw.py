"""Power laws L(N) = a * N^-alpha (+ e), fitted in log space, with standard errors.

`fit_power_law`: ordinary least squares of log L on log N (the scaling-law convention:
multiplicative noise), so the exponent is minus the slope and its standard error is the
textbook one, sqrt(s^2 / sum (log N - mean)^2) with s^2 = RSS / (n - 2).

`fit_power_law_offset`: L = e + a * N^-alpha with an irreducible loss e >= 0, by nonlinear
least squares on log L (Levenberg-Marquardt over (e, log a, alpha), started from the best
pure power law of log(L - e) over a grid of e); standard errors from the Gauss-Newton
covariance s^2 (J^T J)^-1 with s^2 = RSS / (n - 3). Three parameters from a handful of points
are loosely determined: read its errors before its values.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class PowerLaw:
    """L = irreducible + a * N^-alpha; the *_se fields are standard errors (nan when the
    points cannot say: too few of them)."""

    a: float
    alpha: float
    alpha_se: float
    n_points: int
    rmse_log: float  # root mean squared residual of log L
    irreducible: float = 0.0
    irreducible_se: float = math.nan
    x_min: float = math.nan  # the range of N the fit saw
    x_max: float = math.nan

    def __call__(self, x) -> np.ndarray:
        return self.irreducible + self.a * np.asarray(x, dtype=float) ** -self.alpha

    def describe(self, name: str = "N") -> str:
        se = "n/a" if math.isnan(self.alpha_se) else f"{self.alpha_se:.3f}"
        power = f"{self.a:.4g} * {name}^{-self.alpha:+.4f}"
        law = f"L = {power}"
        if self.irreducible:
            e_se = "" if math.isnan(self.irreducible_se) else f" ± {self.irreducible_se:.3f}"
            law = f"L = {self.irreducible:.4g}{e_se} + {power}"
        return f"{law}  (alpha = {self.alpha:.4f} ± {se} s.e., {self.n_points} points)"

    def as_dict(self) -> dict[str, float | None]:
        """The fields, with None for an unknown error (strict JSON has no NaN)."""
        return {k: None if isinstance(v, float) and math.isnan(v) else v
                for k, v in dataclasses.asdict(self).items()}


def _checked(x: Sequence[float], y: Sequence[float], min_points: int):
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"x and y must be 1-D and of one length, got shapes {x.shape} and "
                         f"{y.shape}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y)) and np.all(x > 0)
            and np.all(y > 0)):
        raise ValueError("a power-law fit needs finite, positive x and y")
    if len(x) < min_points or len(np.unique(x)) < min_points:
        raise ValueError(f"a power-law fit needs at least {min_points} points with distinct x, "
                         f"got {len(np.unique(x))}")
    return x, y


def fit_power_law(x: Sequence[float], y: Sequence[float]) -> PowerLaw:
    """L = a * N^-alpha by least squares on (log N, log L); needs 2 points (3 for an error)."""
    x, y = _checked(x, y, 2)
    lx, ly = np.log(x), np.log(y)
    n = len(x)
    sxx = float(np.sum((lx - lx.mean()) ** 2))
    slope = float(np.sum((lx - lx.mean()) * (ly - ly.mean())) / sxx)
    intercept = float(ly.mean() - slope * lx.mean())
    rss = float(np.sum((ly - intercept - slope * lx) ** 2))
    alpha_se = math.sqrt(rss / (n - 2) / sxx) if n > 2 else math.nan
    return PowerLaw(a=math.exp(intercept), alpha=-slope, alpha_se=alpha_se, n_points=n,
                    rmse_log=math.sqrt(rss / n), x_min=float(x.min()), x_max=float(x.max()))


def _offset_residuals(theta: np.ndarray, lx: np.ndarray, ly: np.ndarray):
    """Residuals log L - log(e + a N^-alpha) and their Jacobian in (e, log a, alpha)."""
    e, log_a, alpha = theta
    power = np.exp(log_a - alpha * lx)  # a * N^-alpha
    model = e + power
    residual = ly - np.log(model)
    jac = -np.stack([1.0 / model, power / model, -lx * power / model], axis=1)
    return residual, jac


def fit_power_law_offset(x: Sequence[float], y: Sequence[float], *,
                         iterations: int = 200) -> PowerLaw:
    """L = e + a * N^-alpha with 0 <= e < min L; needs 4 points."""
    x, y = _checked(x, y, 4)
    lx, ly = np.log(x), np.log(y)
    n = len(x)
    # Start: the best pure power law of (L - e) over a grid of e in [0, min L).
    best = None
    for e in y.min() * (1.0 - np.geomspace(1.0, 1e-3, 60)):  # from 0 to 0.999 min L
        pure = fit_power_law(x, y - e)
        theta = np.array([e, math.log(pure.a), pure.alpha])
        rss = float(np.sum(_offset_residuals(theta, lx, ly)[0] ** 2))
        if best is None or rss < best[0]:
            best = (rss, theta)
    rss, theta = best
    damping = 1e-3
    for _ in range(iterations):  # Levenberg-Marquardt, e kept in [0, min L)
        residual, jac = _offset_residuals(theta, lx, ly)
        jtj = jac.T @ jac
        step = np.linalg.solve(jtj + damping * np.diag(np.diag(jtj) + 1e-12), -jac.T @ residual)
        trial = theta + step
        trial[0] = min(max(trial[0], 0.0), y.min() * (1 - 1e-9))
        trial_rss = float(np.sum(_offset_residuals(trial, lx, ly)[0] ** 2))
        if trial_rss < rss:
            converged = rss - trial_rss < 1e-14 * max(rss, 1e-300)
            theta, rss, damping = trial, trial_rss, damping / 3
            if converged:
                break
        else:
            damping *= 10
            if damping > 1e12:
                break
    _, jac = _offset_residuals(theta, lx, ly)
    ses = [math.nan] * 3
    if n > 3:
        try:
            cov = rss / (n - 3) * np.linalg.inv(jac.T @ jac)
            ses = [math.sqrt(v) if v >= 0 else math.nan for v in np.diag(cov)]
        except np.linalg.LinAlgError:
            pass
    return PowerLaw(a=math.exp(theta[1]), alpha=float(theta[2]), alpha_se=ses[2], n_points=n,
                    rmse_log=math.sqrt(rss / n), irreducible=float(theta[0]),
                    irreducible_se=ses[0], x_min=float(x.min()), x_max=float(x.max()))


def pareto_frontier(x: Sequence[float], y: Sequence[float]) -> np.ndarray:
    """Indices of the points no other point beats on both counts (less x and less y), by x:
    the compute-efficient frontier of a loss-vs-compute plot."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    order = np.lexsort((y, x))
    keep, best = [], math.inf
    for i in order:
        if y[i] < best:
            keep.append(int(i))
            best = y[i]
    return np.array(keep, dtype=int)
