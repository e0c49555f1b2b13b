"""The one credit path (`rlxf.credit.assign`): step boundaries from character offsets, on a tokenizer whose tokens cut
multi-byte characters (its tokens' texts do not round-trip one by one), through `assign_credit` and through PPO."""

import torch
from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

from rlxf.credit.assign import assign_credit, credit_counts, credit_metrics, token_texts
from rlxf.credit.segments import CreditConfig
from rlxf.rewards.contract import token_char_offsets


def byte_chars() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the alphabet of byte-level BPE)."""
    keep = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def byte_tokenizer() -> tuple[PreTrainedTokenizerFast, dict[bytes, int]]:
    """A byte-level tokenizer with one token per byte, EOS, and one merged token b'. \\xe2': a sentence end, a space,
    and the first byte of '…' (U+2026 = e2 80 a6). Decoded alone that token is '. \\ufffd'."""
    chars = byte_chars()
    vocab = {chars[b]: b for b in range(256)}
    merged = b". \xe2"
    vocab["".join(chars[b] for b in merged)] = 256
    vocab["<eos>"] = 257
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
    ids = {bytes([b]): b for b in range(256)} | {merged: 256}
    return fast, ids


def response() -> tuple[PreTrainedTokenizerFast, list[int], str]:
    tokenizer, ids = byte_tokenizer()
    pieces = [b"H", b"i", b". \xe2", b"\x80", b"\xa6", b"O", b"k", b"."]
    response_ids = [ids[p] for p in pieces] + [tokenizer.eos_token_id]
    text = tokenizer.decode(response_ids, skip_special_tokens=True)
    assert text == "Hi. …Ok."
    return tokenizer, response_ids, text


def test_char_offsets_of_a_token_that_ends_inside_a_character():
    """The merged token covers the complete characters it ends ('. '); the token that completes '…' covers it."""
    tokenizer, response_ids, text = response()
    assert tokenizer.decode([response_ids[2]]) == ". \ufffd"  # alone, the token's text ends in a broken character
    offsets = token_char_offsets(response_ids, text, tokenizer)
    assert offsets == [(0, 1), (1, 2), (2, 4), (4, 4), (4, 5), (5, 6), (6, 7), (7, 8), (8, 8)]
    assert token_texts(response_ids, text, tokenizer) == ["H", "i", ". ", "", "…", "O", "k", ".", ""]


STEP = CreditConfig(granularity="step")
REWARDS = torch.tensor([[1.0, 1.0, 1.0, -1.0, -1.0, -1.0, -1.0, -1.0, 0.0]])


def test_step_boundaries_come_from_character_offsets():
    """Steps end after '. ' (token 2) and after '.' (token 7). Decoding token 2 alone ('. \\ufffd') misses the first
    sentence end, which merges both sentences into one negative step and masks the good first sentence."""
    tokenizer, response_ids, text = response()
    rc = assign_credit(STEP, [1], [response_ids], tokenizer, token_rewards=REWARDS, with_tokens=True)
    assert [(s.start, s.end) for s in rc.segments[0]] == [(0, 3), (3, 8), (8, 9)]
    assert rc.keep[0].tolist() == [True, True, True, False, False, False, False, False, False]
    metrics = credit_metrics(credit_counts(rc, [1]))
    assert metrics["asr/kept_frac"] == metrics["asr/kept_frac_pos"] == 3 / 9
    assert metrics["asr/segments_per_seq"] == 3


def test_ppo_credit_uses_the_same_boundaries():
    """PPO's credit mask (label = sign of the advantage) goes through the same path: same boundaries, same keep."""
    from rlxf.trainers.ppo import PPOConfig, advantages_and_masks

    tokenizer, response_ids, text = response()
    n = len(response_ids)
    traj = {
        "prompt_ids": [[1, 2], [1, 3]],
        "response_ids": [response_ids, response_ids],
        "text": [text, text],
        "rewards": [REWARDS[0], -REWARDS[0]],
        "credit_rewards": [REWARDS[0], REWARDS[0]],
        "score": [1.0, -1.0],  # rollout-mean baseline 0: labels +1 and −1
        "kl": [torch.zeros(n), torch.zeros(n)],
        "old_values": [torch.zeros(n), torch.zeros(n)],
        "old_logps": [torch.zeros(n), torch.zeros(n)],
    }
    cfg = PPOConfig(model="m", k=1, credit=STEP)
    tensors, stats = advantages_and_masks(traj, cfg, 0.0, tokenizer)
    first, second = ([True] * 3 + [False] * 6), ([False] * 3 + [True] * 5 + [False])
    assert tensors["keep"].tolist() == [first, second]
    assert stats["asr/kept_frac_pos"] == 3 / 9 and stats["asr/kept_frac_neg"] == 5 / 9
