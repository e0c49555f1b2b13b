"""Utility functions U for ranking reward models, and the prompt-aware choice of U per example.

Song, Cai, Lee & Su, "Reward Collapse in Aligning Large Language Models" (arXiv:2305.17608). A ranking reward model
maximises Σ_{i ranked above j} U(r_i − r_j) with rewards r ∈ (0, 1); the choice of U fixes the reward distribution
every prompt collapses to, and choosing U per prompt (the prompt-aware utility) chooses that prompt's distribution.

Each `Utility` has two forms (docs/methods/reward_collapse.md §2.3):
- the **pure** form U(x), `u.pure(x)`, used by the theory solver (pure log and −1/x are undefined for x ≤ 0);
- the **training** form Ũ(d), `u(d)`: ε-smoothed so that Ũ(0) = 0, Ũ(d) = U(d + ε) − U(ε) for d > 0, and a
  linear extension with the C¹ slope U′(ε) for d ≤ 0 (a mis-ordered pair keeps a finite, useful gradient).

Both forms accept numpy arrays and torch tensors (the loss calls them on tensors, the solver on arrays).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

DEFAULT_EPS = 0.1
"""ε of the smoothed forms (the paper's code uses 0.1)."""
DEFAULT_C = 4.0
"""Temperature c of log σ(c·x) (the paper's code uses 4)."""

PromptType = Literal["open", "closed"]
PROMPT_TYPES: tuple[str, ...] = ("open", "closed")
BINARY_RULE: dict[str, str] = {"closed": "linear", "open": "inverse"}
"""The paper's prompt-aware rule: closed-ended prompts get x (polarised target), open-ended ones −1/x (uniform)."""

Array = Any  # numpy array or torch tensor


def _xp(x: Array):
    return torch if isinstance(x, torch.Tensor) else np


def _log(x: Array) -> Array:
    return _xp(x).log(x)


def _logsigmoid(x: Array) -> Array:
    return F.logsigmoid(x) if isinstance(x, torch.Tensor) else -np.logaddexp(0.0, -x)


def _sigmoid(x: Array) -> Array:
    return torch.sigmoid(x) if isinstance(x, torch.Tensor) else 0.5 * (1.0 + np.tanh(0.5 * x))


# name -> (U(x, u), U'(x, u), parameters it takes). U' only feeds the numpy solver, but works on tensors too.
_FAMILIES: dict[str, tuple[Callable, Callable, tuple[str, ...]]] = {
    "linear": (lambda x, u: x, lambda x, u: x * 0 + 1.0, ()),
    "log": (lambda x, u: _log(x), lambda x, u: 1.0 / x, ()),
    "inverse": (lambda x, u: -1.0 / x, lambda x, u: x**-2.0, ()),
    "power": (lambda x, u: x**u.gamma, lambda x, u: u.gamma * x ** (u.gamma - 1.0), ("gamma",)),
    "neg_power": (lambda x, u: -(x**-u.gamma), lambda x, u: u.gamma * x ** (-u.gamma - 1.0), ("gamma",)),
    "logsigmoid": (lambda x, u: _logsigmoid(u.c * x), lambda x, u: u.c * _sigmoid(-u.c * x), ("c",)),
    # Box–Cox family (docs/methods/reward_collapse.md §2.4): (x^λ − 1)/λ, with log x at λ = 0; the constant −1/λ is dropped (same maximiser).
    "boxcox": (
        lambda x, u: _log(x) if u.lam == 0 else x**u.lam / u.lam,
        lambda x, u: x ** (u.lam - 1.0),
        ("lam",),
    ),
}
UTILITY_NAMES: tuple[str, ...] = tuple(_FAMILIES)


@dataclass(frozen=True)
class Utility:
    """One utility U with its ε-smoothed training form. Build it with `utility(name, **params)`.

    Frozen and hashable, so a batch can group its prompts by utility. `u(d)` is the training form Ũ(d) (the pure
    form when `eps is None`), `u.pure(x)` is U(x); `u.grad(d)` and `u.pure_grad(x)` are their derivatives.
    """

    name: str
    gamma: float | None = None
    """Exponent γ of `power` (x^γ, 0 < γ < 1) and `neg_power` (−x^(−γ), γ > 0)."""
    c: float | None = None
    """Temperature c of `logsigmoid` (log σ(c·x))."""
    lam: float | None = None
    """λ ∈ [−1, 1] of `boxcox` ((x^λ − 1)/λ, log at λ = 0)."""
    eps: float | None = DEFAULT_EPS
    """ε of the training form; None makes the training form the pure U (theory only)."""
    compat: Literal["rlxf", "repo"] = "rlxf"
    """`repo`: slope 1 for d ≤ 0 in `neg_power`, as the paper's code did for γ = 2; `rlxf`: the C¹ slope."""

    # ---- pure form -------------------------------------------------------------------------------------------------
    def pure(self, x: Array) -> Array:
        """U(x), elementwise. Pure log, −1/x and the powers are only defined for x > 0."""
        return _FAMILIES[self.name][0](x, self)

    def pure_grad(self, x: Array) -> Array:
        """U′(x), elementwise."""
        return _FAMILIES[self.name][1](x, self)

    @property
    def defined_on_reals(self) -> bool:
        """Whether the pure U is finite on all of ℝ (x and log σ(cx)); the others need x > 0."""
        return self.name in ("linear", "logsigmoid") or (self.name == "boxcox" and self.lam == 1)

    @property
    def smoothed_by_eps(self) -> bool:
        """Whether the training form differs from the pure one (x and log σ(cx) are used as they are)."""
        return self.eps is not None and self.name not in ("linear", "logsigmoid")

    @property
    def slope_below_zero(self) -> float:
        """Slope of the training form for d ≤ 0: U′(ε) (C¹), or 1 for `compat="repo"` (`neg_power` only)."""
        if self.eps is None:
            raise ValueError(f"{self} has no ε-smoothed form (eps=None)")
        if self.compat == "repo":
            return 1.0
        return float(self.pure_grad(np.float64(self.eps)))

    # ---- training form ---------------------------------------------------------------------------------------------
    def __call__(self, d: Array) -> Array:
        """Training form Ũ(d), elementwise on an array or tensor of margins d = r_i − r_j (docs/methods/reward_collapse.md §2.3)."""
        if not self.smoothed_by_eps:
            return self.pure(d)
        eps = self.eps
        pos = self.pure(_xp(d).clip(d, 0.0, None) + eps) - float(self.pure(np.float64(eps)))
        return _xp(d).where(d > 0, pos, self.slope_below_zero * d)

    def grad(self, d: Array) -> Array:
        """Derivative Ũ′(d) of the training form, elementwise."""
        if not self.smoothed_by_eps:
            return self.pure_grad(d)
        pos = self.pure_grad(_xp(d).clip(d, 0.0, None) + self.eps)
        return _xp(d).where(d > 0, pos, self.slope_below_zero + 0 * d)

    # ---- naming ----------------------------------------------------------------------------------------------------
    @property
    def label(self) -> str:
        """The pure U as a formula, e.g. "x^0.5", "−1/x", "log σ(4x)"."""
        if self.name == "boxcox":
            return "x" if self.lam == 1 else "log x" if self.lam == 0 else f"(x^{self.lam:g} − 1)/{self.lam:g}"
        if self.name == "power":
            return f"x^{self.gamma:g}"
        if self.name == "neg_power":
            return f"−x^(−{self.gamma:g})"
        if self.name == "logsigmoid":
            return f"log σ({self.c:g}x)"
        return {"linear": "x", "log": "log x", "inverse": "−1/x"}[self.name]

    def __str__(self) -> str:
        parts = [f"{k}={getattr(self, k):g}" for k in _FAMILIES[self.name][2]]
        parts.append("eps=None" if self.eps is None else f"eps={self.eps:g}")
        parts += [f"compat={self.compat!r}"] if self.compat != "rlxf" else []
        return f"{self.name}({', '.join(parts)})"


def utility(name: str, **params: Any) -> Utility:
    """Build the utility `name` with its parameters (docs/methods/reward_collapse.md §2.3).

    Names: "linear" (x), "log" (log x), "inverse" (−1/x), "power" (x^γ, `gamma=` in (0, 1)), "neg_power"
    (−x^(−γ), `gamma=` > 0), "logsigmoid" (log σ(c·x), `c=`, default 4), "boxcox" ((x^λ − 1)/λ, `lam=` in [−1, 1]).
    Every utility also takes `eps=` (default 0.1; None = pure U, for the theory only); "neg_power" takes
    `compat="repo"` (slope 1 for d ≤ 0, as the paper's code did). Parameters passed as None count as not given.
    """
    if name not in _FAMILIES:
        raise ValueError(f"unknown utility {name!r}; choose one of {list(UTILITY_NAMES)}")
    # A CLI passes every option of its config; None means "not given" (except eps, where None asks for the pure U).
    params = {k: v for k, v in params.items() if v is not None or k == "eps"}
    allowed = set(_FAMILIES[name][2]) | {"eps"} | ({"compat"} if name == "neg_power" else set())
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise ValueError(f"utility {name!r} takes {sorted(allowed)}, got unknown {unknown}")
    eps = params.get("eps", DEFAULT_EPS)
    if eps is not None and not eps > 0:
        raise ValueError(f"eps must be > 0 (or None for the pure U), got {eps!r}")
    kwargs: dict[str, Any] = {"eps": None if eps is None else float(eps)}
    if name in ("power", "neg_power"):
        if params.get("gamma") is None:
            raise ValueError(f"utility {name!r} needs gamma=, e.g. utility({name!r}, gamma=0.5)")
        gamma = float(params["gamma"])
        if name == "power" and not 0 < gamma < 1:
            raise ValueError(f"power needs 0 < gamma < 1 (gamma = 1 is 'linear'; convex U unsupported), got {gamma}")
        if name == "neg_power" and not gamma > 0:
            raise ValueError(f"neg_power needs gamma > 0, got {gamma}")
        kwargs["gamma"] = gamma
    if name == "logsigmoid":
        c = float(params.get("c", DEFAULT_C))
        if not c > 0:
            raise ValueError(f"logsigmoid needs c > 0, got {c}")
        kwargs["c"] = c
    if name == "boxcox":
        if params.get("lam") is None:
            raise ValueError("utility 'boxcox' needs lam= in [-1, 1], e.g. utility('boxcox', lam=0.5)")
        lam = float(params["lam"])
        if not -1 <= lam <= 1:
            raise ValueError(f"boxcox needs -1 <= lam <= 1 (openness maps onto this range), got {lam}")
        kwargs["lam"] = lam
    compat = params.get("compat", "rlxf")
    if compat not in ("rlxf", "repo"):
        raise ValueError(f"compat must be 'rlxf' or 'repo', got {compat!r}")
    return Utility(name=name, compat=compat, **kwargs)


# ---- prompt-aware choice (docs/methods/reward_collapse.md §2.4) ----------------------------------------------------------------------------
def openness_to_lambda(openness: float, a_min: float = 0.0) -> float:
    """Openness o ∈ [0, 1] -> Box–Cox λ = 1 − 2a with target shape a = a_min + o·(1 − a_min) (docs/methods/reward_collapse.md §2.4).

    The target limit law is Beta(a, a): o = 0 polarised (Bernoulli(½)), o = ½ arcsine, o = 1 uniform.
    """
    if not 0.0 <= openness <= 1.0:
        raise ValueError(f"openness must lie in [0, 1], got {openness}")
    if not 0.0 <= a_min <= 1.0:
        raise ValueError(f"a_min must lie in [0, 1], got {a_min}")
    a = a_min + openness * (1.0 - a_min)
    return 1.0 - 2.0 * a


def openness_utility(
    openness: float, *, a_min: float = 0.0, normalise: bool = True, eps: float | None = DEFAULT_EPS
) -> Utility:
    """The utility for one openness o ∈ [0, 1] (docs/methods/reward_collapse.md §2.4).

    `normalise=True` (rlxf default): the Box–Cox form ((d+ε)^λ − ε^λ)/λ, equal to `linear`, `log` and `inverse` at
    o = 0, ½, 1 and with a gradient scale continuous in o. `normalise=False`: the raw forms x (λ = 1), x^λ
    (0 < λ < 1), log x (λ = 0), −x^(−|λ|) (λ < 0); same maximisers and limit laws.
    """
    lam = openness_to_lambda(openness, a_min)
    if normalise:
        return utility("boxcox", lam=lam, eps=eps)
    if lam == 1.0:
        return utility("linear", eps=eps)
    if lam > 0:
        return utility("power", gamma=lam, eps=eps)
    if lam == 0.0:
        return utility("log", eps=eps)
    return utility("neg_power", gamma=-lam, eps=eps)


def prompt_aware_utility(
    prompt_type: str | None = None,
    openness: float | None = None,
    *,
    a_min: float = 0.0,
    normalise: bool = True,
    eps: float | None = DEFAULT_EPS,
) -> Utility:
    """The utility for one example: `openness` wins over `prompt_type`; with neither, o = ½ (log) (docs/methods/reward_collapse.md §2.4).

    prompt_type: "closed" -> x, "open" -> −1/x (the paper's binary rule, `BINARY_RULE`).
    """
    if openness is not None:
        return openness_utility(float(openness), a_min=a_min, normalise=normalise, eps=eps)
    if prompt_type is not None:
        if prompt_type not in BINARY_RULE:
            raise ValueError(f"prompt_type must be one of {list(BINARY_RULE)} (or None), got {prompt_type!r}")
        return utility(BINARY_RULE[prompt_type], eps=eps)
    return openness_utility(0.5, a_min=a_min, normalise=normalise, eps=eps)


def binary_rule_utilities(eps: float | None = DEFAULT_EPS) -> dict[str, Utility]:
    """The paper's prompt-aware rule as a mapping prompt type -> utility: {"closed": x, "open": −1/x}."""
    return {t: utility(name, eps=eps) for t, name in BINARY_RULE.items()}


def prompt_aware_utilities(
    prompt_types: Sequence[str | None] | None = None,
    openness: Sequence[float | None] | None = None,
    *,
    a_min: float = 0.0,
    normalise: bool = True,
    eps: float | None = DEFAULT_EPS,
) -> list[Utility]:
    """One utility per prompt of a batch (P prompts), for `utility_ranking_loss`; see `prompt_aware_utility`.

    Prompts with neither a type nor an openness fall back to o = ½ (log); their count is logged at WARNING.
    """
    if prompt_types is None and openness is None:
        raise ValueError("give prompt_types, openness or both (one entry per prompt)")
    p = len(prompt_types if prompt_types is not None else openness)
    types_ = list(prompt_types) if prompt_types is not None else [None] * p
    opens = list(openness) if openness is not None else [None] * p
    if len(types_) != len(opens):
        raise ValueError(f"got {len(types_)} prompt_types but {len(opens)} openness values; need one per prompt")
    fallbacks = sum(t is None and o is None for t, o in zip(types_, opens))
    if fallbacks:
        logger.warning("%d of %d prompts have neither prompt_type nor openness; they use o = 0.5 (log)", fallbacks, p)
    return [prompt_aware_utility(t, o, a_min=a_min, normalise=normalise, eps=eps) for t, o in zip(types_, opens)]
