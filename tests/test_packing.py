"""Packed preference pairs give the rewards and log-probs of the padded layout (rlxf.data.packing)."""

from __future__ import annotations

import random

import torch
from transformers import AutoModelForCausalLM

from rlxf.data.packing import first_fit_decreasing, pack_pairs
from rlxf.models.reward_model import RewardModel, collate_pairs, pair_rewards
from rlxf.trainers.dpo import collate_dpo, response_logps


def random_pairs(n: int, vocab: int, seed: int = 0) -> list[dict[str, list[int]]]:
    rng = random.Random(seed)
    ids = lambda lo, hi: [rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))]
    return [{"prompt_ids": ids(1, 9), "chosen_ids": ids(1, 7), "rejected_ids": ids(1, 7)} for _ in range(n)]


def test_first_fit_decreasing_by_hand():
    # sizes 5, 4, 3, 2, 1 into bins of 6: 5 opens bin 0, 4 opens bin 1, 3 opens bin 2, 2 joins bin 1 (4+2=6),
    # 1 joins bin 0 (5+1=6); an item larger than the capacity gets a bin of its own
    assert first_fit_decreasing([3, 5, 1, 4, 2], capacity=6) == [[1, 2], [3, 4], [0]]
    assert first_fit_decreasing([9, 1], capacity=4) == [[0], [1]]


def test_rejected_tokens_never_see_chosen_tokens():
    pair = {"prompt_ids": [5, 6], "chosen_ids": [7, 8], "rejected_ids": [9]}
    batch = pack_pairs([pair], pad_id=0)
    mask = batch["attention_mask"][0, 0]  # (L, L), L = 2 + 2 + 1
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 2]]  # rejected continues after the prompt
    assert mask[4].tolist() == [True, True, False, False, True]  # prompt and itself, not the chosen tokens
    assert batch["last_index"].tolist() == [3, 4]
    # chosen 7 <- pos 1, 8 <- pos 2; rejected 9 <- pos 1 (the prompt's last token)
    assert batch["target_index"].tolist() == [1, 2, 1]
    assert batch["target_seq"].tolist() == [0, 0, 1]


def test_packed_rewards_equal_padded(tiny_model_dir, tiny_tokenizer):
    model = RewardModel.from_pretrained(tiny_model_dir).eval()
    rows = random_pairs(11, len(tiny_tokenizer))
    pad_id = tiny_tokenizer.pad_token_id
    with torch.no_grad():
        padded = pair_rewards(model, collate_pairs(rows, pad_id, False, False, pack=False))
        packed = pair_rewards(model, collate_pairs(rows, pad_id, False, False, pack=True))
    torch.testing.assert_close(packed, padded)


def test_packed_logps_equal_padded(tiny_model_dir, tiny_tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    rows = random_pairs(11, len(tiny_tokenizer), seed=1)
    pad_id = tiny_tokenizer.pad_token_id
    with torch.no_grad():
        logps, counts = response_logps(model, collate_dpo(rows, pad_id, False, pack=False))
        packed_logps, packed_counts = response_logps(model, collate_dpo(rows, pad_id, False, pack=True))
    torch.testing.assert_close(packed_logps, logps)
    torch.testing.assert_close(packed_counts, counts.to(packed_counts.dtype))


def test_shape_buckets_pad_rows_and_length():
    rows = random_pairs(11, 50, seed=3)
    tight = pack_pairs(rows, pad_id=0)
    bucketed = pack_pairs(rows, pad_id=0, length_multiple=64, rows_multiple=4)
    r, length = bucketed["input_ids"].shape
    assert length == 64 and r % 4 == 0 and bucketed["attention_mask"].shape == (r, 1, 64, 64)
    assert tight["input_ids"].shape[1] < 64  # the tight layout is shorter: the buckets really padded
    # every sequence keeps its response tokens, in order; each target sits at its predicting position + 1
    per_seq = lambda b: [b["target_ids"][b["target_seq"] == s].tolist() for s in range(22)]  # noqa: E731
    assert per_seq(bucketed) == per_seq(tight)
    flat = bucketed["input_ids"].flatten()
    assert flat[bucketed["target_index"][bucketed["target_seq"] < 11] + 1].tolist() == [
        t for t, s in zip(bucketed["target_ids"].tolist(), bucketed["target_seq"].tolist()) if s < 11
    ]  # chosen tokens follow their predictor directly (rejected token 0 is predicted by the prompt's end)
    assert not bucketed["attention_mask"].sum(-1).eq(0).any()  # no query row of padding is empty


def test_shape_buckets_keep_logps_and_loss(tiny_model_dir, tiny_tokenizer):
    from rlxf.data.packing import PackShapes
    from rlxf.trainers.dpo import DPOConfig, dpo_batch_loss

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    rm = RewardModel.from_pretrained(tiny_model_dir).eval()
    rows = random_pairs(13, len(tiny_tokenizer), seed=4)
    pad_id = tiny_tokenizer.pad_token_id
    shapes = PackShapes(length_multiple=32, rows_multiple=4)
    cfg = DPOConfig(model="unused", train_file="unused")
    with torch.no_grad():
        tight = collate_dpo(rows, pad_id, False, pack=True)
        bucketed = collate_dpo(rows, pad_id, False, pack=True, shapes=shapes)
        assert bucketed["input_ids"].shape[1] % 32 == 0 and bucketed["input_ids"].shape[0] % 4 == 0
        assert bucketed["input_ids"].shape != tight["input_ids"].shape
        logps, counts = response_logps(model, tight)
        b_logps, b_counts = response_logps(model, bucketed)
        torch.testing.assert_close(b_logps, logps, rtol=1e-5, atol=1e-5)  # fp32 rounding only
        assert torch.equal(b_counts, counts)
        ref = {"ref_chosen_logp": -5.0, "ref_rejected_logp": -6.0}
        rows_ref = [r | ref for r in rows]
        loss, _ = dpo_batch_loss(model, None, collate_dpo(rows_ref, pad_id, False, True), cfg)
        b_loss, _ = dpo_batch_loss(model, None, collate_dpo(rows_ref, pad_id, False, True, shapes), cfg)
        torch.testing.assert_close(b_loss, loss, rtol=1e-6, atol=1e-6)
        rewards = pair_rewards(rm, collate_pairs(rows, pad_id, False, False, pack=True))
        b_rewards = pair_rewards(rm, collate_pairs(rows, pad_id, False, False, pack=True, shapes=shapes))
    torch.testing.assert_close(torch.stack(b_rewards), torch.stack(rewards), rtol=1e-5, atol=1e-5)


def test_packed_attention_kernels_give_the_same_logps(tiny_model_dir, tiny_tokenizer):
    import pytest

    from rlxf.data.packing import packed_attention

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    batch = collate_dpo(random_pairs(5, len(tiny_tokenizer), seed=5), tiny_tokenizer.pad_token_id, False, pack=True)
    with torch.no_grad():
        auto, _ = response_logps(model, batch)
        for choice in ("math", "efficient", "cudnn"):  # on the CPU the GPU kernels fall back to math
            with packed_attention(choice):
                torch.testing.assert_close(response_logps(model, batch)[0], auto, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="packed_attention"):
        packed_attention("fast")
