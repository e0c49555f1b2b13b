"""Distances between reward profiles and their predictions (docs/methods/reward_collapse.md §2.5, "Distances").

A profile is one prompt's n rewards sorted ascending, (n,); every function also takes a stack (..., n) and
reduces the last axis. A law is a frozen scipy distribution on [0, 1], e.g. from `limit_law`. Numpy only.
"""

from __future__ import annotations

import numpy as np
from scipy import integrate


def _sorted(profile: np.ndarray) -> np.ndarray:
    return np.sort(np.asarray(profile, dtype=np.float64), axis=-1)


def ks_distance(profile: np.ndarray, law) -> np.ndarray:
    """Kolmogorov–Smirnov distance, (..., n) -> (...): max_i max(i/n − F(s_(i)), F(s_(i)) − (i−1)/n).

    With the endpoints 0 and 1 pinned, KS ≥ 1/n for every continuous law (docs/methods/reward_collapse.md §4.3).
    """
    s = _sorted(profile)
    n = s.shape[-1]
    f = law.cdf(s)  # (..., n)
    i = np.arange(1, n + 1)
    return np.maximum(i / n - f, f - (i - 1) / n).max(-1)


def w1_grid(profile: np.ndarray, law) -> np.ndarray:
    """W1 on the quantile grid, (..., n) -> (...): (1/n)·Σ_i |s_(i) − F⁻¹((i − ½)/n)|; the W1 of docs/methods/reward_collapse.md §4.3."""
    s = _sorted(profile)
    n = s.shape[-1]
    q = law.ppf((np.arange(1, n + 1) - 0.5) / n)  # (n,)
    return np.abs(s - q).mean(-1)


def _partial_mean(law, q: np.ndarray) -> np.ndarray:
    """M(q) = ∫_0^q F⁻¹(u) du, elementwise: closed forms for Beta, Uniform[0, 1] and Bernoulli, else quadrature."""
    name = law.dist.name
    if name == "beta":
        a, b = law.args[:2]
        return a / (a + b) * law.dist.cdf(law.ppf(q), a + 1, b)  # E[X; X ≤ x] = μ·I_x(a + 1, b)
    if name == "uniform":
        return q**2 / 2
    if name == "bernoulli":
        (p,) = law.args[:1]
        return np.clip(q - (1 - p), 0.0, None)
    return np.vectorize(lambda x: integrate.quad(law.ppf, 0.0, x, limit=200)[0])(q)


def w1_exact(profile: np.ndarray, law) -> np.ndarray:
    """Exact W1 = ∫_0^1 |F_s − F| = ∫_0^1 |F_s⁻¹(u) − F⁻¹(u)| du, (..., n) -> (...) (docs/methods/reward_collapse.md §2.5, option).

    On u ∈ ((i−1)/n, i/n] the empirical quantile is s_(i); split that interval where F⁻¹ crosses s_(i).
    """
    s = _sorted(profile)
    n = s.shape[-1]
    lo = np.arange(n) / n  # (n,)
    hi = lo + 1.0 / n
    cross = np.clip(law.cdf(s), lo, hi)  # (..., n) where F⁻¹ passes s_(i)
    m_lo, m_hi, m_cross = _partial_mean(law, lo), _partial_mean(law, hi), _partial_mean(law, cross)
    below = s * (cross - lo) - (m_cross - m_lo)  # ∫_lo^cross (s − F⁻¹)
    above = (m_hi - m_cross) - s * (hi - cross)  # ∫_cross^hi (F⁻¹ − s)
    return (below + above).sum(-1)


def prediction_mae(profile: np.ndarray, prediction: np.ndarray) -> np.ndarray:
    """MAE against an n-point prediction r* (e.g. `solve`), (..., n), (n,) -> (...): mean_i |s_(i) − r*_(i)|.

    Equal to the W1 between the two n-point laws.
    """
    s, r = _sorted(profile), _sorted(prediction)
    if s.shape[-1] != r.shape[-1]:
        raise ValueError(f"profile has n={s.shape[-1]} rewards but the prediction has {r.shape[-1]}")
    return np.abs(s - r).mean(-1)


def open_closed_gap(open_profiles: np.ndarray, closed_profiles: np.ndarray) -> float:
    """Open-vs-closed gap, (P_open, n), (P_closed, n) -> (): mean_i |mean_p s_open,p[i] − mean_p s_closed,p[i]|.

    About 0 under reward collapse; 0.202 between the pure x and −1/x optima (0.186 with ε = 0.1), docs/methods/reward_collapse.md §4.1.
    """
    a = _sorted(np.atleast_2d(open_profiles)).mean(0)  # (n,)
    b = _sorted(np.atleast_2d(closed_profiles)).mean(0)
    if a.shape != b.shape:
        raise ValueError(f"open profiles have n={a.shape[-1]} rewards, closed ones n={b.shape[-1]}")
    return float(np.abs(a - b).mean())
