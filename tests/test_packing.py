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
