"""The per-prompt program P_n and its limit laws (Song et al., arXiv:2305.17608; docs/methods/reward_collapse.md §2.5, §4).

P_n: maximise S(r) = Σ_{i<j} U(r_i − r_j) over 1 ≥ r_1 ≥ … ≥ r_n ≥ 0 (index 1 = best completion). When a reward
model can interpolate, training splits into one copy of P_n per prompt, so every prompt gets the same optimal
profile r* (reward collapse). Numpy and scipy only; shapes use n = completions per prompt.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from scipy import optimize, stats

from rlxf.collapse.utilities import Utility

SolveMethod = Literal["gaps", "box"]


class NoClosedFormError(ValueError):
    """The utility's limit law has no closed form (e.g. log σ(cx)); solve P_n for a large n instead."""


def _objective_and_grad(r: np.ndarray, f, fprime) -> tuple[float, np.ndarray]:
    """S(r) = Σ_{i<j} f(r_i − r_j) and ∂S/∂r for r ordered best first, (n,) -> (), (n,).

    g_i = Σ_{j>i} f′(r_i − r_j) − Σ_{j<i} f′(r_j − r_i) (docs/methods/reward_collapse.md §2.5).
    """
    n = r.shape[0]
    iu, ju = np.triu_indices(n, k=1)  # the C(n, 2) pairs i < j
    d = r[iu] - r[ju]  # (C(n, 2),)
    s = f(d).sum()
    gd = fprime(d)  # (C(n, 2),)
    g = np.bincount(iu, weights=gd, minlength=n) - np.bincount(ju, weights=gd, minlength=n)  # (n,)
    return float(s), g


def _solve_gaps(f, fprime, n: int, maxiter: int) -> np.ndarray:
    """Maximise S with r_1 = 1, r_n = 0 pinned and strictly positive gaps δ = softmax(z) (docs/methods/reward_collapse.md §2.5, method "gaps").

    r_i = Σ_{k ≥ i} δ_k; ∂S/∂δ_k = Σ_{i ≤ k} g_i; ∂S/∂z = δ ⊙ (∂S/∂δ − ⟨δ, ∂S/∂δ⟩). Returns r best first, (n,).
    """
    scale = 1.0 / (n * (n - 1) / 2)  # mean over pairs keeps the tolerances meaningful for every n

    def r_of(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        delta = np.exp(z - z.max())
        delta /= delta.sum()  # (n - 1,) softmax
        r = np.append(np.cumsum(delta[::-1])[::-1], 0.0)  # (n,) r_i = Σ_{k ≥ i} δ_k
        return r, delta

    def fun(z: np.ndarray) -> tuple[float, np.ndarray]:
        r, delta = r_of(z)
        s, g = _objective_and_grad(r, f, fprime)
        ds_ddelta = np.cumsum(g)[:-1]  # (n - 1,) Σ_{i ≤ k} g_i
        ds_dz = delta * (ds_ddelta - delta @ ds_ddelta)
        return -s * scale, -ds_dz * scale

    res = optimize.minimize(
        fun,
        np.zeros(n - 1),
        jac=True,
        method="L-BFGS-B",
        options={"maxiter": maxiter, "maxcor": 30, "ftol": 1e-15, "gtol": 1e-12},
    )
    return r_of(res.x)[0]


def _solve_box(f, fprime, n: int, maxiter: int) -> np.ndarray:
    """Maximise S over the box [0, 1]^n from linspace(1, 0, n) (docs/methods/reward_collapse.md §2.5, method "box"). Returns r best first."""
    scale = 1.0 / (n * (n - 1) / 2)

    def fun(r: np.ndarray) -> tuple[float, np.ndarray]:
        s, g = _objective_and_grad(r, f, fprime)
        return -s * scale, -g * scale

    res = optimize.minimize(
        fun,
        np.linspace(1.0, 0.0, n),
        jac=True,
        method="L-BFGS-B",
        bounds=[(0.0, 1.0)] * n,
        options={"maxiter": maxiter, "maxcor": 30, "ftol": 1e-15, "gtol": 1e-12},
    )
    return np.sort(res.x)[::-1]


def solve(
    utility: Utility, n: int, smoothed: bool = False, method: SolveMethod | None = None, maxiter: int = 20000
) -> np.ndarray:
    """Optimal rewards r* of P_n for the pure U (or, with `smoothed=True`, the ε-smoothed training form), (n,).

    Sorted ascending (worst -> best), as a reward profile is. For U = x the optimum is half zeros and half ones;
    for odd n the middle value is not determined and is returned as ½. `method`: "gaps" (default for a pure U
    defined only on (0, ∞): log, −1/x, powers, Box–Cox) or "box" (default for a U finite on ℝ: x, log σ(cx) and
    every ε-smoothed U). n = 500 takes about a second for log and −1/x; x^γ slows down as γ -> 1.
    """
    if n < 2:
        raise ValueError(f"P_n needs n >= 2 completions, got n={n}")
    if smoothed:
        if utility.eps is None:
            raise ValueError(f"smoothed=True needs an ε-smoothed utility, but {utility} has eps=None")
        f, fprime, on_reals = utility, utility.grad, True
    else:
        f, fprime, on_reals = utility.pure, utility.pure_grad, utility.defined_on_reals
    method = method or ("box" if on_reals else "gaps")
    if method == "box" and not on_reals:
        raise ValueError(f"method='box' needs a U finite on the reals; the pure {utility.label} is not: use 'gaps'")
    if method not in ("gaps", "box"):
        raise ValueError(f"method must be 'gaps' or 'box', got {method!r}")
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        r = (_solve_gaps if method == "gaps" else _solve_box)(f, fprime, n, maxiter)
    return np.clip(r[::-1], 0.0, 1.0)  # ascending; the clip only removes round-off (1 + 2e-16)


def objective(utility: Utility, rewards: np.ndarray, smoothed: bool = False) -> float:
    """S(r) = Σ_{i<j} U(r_i − r_j) for a profile sorted ascending (worst -> best), (n,) -> ()."""
    r = np.asarray(rewards, dtype=np.float64)[::-1]
    return _objective_and_grad(r, utility if smoothed else utility.pure, utility.grad)[0]


def limit_law(utility: Utility):
    """Limit law of the n-point optimum of the pure U as n -> ∞, as a frozen scipy distribution (docs/methods/reward_collapse.md §4.2).

    x -> Bernoulli(½) on {0, 1}; x^γ -> Beta((1−γ)/2, (1−γ)/2); log x -> Beta(½, ½) (arcsine);
    −x^(−γ) -> Beta((1+γ)/2, (1+γ)/2) for γ ≤ 1 and Uniform[0, 1] for γ ≥ 1; Box–Cox λ -> Beta(a, a) with
    a = (1 − λ)/2. log σ(cx) has atoms at 0 and 1 and no closed form: `NoClosedFormError`. The ε of the training
    form is ignored (with ε fixed, the smoothed program has another limit).
    """
    name = utility.name
    if name == "logsigmoid":
        raise NoClosedFormError(
            f"{utility.label} has no closed-form limit law (atoms at 0 and 1 plus a continuous middle part); "
            "use solve(utility, n) with a large n instead"
        )
    if name == "boxcox":
        a = (1.0 - utility.lam) / 2.0
    elif name == "linear":
        a = 0.0
    elif name == "log":
        a = 0.5
    elif name == "power":
        a = (1.0 - utility.gamma) / 2.0
    elif name == "inverse":
        a = 1.0
    elif name == "neg_power":
        a = min((1.0 + utility.gamma) / 2.0, 1.0)  # the Beta formula stops at γ = 1; beyond it the law stays uniform
    else:  # pragma: no cover - every registered name is handled above
        raise NoClosedFormError(f"no limit law known for {utility}")
    if a == 0.0:
        return stats.bernoulli(0.5)
    if a == 1.0:
        return stats.uniform(0.0, 1.0)
    return stats.beta(a, a)


def limit_quantiles(utility: Utility, n: int) -> np.ndarray:
    """Quantiles F⁻¹((i − ½)/n), i = 1..n, of the limit law: the n-point profile it predicts, (n,) ascending."""
    q = (np.arange(1, n + 1) - 0.5) / n
    return np.asarray(limit_law(utility).ppf(q), dtype=np.float64)
