"""The pure math of online RL: reductions, advantages, PPO losses, KL penalties and KL controllers.

Tensors and plain scalars in, tensors out: no I/O, no config objects, no `.item()` (the KL controllers, which hold
state across steps, take a Python float the trainer already has for logging). Trainers move data through these.

Shapes: B batch (responses), T tokens (response axis, padded), V vocab, K samples per prompt, P prompts.
Masks are (B, T) bool, True on response tokens; every (B, T) output is 0 outside the mask, and nothing outside the
mask (padding, prompt, junk) changes any result.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from rlxf.rewards.contract import scalar_to_token_rewards

Reduction = Literal["token", "sequence"]


# ---------------------------------------------------------------------------------------------------------------------
# Masked reductions and whitening
# ---------------------------------------------------------------------------------------------------------------------


def masked_reduce(
    x: Tensor,  # (B, T) per-token values
    mask: Tensor,  # (B, T) bool, or non-negative float weights
    reduction: Reduction,
    num_tokens: Tensor | float | None = None,
    num_sequences: Tensor | float | None = None,
) -> Tensor:
    """(B, T) -> (): the one place where per-token terms become a scalar (veRL's `agg_loss`).

    "token": Σ mask·x / num_tokens (default: this batch's Σ mask), every token of the batch weighs the same.
    "sequence": each row's Σ mask·x / Σ mask, then summed over non-empty rows / num_sequences (default: this batch's
    count of non-empty rows), every sequence weighs the same.

    Pass `num_tokens` (or `num_sequences`) counted over the whole optimiser step (all micro-batches and processes) to
    make gradient accumulation exact: the micro-batch losses then add up to the full-batch loss. A float mask acts as
    weights (a weighted mean); entries where the mask is 0 are never read, so NaN or inf there does not leak in.
    """
    x = x if x.is_floating_point() else x.float()
    m = mask.to(x.dtype)
    xm = torch.where(mask.bool(), x, 0) * m  # where() first: 0 * inf would be nan
    if reduction == "token":
        if num_sequences is not None:
            raise ValueError("num_sequences is for reduction='sequence'; with 'token' pass num_tokens")
        denom = m.sum() if num_tokens is None else torch.as_tensor(num_tokens, dtype=x.dtype, device=x.device)
        return xm.sum() / denom.clamp(min=torch.finfo(x.dtype).tiny)  # an empty mask gives 0, not nan
    if reduction == "sequence":
        if num_tokens is not None:
            raise ValueError("num_tokens is for reduction='token'; with 'sequence' pass num_sequences")
        n = m.sum(-1)  # (B,)
        per_seq = xm.sum(-1) / n.clamp(min=torch.finfo(x.dtype).tiny)  # (B,) rows with no token give 0 / tiny = 0
        denom = (n > 0).sum() if num_sequences is None else torch.as_tensor(num_sequences, device=x.device)
        return per_seq.sum() / denom.to(x.dtype).clamp(min=1)  # no non-empty row: 0
    raise ValueError(f"reduction must be 'token' or 'sequence', got {reduction!r}")


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of `x` over masked entries: (B, T) -> () with dim=None, else along `dim` (e.g. -1: (B, T) -> (B,)).

    Empty rows give 0. Entries outside the mask are never read.
    """
    x = x if x.is_floating_point() else x.float()
    m = mask.to(x.dtype)
    xm = torch.where(mask.bool(), x, 0) * m
    tiny = torch.finfo(x.dtype).tiny  # an empty mask (or row) gives 0, not nan; float weights below 1 stay exact
    if dim is None:
        return xm.sum() / m.sum().clamp(min=tiny)
    return xm.sum(dim) / m.sum(dim).clamp(min=tiny)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = False) -> Tensor:
    """Variance of `x` over all masked entries, (B, T) -> (). Population variance by default; `unbiased=True` applies
    Bessel's correction n / (n - 1) (nan for a single entry)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.to(x.dtype).sum()
        var = var * n / (n - 1)
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Normalise `x` by the mean and standard deviation of its masked entries (all rows together), (B, T) -> (B, T).

    shift_mean=True: (x − μ) / sqrt(σ² + eps), mean 0 and variance ≈ 1 over the mask (advantage whitening, as in
    Ziegler et al. 2019 and TRL). shift_mean=False: (x − μ) / sqrt(σ² + eps) + μ, the spread is normalised but the mean
    kept (TRL's convention, used for rewards whose sign matters). σ² is the population variance; `eps` guards a
    constant input. 0 outside the mask. The statistics are this tensor's: gather across processes first if needed.
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, 0)


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """1 − Var[returns − values] / Var[returns] over masked entries, (B, T) -> (): 1 is a perfect critic, 0 no better
    than a constant, negative worse. nan when the returns are constant (CleanRL's convention)."""
    var_y = masked_var(returns, mask)
    ev = 1 - masked_var(returns - values, mask) / var_y
    return torch.where(var_y > 0, ev, torch.full_like(ev, math.nan))


# ---------------------------------------------------------------------------------------------------------------------
# Returns and advantages
# ---------------------------------------------------------------------------------------------------------------------


def _next_masked(x: Tensor, mask: Tensor) -> Tensor:
    """(B, T) -> (B, T): at each position, x at the next masked position of the row (0 if none: episode end)."""
    out = torch.zeros_like(x)
    carry = torch.zeros_like(x[:, 0])  # (B,)
    for t in reversed(range(x.shape[1])):
        out[:, t] = carry
        carry = torch.where(mask[:, t], x[:, t], carry)
    return out


def _discounted_cumsum(x: Tensor, mask: Tensor, factor: float) -> Tensor:
    """(B, T) -> (B, T): y_t = x_t + factor · y_(next masked position), over masked positions; 0 elsewhere."""
    out = torch.zeros_like(x)
    carry = torch.zeros_like(x[:, 0])  # (B,)
    for t in reversed(range(x.shape[1])):
        carry = torch.where(mask[:, t], x[:, t] + factor * carry, carry)
        out[:, t] = carry
    return torch.where(mask, out, 0)


def _check_bt(mask: Tensor, **tensors: Tensor) -> None:
    for name, t in tensors.items():
        if t.shape != mask.shape or mask.dim() != 2:
            raise ValueError(f"{name} must have the mask's (B, T) shape {tuple(mask.shape)}, got {tuple(t.shape)}")


@torch.no_grad()
def gae(
    rewards: Tensor,  # (B, T) per-token rewards r_t
    values: Tensor,  # (B, T) critic values V(s_t)
    mask: Tensor,  # (B, T) bool, True on response tokens
    gamma: float,
    lam: float,
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, arXiv 1506.02438, eq. 16).

    δ_t = r_t + γ V(s_t+1) − V(s_t),   A_t = Σ_l (γλ)^l δ_t+l,   returns R_t = A_t + V(s_t) (the λ-return, eq. 18).

    The trajectory of a row is its masked positions in order, whatever the layout: right padding, left padding, a
    prompt region before the response, or holes (masked-out tokens inside the response are skipped as if absent:
    "next state" means the next masked position). The value after the last masked token is 0: the episode ends there.
    Positions outside the mask are never read and come back 0.

    Returns (advantages, returns), both (B, T), detached (they are targets, never differentiated through).
    """
    mask = mask.bool()
    _check_bt(mask, rewards=rewards, values=values)
    dtype = torch.promote_types(rewards.dtype, values.dtype)
    rewards, values = rewards.to(dtype), values.to(dtype)
    deltas = rewards + gamma * _next_masked(values, mask) - values  # (B, T), junk where ~mask (dropped below)
    advantages = _discounted_cumsum(deltas, mask, gamma * lam)
    returns = torch.where(mask, advantages + values, 0)
    return advantages, returns


@torch.no_grad()
def discounted_returns(rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """Reward-to-go G_t = Σ_l γ^l r_t+l over each row's masked positions (trajectory rule of `gae`), (B, T) -> (B, T).

    With a single reward on the last token and γ = 1, G_t is that reward at every response token.
    """
    mask = mask.bool()
    _check_bt(mask, rewards=rewards)
    return _discounted_cumsum(rewards, mask, gamma)


@torch.no_grad()
def reinforce_advantages(rewards: Tensor, mask: Tensor, gamma: float, values: Tensor | None = None) -> Tensor:
    """REINFORCE with an optional learned baseline (Williams 1992): A_t = G_t − V(s_t), (B, T) -> (B, T).

    G_t is the reward-to-go of `discounted_returns`; without `values` the advantage is G_t itself. This equals
    `gae(rewards, values, mask, gamma, lam=1)[0]` (the λ = 1 sum telescopes), computed without the critic's
    bootstrapping. 0 outside the mask; detached.
    """
    returns = discounted_returns(rewards, mask, gamma)
    if values is None:
        return returns
    _check_bt(mask.bool(), values=values)
    return torch.where(mask.bool(), returns - values, 0)


# Outcome advantage estimators: (P, K) scores of K sampled responses per prompt -> (P, K) advantages. Scores of a flat
# batch whose K samples per prompt are adjacent reshape with `.view(P, K)`. The trainer's config names one of these.
ADVANTAGE_ESTIMATORS: dict[str, Callable[..., Tensor]] = {}


def register_advantage(name: str) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Decorator adding an outcome advantage estimator under `name`; a name can be registered once."""

    def add(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        if name in ADVANTAGE_ESTIMATORS:
            raise ValueError(f"advantage estimator {name!r} is already registered")
        ADVANTAGE_ESTIMATORS[name] = fn
        return fn

    return add


def get_advantage_estimator(name: str) -> Callable[..., Tensor]:
    """The estimator registered under `name`; an unknown name raises ValueError listing the valid ones."""
    if name not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {name!r}; choose one of {sorted(ADVANTAGE_ESTIMATORS)}")
    return ADVANTAGE_ESTIMATORS[name]


@register_advantage("rloo")
def rloo_advantages(rewards: Tensor) -> Tensor:
    """REINFORCE leave-one-out (Kool et al. 2019; Ahmadian et al. 2024, arXiv 2402.14740, eq. 5), (P, K) -> (P, K).

    Each sample's score minus the mean score of the other K − 1 samples of its prompt:
    A_i = r_i − (Σ_j r_j − r_i) / (K − 1). For KL-regularised RLOO pass r = score − β Σ_t KL_t, e.g.
    `token_rewards_with_kl(scores, kl, beta, mask).sum(-1).view(P, K)`.
    """
    k = rewards.shape[-1]
    if k < 2:
        raise ValueError(f"RLOO needs at least 2 samples per prompt, got {k}")
    return rewards - (rewards.sum(-1, keepdim=True) - rewards) / (k - 1)


@register_advantage("grpo")
def grpo_advantages(rewards: Tensor, eps: float = 1e-6) -> Tensor:
    """Group-normalised advantage of GRPO (Shao et al. 2024, arXiv 2402.03300, §4.1.2), (P, K) -> (P, K).

    A_i = (r_i − mean(r)) / (std(r) + eps) within each prompt's group, std with Bessel's correction as in the paper's
    reference code; `eps` keeps a group of equal scores at A = 0.
    """
    k = rewards.shape[-1]
    if k < 2:
        raise ValueError(f"GRPO needs at least 2 samples per prompt, got {k}")
    return (rewards - rewards.mean(-1, keepdim=True)) / (rewards.std(-1, keepdim=True) + eps)


# ---------------------------------------------------------------------------------------------------------------------
# PPO losses
# ---------------------------------------------------------------------------------------------------------------------


def ppo_policy_loss(
    logprobs: Tensor,  # (B, T) log π_θ of the sampled tokens
    old_logprobs: Tensor,  # (B, T) log π_old of the same tokens, no grad
    advantages: Tensor,  # (B, T)
    mask: Tensor,  # (B, T) bool, True on response tokens
    clip_eps: float,
    reduction: Reduction = "token",
    num_tokens: Tensor | float | None = None,
    num_sequences: Tensor | float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate (Schulman et al. 2017, arXiv 1707.06347, eq. 7), negated so lower is better.

    Per token, with ratio ρ = π_θ / π_old: max(−A ρ, −A clip(ρ, 1 − ε, 1 + ε)), reduced by `masked_reduce`
    ("token": mean over all masked tokens of the batch; "sequence": mean over each sequence's tokens, then over
    sequences; `num_tokens` / `num_sequences` for exact gradient accumulation).

    Returns the scalar loss and detached stats (token means over the mask): clip_frac (fraction of tokens where the
    clipped term is the active one) and approx_kl (k3 estimate of KL(π_old ‖ π_θ): (ρ − 1) − log ρ, Schulman's note
    http://joschu.net/blog/kl-approx.html).
    """
    _check_bt(mask, logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages)
    log_ratio = logprobs - old_logprobs
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_eps, 1 + clip_eps)
    loss = masked_reduce(torch.maximum(unclipped, clipped), mask, reduction, num_tokens, num_sequences)
    with torch.no_grad():
        clip_frac = masked_reduce((clipped > unclipped).to(log_ratio.dtype), mask, "token")
        approx_kl = masked_reduce(torch.expm1(log_ratio) - log_ratio, mask, "token")
    return loss, {"clip_frac": clip_frac, "approx_kl": approx_kl}


def value_loss(
    values: Tensor,  # (B, T) V_θ(s_t), with grad
    old_values: Tensor,  # (B, T) V_old(s_t) at rollout time, no grad
    returns: Tensor,  # (B, T) targets, e.g. the λ-returns of `gae`
    mask: Tensor,  # (B, T) bool, True on response tokens
    clip_eps: float,
    reduction: Reduction = "token",
    num_tokens: Tensor | float | None = None,
    num_sequences: Tensor | float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss of PPO2 (OpenAI baselines `ppo2/model.py`; Ziegler et al. 2019's lm-human-preferences).

    Per token: ½ max((V − R)², (V_clip − R)²) with V_clip = V_old + clip(V − V_old, −ε, ε), so the critic cannot move
    more than ε from its rollout value in one update to improve its loss. ε = inf disables clipping. Reduced like
    `ppo_policy_loss`.

    Returns the scalar loss and detached stats: clip_frac (fraction of masked tokens where the clipped term is the
    larger one), error (mean of (V − R)², TRL's `val/error`), explained_variance (of R by V).
    """
    _check_bt(mask, values=values, old_values=old_values, returns=returns)
    clipped_values = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
    unclipped_loss = (values - returns) ** 2
    clipped_loss = (clipped_values - returns) ** 2
    loss = 0.5 * masked_reduce(torch.maximum(unclipped_loss, clipped_loss), mask, reduction, num_tokens, num_sequences)
    with torch.no_grad():
        stats = {
            "clip_frac": masked_reduce((clipped_loss > unclipped_loss).to(values.dtype), mask, "token"),
            "error": masked_reduce(unclipped_loss, mask, "token"),
            "explained_variance": explained_variance(values, returns, mask),
        }
    return loss, stats


# ---------------------------------------------------------------------------------------------------------------------
# KL penalty, entropy, KL-shaped rewards
# ---------------------------------------------------------------------------------------------------------------------


def _kl_k1(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    return logprobs - ref_logprobs


def _kl_k2(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    return 0.5 * (ref_logprobs - logprobs) ** 2


def _kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    log_r = ref_logprobs - logprobs  # log π_ref/π
    return torch.expm1(log_r) - log_r


# Schulman's estimators of KL(π ‖ π_ref) from tokens sampled from π, with r = π_ref / π
# (http://joschu.net/blog/kl-approx.html): k1 = −log r (unbiased, can be negative), k2 = ½ (log r)² (biased, low
# variance), k3 = (r − 1) − log r (unbiased, ≥ 0).
KL_ESTIMATORS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"k1": _kl_k1, "k2": _kl_k2, "k3": _kl_k3}


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: str) -> Tensor:
    """Per-token estimate of KL(π ‖ π_ref) on tokens sampled from π: (B, T), (B, T) -> (B, T).

    estimator: "k1" = log π − log π_ref (the usual RLHF penalty, Ziegler et al. 2019 eq. 2), "k2" = ½ (log r)²,
    "k3" = (r − 1) − log r with r = π_ref / π (non-negative; Schulman, http://joschu.net/blog/kl-approx.html).
    No clamping: k3 grows like e^(log r) when π_ref ≫ π. Not masked: the caller masks (every reduction here does).
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; choose one of {sorted(KL_ESTIMATORS)}")
    return KL_ESTIMATORS[estimator](logprobs, ref_logprobs)


# Rows of logits processed at a time by `entropy_from_logits`: bounds the float32 copy to chunk × T × V.
ENTROPY_CHUNK_ROWS = 4


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) per position, (B, T, V) -> (B, T): H = logsumexp(l) − Σ_v softmax(l)_v · l_v.

    Computed in float32 (float64 stays float64) a few rows at a time. Differentiable (for an entropy bonus).
    """
    dtype = torch.promote_types(logits.dtype, torch.float32)
    rows = []
    for start in range(0, logits.shape[0], ENTROPY_CHUNK_ROWS):
        chunk = logits[start : start + ENTROPY_CHUNK_ROWS].to(dtype)  # (b, T, V)
        probs = chunk.softmax(-1)
        rows.append(chunk.logsumexp(-1) - (probs * chunk).sum(-1))  # (b, T, V) -> (b, T)
    return torch.cat(rows) if rows else logits.new_zeros(logits.shape[:2], dtype=dtype)


def token_rewards_with_kl(rewards: Tensor, kl: Tensor, kl_coef: float | Tensor, mask: Tensor) -> Tensor:
    """Task rewards plus the KL penalty per token: r_t − β·KL_t on masked tokens (Ziegler et al. 2019, eq. 2;
    Stiennon et al. 2020, eq. 1), 0 elsewhere.

    Args:
        rewards: (B,) scalar scores, put on the last response token (`scalar_to_token_rewards`), or (B, T) token
            rewards of the reward contract, which stay where they are (dense rewards are not moved).
        kl: (B, T) per-token KL estimate, e.g. `kl_penalty(logprobs, ref_logprobs, "k1")`.
        kl_coef: β, a float or a scalar tensor (e.g. `AdaptiveKLController.value`).
        mask: (B, T) bool, True on response tokens.
    Returns:
        (B, T) rewards for `gae` / `discounted_returns`; `.sum(-1)` gives the sequence reward of RLOO.
    """
    mask = mask.bool()
    if rewards.dim() == 1:
        rewards, _ = scalar_to_token_rewards(rewards, mask)
    _check_bt(mask, rewards=rewards, kl=kl)
    return torch.where(mask, rewards - kl_coef * kl, 0)


# ---------------------------------------------------------------------------------------------------------------------
# KL coefficient controllers (stateful; one update per rollout)
# ---------------------------------------------------------------------------------------------------------------------


class FixedKLController:
    """A constant KL coefficient β with the controller interface (`value`, `update`, `state_dict`)."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        """No change; returns β."""
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Adaptive KL coefficient of Ziegler et al. 2019 (arXiv 1909.08593, §2.2), as in lm-human-preferences.

    After a rollout whose mean per-sequence KL was KL_t, with e_t = clip(KL_t / target − 1, −max_error, max_error):
        β ← β · (1 + e_t · n_steps / horizon)
    so β grows when the policy drifts past `target` and shrinks below it, by at most `max_error` per `horizon` samples.
    This is the paper's β ← β (1 + K_β e_t) with gain K_β = n_steps / horizon, written per sample so the speed of
    adaptation does not depend on the batch size (lm-human-preferences' default horizon is 10 000). `current_kl` is a
    Python float: the trainer reads it once per rollout to log it anyway.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float, max_error: float = 0.2):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be > 0, got target={target}, horizon={horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)
        self.max_error = float(max_error)

    def update(self, current_kl: float, n_steps: int) -> float:
        """Move β after a rollout of `n_steps` samples (sequences) with mean KL `current_kl`; returns the new β."""
        error = min(max(float(current_kl) / self.target - 1, -self.max_error), self.max_error)
        self.value *= 1 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])
