"""Scaling-law fits: Chinchilla's approach 3 (the way Epoch AI's replication fits it) and approach 2.

Approach 3 fits ``L(N, D) = E + A / N^alpha + B / D^beta`` by minimising the Huber loss (delta 1e-3) of

    r_i = LSE(a - alpha log N_i, b - beta log D_i, e) - log L_i,      A = e^a, B = e^b, E = e^e

with L-BFGS-B started from a grid (Chinchilla's: alpha, beta in {0, 0.5, ..., 2}, e in {-1, -0.5, ..., 1},
a, b in {0, 5, ..., 25}) and keeping the best. Deviation: by default only the 64 grid points with the lowest
objective are optimised (``screen``; ``None`` runs all 4,500 as Epoch AI do, minutes instead of seconds, the
same optimum on our tests). Intervals come from refitting bootstrap resamples of the points from the best
fit. The same law with the average parameter count over training
in place of N fits sparse and dense runs together (*The Journey Matters*, arXiv 2501.12486).

Approach 2 fits, for each compute budget, a parabola of loss in ``log N``; its minimum is ``N_opt(C)``, and
``N_opt = k_N C^a`` and ``D_opt = k_D C^b`` are fitted through the minima in log space.
"""

import itertools
import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy.optimize import minimize

HUBER_DELTA = 1e-3
FULL_GRID = {"alpha": np.arange(0.0, 2.01, 0.5), "beta": np.arange(0.0, 2.01, 0.5), "e": np.arange(-1.0, 1.01, 0.5),
             "a": np.arange(0.0, 25.1, 5.0), "b": np.arange(0.0, 25.1, 5.0)}
"""Chinchilla's grid of starting points (4,500 starts)."""
COARSE_GRID = {"alpha": np.array([0.2, 0.5, 1.0]), "beta": np.array([0.2, 0.5, 1.0]), "e": np.array([-1.0, 0.0, 1.0]),
               "a": np.array([0.0, 5.0, 10.0, 20.0]), "b": np.array([0.0, 5.0, 10.0, 20.0])}
"""A 432-start grid for quick fits (tests, bootstrap resamples start from the best fit anyway)."""


class FitError(ValueError):
    """Points that cannot be fitted (too few, non-positive values)."""


@dataclass
class Law:
    """``L(N, D) = E + A / N^alpha + B / D^beta`` with bootstrap intervals (``None`` without bootstrap)."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    loss: float
    """The objective (summed Huber loss) at the fit."""
    points: int
    intervals: dict[str, tuple[float, float]] | None = None

    def __call__(self, n, d):
        return self.E + self.A / np.power(n, self.alpha) + self.B / np.power(d, self.beta)

    def optimal(self, flops: float) -> tuple[float, float]:
        """Compute-optimal ``(N, D)`` for ``flops = 6 N D`` (Chinchilla's closed form)."""
        a, b = self.alpha, self.beta
        g = (a * self.A / (b * self.B)) ** (1.0 / (a + b))
        n = g * (flops / 6.0) ** (b / (a + b))
        return n, flops / (6.0 * n)

    def as_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        def show(name, value):
            ci = self.intervals.get(name) if self.intervals else None
            return f"{name}={value:.4g}" + (f" [{ci[0]:.4g}, {ci[1]:.4g}]" if ci else "")
        return ", ".join(show(k, getattr(self, k)) for k in ("E", "A", "B", "alpha", "beta"))


def _objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray, delta: float):
    """Summed Huber loss of the log-sum-exp residuals and its gradient in ``(a, b, e, alpha, beta)``."""
    a, b, e, alpha, beta = theta
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])  # [3, points]
    top = terms.max(axis=0)
    weights = np.exp(terms - top)
    total = weights.sum(axis=0)
    r = top + np.log(total) - log_l
    soft = weights / total  # d LSE / d term
    small = np.abs(r) <= delta
    value = np.where(small, 0.5 * r**2, delta * (np.abs(r) - 0.5 * delta)).sum()
    dr = np.where(small, r, delta * np.sign(r))  # d Huber / d r
    grad = np.array([(dr * soft[0]).sum(), (dr * soft[1]).sum(), (dr * soft[2]).sum(),
                     -(dr * soft[0] * log_n).sum(), -(dr * soft[1] * log_d).sum()])
    return value, grad


def _fit_from(starts, log_n, log_d, log_l, delta) -> tuple[np.ndarray, float]:
    best, best_value = None, math.inf
    bounds = [(None, None), (None, None), (None, None), (0.0, 5.0), (0.0, 5.0)]
    for start in starts:
        res = minimize(_objective, np.asarray(start, dtype=np.float64), args=(log_n, log_d, log_l, delta), jac=True,
                       method="L-BFGS-B", bounds=bounds, options={"ftol": 1e-15, "gtol": 1e-12, "maxiter": 5000})
        if res.fun < best_value and np.all(np.isfinite(res.x)):
            best, best_value = res.x, float(res.fun)
    return best, best_value


def fit_law(n, d, loss, grid: dict | None = None, bootstrap: int = 0, seed: int = 0,
            delta: float = HUBER_DELTA, screen: int | None = 64) -> Law:
    """Fit ``L(N, D)`` to points; ``bootstrap`` > 0 adds 5-95% intervals from that many resamples. ``screen``:
    optimise only from the grid starts with the lowest objective (None: from every start, as Epoch AI do;
    4,500 L-BFGS-B runs take minutes)."""
    n, d, loss = (np.asarray(v, dtype=np.float64) for v in (n, d, loss))
    if not (n.shape == d.shape == loss.shape) or n.size < 5:
        raise FitError(f"need at least 5 points with params, tokens and loss each; got {n.size}")
    if (n <= 0).any() or (d <= 0).any() or (loss <= 0).any():
        raise FitError("params, tokens and loss must all be positive")
    grid = grid or FULL_GRID
    starts = [(a, b, e, al, be) for al, be, e, a, b in itertools.product(grid["alpha"], grid["beta"], grid["e"],
                                                                         grid["a"], grid["b"])]
    log_n, log_d, log_l = np.log(n), np.log(d), np.log(loss)
    if screen and len(starts) > screen:  # optimise from the starts with the lowest objective only
        values = [_objective(np.asarray(s, dtype=np.float64), log_n, log_d, log_l, delta)[0] for s in starts]
        starts = [starts[i] for i in np.argsort(values)[:screen]]
    theta, value = _fit_from(starts, log_n, log_d, log_l, delta)
    if theta is None:
        raise FitError("no start converged")
    law = _law(theta, value, n.size)
    if bootstrap:
        rng = np.random.default_rng(seed)
        samples = []
        for _ in range(bootstrap):
            idx = rng.integers(0, n.size, n.size)
            th, _ = _fit_from([theta], log_n[idx], log_d[idx], log_l[idx], delta)
            if th is not None:
                samples.append(_law(th, 0.0, idx.size))
        law.intervals = {k: (float(np.percentile([getattr(s, k) for s in samples], 5)),
                             float(np.percentile([getattr(s, k) for s in samples], 95)))
                         for k in ("E", "A", "B", "alpha", "beta")}
    return law


def _law(theta: np.ndarray, value: float, points: int) -> Law:
    a, b, e, alpha, beta = (float(v) for v in theta)
    return Law(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=alpha, beta=beta, loss=value, points=points)


@dataclass
class IsoFlop:
    """Approach 2: per budget the loss-minimising ``N`` (and its ``D``), and the power laws through them."""

    budgets: list[float]
    n_opt: list[float]
    d_opt: list[float]
    n_exponent: float
    n_coefficient: float
    d_exponent: float
    d_coefficient: float


def fit_isoflop(flops, n, d, loss, budget) -> IsoFlop:
    """For each budget with at least 3 points a parabola of loss in ``log N`` (its vertex ``N_opt``; ``D_opt``
    interpolated in ``log N`` from the budget's points), then ``N_opt = k C^a`` and ``D_opt = k C^b``."""
    flops, n, d, loss, budget = (np.asarray(v, dtype=np.float64) for v in (flops, n, d, loss, budget))
    out_c, out_n, out_d = [], [], []
    for c in sorted(set(budget.tolist())):
        sel = budget == c
        if sel.sum() < 3:
            continue
        x = np.log(n[sel])
        k2, k1, _ = np.polyfit(x, loss[sel], 2)
        if k2 <= 0:  # no minimum inside: the budget's points are all on one side of it
            continue
        x_opt = float(np.clip(-k1 / (2 * k2), x.min(), x.max()))
        order = np.argsort(x)
        out_c.append(float(np.mean(flops[sel])))
        out_n.append(math.exp(x_opt))
        out_d.append(math.exp(float(np.interp(x_opt, x[order], np.log(d[sel])[order]))))
    if len(out_c) < 2:
        raise FitError(f"approach 2 needs at least 2 budgets with a loss minimum inside their 3+ sizes; got "
                       f"{len(out_c)}")
    lc = np.log(out_c)
    a, ka = np.polyfit(lc, np.log(out_n), 1)
    b, kb = np.polyfit(lc, np.log(out_d), 1)
    return IsoFlop(out_c, out_n, out_d, float(a), math.exp(ka), float(b), math.exp(kb))


__all__ = ["COARSE_GRID", "FULL_GRID", "FitError", "IsoFlop", "Law", "fit_isoflop", "fit_law"]
