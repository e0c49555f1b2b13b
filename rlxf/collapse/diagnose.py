"""Reward-collapse diagnostics for a trained ranking reward model (docs/methods/reward_collapse.md §4.5), and plots.

A profile is one prompt's n rewards sorted ascending; `profiles` is (P, n). Everything here is numpy and returns
plain floats / lists, so a CLI can print it as JSON; `plot_profiles` and `predict_plot` write a PNG with
matplotlib's Agg canvas (no display, no global backend switch).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rlxf.collapse.distances import open_closed_gap, prediction_mae, w1_grid
from rlxf.collapse.theory import NoClosedFormError, limit_law, limit_quantiles, solve
from rlxf.collapse.utilities import Utility

ALL = "all"
"""Group name for every prompt together (used when prompts have no type)."""

# Pass criteria for a trained RM, docs/methods/reward_collapse.md §4.5.
MAE_TRAIN, MAE_HELD_OUT = 0.05, 0.08
COLLAPSED_GAP, PROMPT_AWARE_GAP = 0.03, 0.15
INDEPENDENCE_STD = 0.05


def reward_profiles(rewards: Any, mask: Any | None = None) -> np.ndarray:
    """(P, K) rewards (array or tensor) and optional (P, K) validity mask -> (P, n) profiles sorted ascending.

    Every prompt must have the same number n of valid completions (profiles are compared index by index).
    """
    r = _numpy(rewards).astype(np.float64)
    if r.ndim != 2:
        raise ValueError(f"rewards must be (P, K), got shape {r.shape}")
    if mask is None:
        return np.sort(r, axis=-1)
    m = _numpy(mask).astype(bool)
    counts = m.sum(-1)
    if counts.size and (counts != counts[0]).any():
        raise ValueError(
            f"prompts have different numbers of valid completions ({sorted(set(counts.tolist()))}); "
            "profiles need one n: select the prompts with the n you want to diagnose"
        )
    return np.sort(np.where(m, r, np.inf), axis=-1)[:, : int(counts[0]) if counts.size else 0]


def _numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _groups(prompt_types: Sequence[str] | None, p: int) -> dict[str, np.ndarray]:
    """Group name -> row indices: ALL, plus one group per prompt type when types are given."""
    groups = {ALL: np.arange(p)}
    if prompt_types is not None:
        if len(prompt_types) != p:
            raise ValueError(f"got {len(prompt_types)} prompt types for {p} profiles")
        types = np.asarray(prompt_types, dtype=object)
        for t in sorted(set(prompt_types)):
            groups[str(t)] = np.flatnonzero(types == t)
    return groups


def mean_profiles(
    profiles: np.ndarray, prompt_types: Sequence[str] | None = None, band: tuple[float, float] = (0.1, 0.9)
) -> dict[str, dict[str, np.ndarray]]:
    """Per-index mean profile with a band, per group (ALL and each prompt type), (P, n) -> {group: {...}}.

    Each group holds "mean", "std", "lo", "hi" ((n,) arrays; lo/hi are the `band` quantiles over prompts) and
    "count" (prompts in the group).
    """
    s = np.sort(np.asarray(profiles, dtype=np.float64), axis=-1)
    out = {}
    for name, rows in _groups(prompt_types, s.shape[0]).items():
        g = s[rows]  # (P_g, n)
        out[name] = {
            "mean": g.mean(0),
            "std": g.std(0),
            "lo": np.quantile(g, band[0], axis=0),
            "hi": np.quantile(g, band[1], axis=0),
            "count": len(rows),
        }
    return out


def predicted_profile(utility: Utility, n: int, smoothed: bool = True) -> np.ndarray:
    """The n-point optimum r* the profiles should match, (n,) ascending. `smoothed=True` (default) gives the
    ε-smoothed optimum: compare a trained model with the utility it was trained on (docs/methods/reward_collapse.md §6)."""
    return solve(utility, n, smoothed=smoothed and utility.eps is not None)


def profile_error(profiles: np.ndarray, prediction: np.ndarray) -> float:
    """MAE of the per-index mean profile vs the prediction, (P, n), (n,) -> () (docs/methods/reward_collapse.md §4.5, "profile vs theory")."""
    mean = np.sort(np.asarray(profiles, dtype=np.float64), axis=-1).mean(0)
    return float(prediction_mae(mean, prediction))


def prompt_type_gap(profiles: np.ndarray, prompt_types: Sequence[str]) -> float:
    """Open-vs-closed gap of profiles labelled by type, (P, n), (P,) -> (); see `open_closed_gap`."""
    s = np.asarray(profiles, dtype=np.float64)
    types = np.asarray(prompt_types, dtype=object)
    if not ((types == "open").any() and (types == "closed").any()):
        raise ValueError("the open-vs-closed gap needs at least one 'open' and one 'closed' prompt")
    return open_closed_gap(s[types == "open"], s[types == "closed"])


def prompt_independence(profiles: np.ndarray) -> float:
    """Std over prompts of s_p[i], averaged over i, (P, n) -> (); ≈ 0 when every prompt has the same profile."""
    return float(np.sort(np.asarray(profiles, dtype=np.float64), axis=-1).std(0).mean())


def _utility_per_group(utility: Utility | Mapping[str, Utility], groups: Sequence[str]) -> dict[str, Utility]:
    if isinstance(utility, Utility):
        return {g: utility for g in groups}
    missing = [g for g in groups if g != ALL and g not in utility]
    if missing:
        raise ValueError(f"no utility given for prompt types {missing}; the mapping has {sorted(utility)}")
    per_group = {g: utility[g] for g in groups if g != ALL}
    if len(set(per_group.values())) == 1:  # one utility for every type: the ALL group has a prediction too
        per_group[ALL] = next(iter(per_group.values()))
    return per_group


def diagnose(
    profiles: np.ndarray,
    prompt_types: Sequence[str] | None,
    utility: Utility | Mapping[str, Utility],
    *,
    smoothed: bool = True,
    held_out: bool = False,
) -> dict[str, Any]:
    """Every collapse check of docs/methods/reward_collapse.md §4.5 on (P, n) profiles, as a JSON-ready dict.

    `utility` is the utility trained with: one for every prompt (fixed U) or a mapping prompt type -> utility
    (prompt-aware, e.g. `{"closed": utility("linear"), "open": utility("inverse")}`). `smoothed` compares with the
    ε-smoothed optimum (default, as trained) or the pure one. `held_out` selects the MAE threshold (0.08, else 0.05).

    Keys: n, prompts, counts, utility, prediction, mean_profile, profile_mae, prompt_independence, gap (the
    open-vs-closed gap, None without both types), predicted_gap, prompt_aware, checks (pass flags).
    """
    s = np.sort(np.asarray(profiles, dtype=np.float64), axis=-1)
    p, n = s.shape
    groups = _groups(prompt_types, p)
    means = mean_profiles(s, prompt_types)
    per_group = _utility_per_group(utility, list(groups))
    predictions = {g: predicted_profile(u, n, smoothed) for g, u in per_group.items()}
    prompt_aware = len(set(per_group.values())) > 1
    has_gap = "open" in groups and "closed" in groups and len(groups["open"]) and len(groups["closed"])
    gap = prompt_type_gap(s, prompt_types) if has_gap else None
    predicted_gap = (
        float(prediction_mae(predictions["open"], predictions["closed"]))
        if "open" in predictions and "closed" in predictions
        else None
    )
    mae = {g: profile_error(s[groups[g]], pred) for g, pred in predictions.items() if len(groups[g])}
    independence = {g: prompt_independence(s[rows]) for g, rows in groups.items() if len(rows)}
    mae_limit = MAE_HELD_OUT if held_out else MAE_TRAIN
    checks: dict[str, bool] = {"profile_mae": all(v <= mae_limit for v in mae.values())}
    # Within one utility every prompt should reach the same profile: check ALL for a fixed U, each type otherwise.
    indep_groups = [g for g in independence if g != ALL] if prompt_aware else [ALL]
    checks["prompt_independence"] = all(independence[g] <= INDEPENDENCE_STD for g in indep_groups if g in independence)
    if gap is not None:
        checks["gap"] = gap >= PROMPT_AWARE_GAP if prompt_aware else gap <= COLLAPSED_GAP
    return {
        "n": n,
        "prompts": p,
        "counts": {g: len(rows) for g, rows in groups.items()},
        "utility": {g: str(u) for g, u in per_group.items()},
        "prompt_aware": prompt_aware,
        "prediction": {g: pred.tolist() for g, pred in predictions.items()},
        "mean_profile": {g: m["mean"].tolist() for g, m in means.items()},
        "profile_mae": mae,
        "prompt_independence": independence,
        "gap": gap,
        "predicted_gap": predicted_gap,
        "checks": checks,
    }


# ---- plots ----------------------------------------------------------------------------------------------------------
def _figure(width: float = 6.4, height: float = 4.2):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=120)
    FigureCanvasAgg(fig)
    return fig


def plot_profiles(
    profiles: np.ndarray,
    prompt_types: Sequence[str] | None,
    path: str | Path,
    predictions: Mapping[str, np.ndarray] | np.ndarray | None = None,
    *,
    band: tuple[float, float] = (0.1, 0.9),
    title: str | None = None,
) -> Path:
    """PNG of the mean sorted profile per prompt type with a `band` quantile band, against the prediction(s).

    `predictions`: one (n,) profile for every prompt, or a mapping prompt type -> (n,) (e.g. the "prediction"
    entry of `diagnose`). Returns the path written.
    """
    s = np.sort(np.asarray(profiles, dtype=np.float64), axis=-1)
    n = s.shape[-1]
    x = np.arange(1, n + 1)
    means = mean_profiles(s, prompt_types, band)
    shown = [g for g in means if g != ALL] or [ALL]
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    colours = {name: f"C{i}" for i, name in enumerate(shown)}
    for g in shown:
        m = means[g]
        ax.plot(x, m["mean"], "o-", color=colours[g], label=f"{g} (P={m['count']}), mean")
        ax.fill_between(x, m["lo"], m["hi"], color=colours[g], alpha=0.2, lw=0)
    if predictions is not None:
        preds = predictions if isinstance(predictions, Mapping) else {ALL: predictions}
        for g, pred in preds.items():
            ax.plot(x, np.asarray(pred), "--", color=colours.get(g, "k"), label=f"{g}, prediction")
    ax.set_xlabel("completion rank (worst → best)")
    ax.set_ylabel("reward")
    ax.set_ylim(-0.03, 1.03)
    ax.set_title(title or f"sorted reward profiles, band = {band[0]:g}–{band[1]:g} quantiles")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def predict(utility: Utility, n: int) -> dict[str, Any]:
    """What theory predicts for `utility` at n completions, as a JSON-ready dict.

    Keys: utility, n, pure (n-point optimum of U), smoothed (of the ε form, None if eps is None), std_pure,
    std_smoothed, limit_law (name, or None without a closed form), limit_quantiles (None likewise), w1_limit (W1 grid
    of the pure optimum to its limit law).
    """
    pure = solve(utility, n)
    smoothed = solve(utility, n, smoothed=True) if utility.eps is not None else None
    try:
        law = limit_law(utility)
    except NoClosedFormError:
        law = None
    return {
        "utility": str(utility),
        "label": utility.label,
        "n": n,
        "pure": pure.tolist(),
        "smoothed": None if smoothed is None else smoothed.tolist(),
        "std_pure": float(pure.std()),
        "std_smoothed": None if smoothed is None else float(smoothed.std()),
        "limit_law": None if law is None else f"{law.dist.name}{tuple(round(float(a), 4) for a in law.args)}",
        "limit_quantiles": None if law is None else limit_quantiles(utility, n).tolist(),
        "w1_limit": None if law is None else float(w1_grid(pure, law)),
    }


def predict_plot(utility: Utility, n: int, path: str | Path) -> dict[str, Any]:
    """PNG of the predicted profile for `utility` at n (pure and ε-smoothed optimum, limit-law quantiles where a
    closed form exists); returns `predict(utility, n)` with "plot" = the path written."""
    pred = predict(utility, n)
    x = np.arange(1, n + 1)
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(x, pred["pure"], "o-", label=f"optimum of U = {utility.label}")
    if pred["smoothed"] is not None:
        ax.plot(x, pred["smoothed"], "s--", label=f"optimum of the ε = {utility.eps:g} training form")
    if pred["limit_quantiles"] is not None:
        ax.plot(x, pred["limit_quantiles"], ":", color="k", label=f"limit law {pred['limit_law']}, quantiles")
    ax.set_xlabel("completion rank (worst → best)")
    ax.set_ylabel("reward")
    ax.set_ylim(-0.03, 1.03)
    ax.set_title(f"predicted reward profile, n = {n}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    pred["plot"] = str(path)
    return pred
