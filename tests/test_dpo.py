import math

import pytest
import torch
import torch.nn.functional as F

from rlxf.engine import TrainConfig
from rlxf.losses import dpo_loss
from rlxf.trainers.dpo import DPOConfig, train_dpo


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_dpo_sigmoid_by_hand():
    # h = (-1 - -1.5) - (-2 - -1.5) = 1; β = 0.1: loss = -log σ(0.1); rewards β·(π - ref) = 0.05 and -0.05
    pc, pr, rc, rr = torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.5]), torch.tensor([-1.5])
    losses, chosen_r, rejected_r = dpo_loss(pc, pr, rc, rr, beta=0.1)
    torch.testing.assert_close(losses, torch.tensor([-log_sigmoid(0.1)]))
    torch.testing.assert_close(chosen_r, torch.tensor([0.05]))
    torch.testing.assert_close(rejected_r, torch.tensor([-0.05]))
    # conservative DPO, ε = 0.2: -0.8 log σ(0.1) - 0.2 log σ(-0.1)
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=0.2)
    torch.testing.assert_close(losses, torch.tensor([-0.8 * log_sigmoid(0.1) - 0.2 * log_sigmoid(-0.1)]))
    # soft label p = 0.5: the loss is symmetric in h, so h and -h give the same value
    half = torch.tensor([0.5])
    a, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, label_prob=half)
    b, _, _ = dpo_loss(pr, pc, rr, rc, beta=0.1, label_prob=half)
    torch.testing.assert_close(a, b)


def test_ipo_by_hand():
    # h = 1, β = 0.2: hard label target 1/(2β) = 2.5 -> (1 - 2.5)² = 2.25; soft p = 0.75 -> target 1.25 -> 0.0625
    pc, pr, rc, rr = torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.5]), torch.tensor([-1.5])
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.2, loss_type="ipo")
    torch.testing.assert_close(losses, torch.tensor([2.25]))
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.2, loss_type="ipo", label_prob=torch.tensor([0.75]))
    torch.testing.assert_close(losses, torch.tensor([0.0625]))


def naive_dpo(pc, pr, rc, rr, beta, eps, loss_type, p):
    out = []
    for i in range(len(pc)):
        h = (pc[i] - rc[i]) - (pr[i] - rr[i])
        q = p[i] * (1 - eps) + (1 - p[i]) * eps
        if loss_type == "sigmoid":
            out.append(-(q * log_sigmoid(beta * h) + (1 - q) * log_sigmoid(-beta * h)))
        else:
            out.append((h - (q - 0.5) / beta) ** 2)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
@pytest.mark.parametrize("eps, soft", [(0.0, False), (0.1, False), (0.0, True), (0.2, True)])
def test_dpo_matches_naive_loop(loss_type, eps, soft):
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(12, dtype=torch.float64, generator=g) * 5 for _ in range(4))
    p = torch.rand(12, dtype=torch.float64, generator=g) if soft else torch.ones(12, dtype=torch.float64)
    got, _, _ = dpo_loss(
        pc, pr, rc, rr, beta=0.3, label_smoothing=eps, loss_type=loss_type, label_prob=p if soft else None
    )
    torch.testing.assert_close(
        got, naive_dpo(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist(), 0.3, eps, loss_type, p.tolist())
    )


def test_dpo_gradient_pushes_chosen_up_and_rejected_down():
    pc, pr = torch.zeros(3, requires_grad=True), torch.zeros(3, requires_grad=True)
    losses, _, _ = dpo_loss(pc, pr, torch.zeros(3), torch.zeros(3), beta=0.5)
    losses.sum().backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()  # descent raises log π(chosen), lowers log π(rejected)
    torch.testing.assert_close(pc.grad, torch.full((3,), -0.5 * F.sigmoid(torch.tensor(0.0)).item()))


def _cfg(model_dir, world, out, **kw):
    train = kw.pop("train", {})
    return DPOConfig(
        model=str(model_dir),
        train_file=str(world / "preferences_train.jsonl"),
        out=str(out),
        max_length=192,
        train=TrainConfig(
            **{
                "batch_size": 8,
                "per_device_batch_size": 4,
                "max_steps": 3,
                "lr": 1e-3,
                "progress": False,
                "report_to": "none",
            }
            | train
        ),
        **kw,
    )


def test_cached_and_live_reference_give_the_same_losses(factworld_model_dir, factworld_dir, tmp_path):
    cached = train_dpo(_cfg(factworld_model_dir, factworld_dir, tmp_path / "cached", reference="cached"))
    live = train_dpo(_cfg(factworld_model_dir, factworld_dir, tmp_path / "live", reference="live"))
    torch.testing.assert_close(torch.tensor(cached["history"]["loss/dpo"]), torch.tensor(live["history"]["loss/dpo"]))
    # at step 1 the policy equals the reference: h = 0, loss = log 2 exactly
    assert cached["history"]["loss/dpo"][0] == pytest.approx(math.log(2.0), abs=1e-6)


def test_short_dpo_run_raises_the_margin_and_changes_every_parameter(factworld_model_dir, factworld_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(factworld_model_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = _cfg(
        factworld_model_dir,
        factworld_dir,
        tmp_path,
        beta=0.5,
        eval_file=str(factworld_dir / "preferences_test.jsonl"),
        train={"max_steps": 12, "batch_size": 16, "per_device_batch_size": 16, "lr": 3e-3},
    )
    result = train_dpo(cfg, model=model)
    hist = result["history"]
    losses = hist["loss/dpo"]
    assert all(map(math.isfinite, losses)) and losses[-1] < losses[0]
    assert hist["rewards/margins"][-1] > hist["rewards/margins"][0]
    assert [n for n, p in model.named_parameters() if torch.equal(before[n], p.detach())] == []
    assert (tmp_path / "final" / "config.json").is_file()
    assert "eval/rewards_margins" in result["eval"]
