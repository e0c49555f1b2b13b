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
    fp32 = {"mixed_precision": "no"}  # on a GPU, bf16 autocast would round the cached and live passes differently
    cached = train_dpo(_cfg(factworld_model_dir, factworld_dir, tmp_path / "cached", reference="cached", train=fp32))
    live = train_dpo(_cfg(factworld_model_dir, factworld_dir, tmp_path / "live", reference="live", train=fp32))
    torch.testing.assert_close(torch.tensor(cached["history"]["loss/dpo"]), torch.tensor(live["history"]["loss/dpo"]))
    # at step 1 the policy equals the reference: h = 0, loss = log 2 up to float rounding (the cached pass batches the
    # rows differently; on a GPU that moves the log-probs by ~1e-6)
    assert cached["history"]["loss/dpo"][0] == pytest.approx(math.log(2.0), abs=1e-5)


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
    assert [n for n, p in model.named_parameters() if torch.equal(before[n], p.detach().cpu())] == []
    assert (tmp_path / "final" / "config.json").is_file()
    assert "eval/rewards_margins" in result["eval"]


# ---------------------------------------------------------------------------------------------------------------------
# Masked DPO (rlxf-ASR "ADPO", spec adaptive_segment_reward.md §2.6)
# ---------------------------------------------------------------------------------------------------------------------


def _encoded_pairs(model_dir, world, n=4):
    from rlxf.data import load_preferences
    from rlxf.data.tokenize import encode_preferences
    from rlxf.hf import load_tokenizer

    tok = load_tokenizer(model_dir)
    return encode_preferences(load_preferences(world / "preferences_train.jsonl")[:n], tok), tok.pad_token_id


def _with_weights(rows, seed=None):
    """Copies of the rows with keep-masks: all ones, or random 0/1 (seeded)."""
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    out = []
    for r in rows:
        w = {}
        for side in ("chosen", "rejected"):
            n = len(r[f"{side}_ids"])
            w[f"{side}_weight"] = [1.0] * n if g is None else (torch.rand(n, generator=g) < 0.5).float().tolist()
        out.append({**r, **w})
    return out


@pytest.mark.parametrize("pack", [False, True])
def test_all_ones_mask_is_plain_dpo_exactly(factworld_model_dir, factworld_dir, pack):
    from transformers import AutoModelForCausalLM

    from rlxf.trainers.dpo import cache_reference_logps, collate_dpo, dpo_batch_loss

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(factworld_model_dir)
    ref = AutoModelForCausalLM.from_pretrained(factworld_model_dir)
    with torch.no_grad():  # a policy that differs from the reference, so h ≠ 0
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    rows, pad_id = _encoded_pairs(factworld_model_dir, factworld_dir)
    ones = _with_weights(rows)
    cfg = DPOConfig(beta=0.3, sft_weight=0.5)
    for r in (rows, ones):
        cache_reference_logps(ref, r, pad_id, 4, "cpu", "ref", pack)
    assert [r["ref_chosen_logp"] for r in rows] == [r["ref_chosen_logp"] for r in ones]
    plain, plain_m = dpo_batch_loss(model, None, collate_dpo(rows, pad_id, False, pack), cfg)
    masked, masked_m = dpo_batch_loss(model, None, collate_dpo(ones, pad_id, False, pack), cfg)
    assert torch.equal(plain, masked) and all(torch.equal(plain_m[k], masked_m[k]) for k in plain_m)
    live, _ = dpo_batch_loss(model, ref, collate_dpo(ones, pad_id, False, pack), cfg)  # live reference, masked live
    assert torch.equal(plain, live)


def test_masked_dpo_by_hand_and_pack_matches_padded(factworld_model_dir, factworld_dir):
    from transformers import AutoModelForCausalLM

    from rlxf.logprobs import token_logprobs
    from rlxf.trainers.dpo import collate_dpo, response_logps

    model = AutoModelForCausalLM.from_pretrained(factworld_model_dir).eval()
    rows, pad_id = _encoded_pairs(factworld_model_dir, factworld_dir)
    rows = _with_weights(rows, seed=0)
    with torch.no_grad():
        padded, padded_w = response_logps(model, collate_dpo(rows, pad_id, False, pack=False))
        packed, packed_w = response_logps(model, collate_dpo(rows, pad_id, False, pack=True))
        # naive twin: each sequence alone, Σ over kept tokens of log π(y_t)
        expected = []
        for side in ("chosen", "rejected"):
            for r in rows:
                seq = torch.tensor([r["prompt_ids"] + r[f"{side}_ids"]])
                lp = token_logprobs(model(seq).logits[:, :-1], seq[:, 1:])[0]  # (L-1,)
                p = len(r["prompt_ids"])
                expected.append(sum(w * lp[p - 1 + t].item() for t, w in enumerate(r[f"{side}_weight"])))
    torch.testing.assert_close(padded, torch.tensor(expected))
    torch.testing.assert_close(packed, padded)  # same log-probs up to float rounding (packing's contract)
    weights = [sum(r["chosen_weight"]) for r in rows] + [sum(r["rejected_weight"]) for r in rows]
    assert padded_w.tolist() == weights == packed_w.tolist()


@pytest.mark.parametrize("pack", [False, True])
def test_masked_dpo_gradient_is_zero_on_masked_tokens(factworld_model_dir, factworld_dir, pack):
    from transformers import AutoModelForCausalLM

    from rlxf.trainers.dpo import cache_reference_logps, collate_dpo, dpo_batch_loss

    model = AutoModelForCausalLM.from_pretrained(factworld_model_dir)
    rows, pad_id = _encoded_pairs(factworld_model_dir, factworld_dir)
    rows = _with_weights(rows, seed=1)
    cache_reference_logps(model, rows, pad_id, 4, "cpu", "ref", pack)
    captured = {}

    def keep_logits(module, args, output):  # the LM head's output is the logits
        output.retain_grad()
        captured["logits"] = output

    model.lm_head.register_forward_hook(keep_logits)
    batch = collate_dpo(rows, pad_id, False, pack)
    loss, _ = dpo_batch_loss(model, None, batch, DPOConfig(beta=0.5, sft_weight=1.0))
    loss.backward()
    grad = captured["logits"].grad.abs().sum(-1)  # (rows, L)
    if pack:  # the position predicting each response token, with that token's weight
        per_target = grad.flatten()[batch["target_index"]]
        weight = batch["target_weight"]
    else:  # position j predicts token j + 1
        per_target = grad[:, :-1][batch["response_mask"][:, 1:].bool()]
        weight = batch["token_weight"][:, 1:][batch["response_mask"][:, 1:].bool()]
    assert (weight == 0).any() and (weight == 1).any()
    assert (per_target[weight == 0] == 0).all() and (per_target[weight == 1] > 0).all()


def test_masked_dpo_needs_token_rewards():
    from rlxf.credit.segments import CreditConfig

    with pytest.raises(ValueError, match="needs credit.token_reward"):
        DPOConfig(credit=CreditConfig(granularity="segment"))


def test_short_masked_dpo_run_on_factworld(factworld_model_dir, factworld_dir, tmp_path):
    import json

    from transformers import AutoModelForCausalLM

    from rlxf.credit.segments import CreditConfig

    model = AutoModelForCausalLM.from_pretrained(factworld_model_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    credit = CreditConfig(granularity="segment", token_reward=f"factworld:{factworld_dir}:token")
    cfg = _cfg(factworld_model_dir, factworld_dir, tmp_path / "run", beta=0.5, credit=credit,
               eval_file=str(factworld_dir / "preferences_test.jsonl"),
               train={"max_steps": 8, "batch_size": 16, "per_device_batch_size": 16, "lr": 3e-3})  # fmt: skip
    hist = train_dpo(cfg, model=model)["history"]
    losses = hist["loss/dpo"]
    assert all(map(math.isfinite, losses)) and losses[-1] < losses[0]
    assert [n for n, p in model.named_parameters() if torch.equal(before[n], p.detach().cpu())] == []
    # the masks keep part of each side; the pre-training metrics are logged once, at step 0
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 0 and 0 < first["asr/kept_frac_pos"] < 1 and 0 < first["asr/kept_frac_neg"] < 1
    for key in ("asr/dropped_pairs", "asr/one_sided_pairs", "asr/tau", "asr/segments_per_seq", "asr/mean_segment_len"):
        assert len(hist[key]) == 1 and math.isfinite(hist[key][0])
    assert hist["asr/segments_per_seq"][0] > 1  # FactWorld responses mix right and wrong facts


def zero_rewards(prompts, texts):
    return [[] for _ in texts]  # no span: every token reward is 0, so no segment agrees with any label


def test_masked_dpo_with_no_signal_drops_every_pair(factworld_model_dir, factworld_dir, tmp_path):
    from rlxf.credit.segments import CreditConfig

    credit = CreditConfig(granularity="token", token_reward=f"callable:{__name__}:zero_rewards")
    with pytest.raises(ValueError, match="every training pair lost both masks"):
        train_dpo(_cfg(factworld_model_dir, factworld_dir, tmp_path, credit=credit))


def positive_rewards(prompts, texts):
    return [[(0, len(t), 1.0)] for t in texts]  # +1 on each response's last text token, 0 elsewhere


def test_all_positive_rewards_keep_chosen_whole_and_every_pair_one_sided(factworld_model_dir, factworld_dir, tmp_path):
    # spec §4: token rewards ≥ 0 with a positive segment mean give a full chosen mask and an empty rejected mask;
    # the pair is kept (one-sided), never dropped
    from rlxf.credit.segments import CreditConfig

    credit = CreditConfig(granularity="segment", token_reward=f"callable:{__name__}:positive_rewards")
    hist = train_dpo(_cfg(factworld_model_dir, factworld_dir, tmp_path, credit=credit, train={"max_steps": 1}))[
        "history"
    ]
    n_pairs = len((factworld_dir / "preferences_train.jsonl").read_text().splitlines())
    assert hist["asr/kept_frac_pos"] == [1.0] and hist["asr/kept_frac_neg"] == [0.0]
    assert hist["asr/one_sided_pairs"] == [n_pairs] and hist["asr/dropped_pairs"] == [0.0]
