import torch
from transformers import AutoModelForSequenceClassification

from rlxf.data.tokenize import pad
from rlxf.models.reward_model import RewardModel, last_token_index, positions_from_mask


def test_last_token_index_both_padding_sides():
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert last_token_index(right).tolist() == [2, 4, 0]
    assert last_token_index(left).tolist() == [4, 4, 4]
    assert positions_from_mask(left)[0].tolist() == [0, 0, 0, 1, 2]


def test_reward_is_the_same_with_left_and_right_padding_and_pad_equal_to_eos(tiny_model_dir):
    rm = RewardModel.from_pretrained(tiny_model_dir).eval()
    eos = rm.config.eos_token_id
    # Sequences that end in EOS, padded with EOS: pooling by pad id would pick the wrong token.
    seqs = [[1, 20, 21, 22, eos], [1, 30, eos], [1, 40, 41, 42, 43, 44, 45, eos]]
    with torch.no_grad():
        alone = torch.stack(
            [rm.sequence_rewards(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))[0] for s in seqs]
        )
        results = {}
        for side in ("left", "right"):
            ids, mask = pad(seqs, pad_id=eos, side=side)
            results[side] = rm.sequence_rewards(ids, mask)
    torch.testing.assert_close(results["right"], alone, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(results["left"], alone, rtol=1e-4, atol=1e-5)


def test_values_at_every_position_match_prefix_rewards(tiny_model_dir):
    # Causal attention: the value at position t is the reward of the prefix ending at t.
    rm = RewardModel.from_pretrained(tiny_model_dir).eval()
    seq = torch.tensor([[1, 20, 21, 22, 23]])
    with torch.no_grad():
        values = rm(seq, torch.ones_like(seq))
        prefix = [rm.sequence_rewards(seq[:, : t + 1], torch.ones(1, t + 1, dtype=torch.long)) for t in range(5)]
    torch.testing.assert_close(values[0], torch.cat(prefix), rtol=1e-4, atol=1e-5)


def test_saved_reward_model_reloads_with_transformers(tiny_model_dir, tmp_path):
    rm = RewardModel.from_pretrained(tiny_model_dir).eval()
    rm.save_pretrained(tmp_path)
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    again = RewardModel.from_pretrained(tmp_path).eval()
    ids = torch.tensor([[1, 20, 21, 22]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        torch.testing.assert_close(again.sequence_rewards(ids, mask), rm.sequence_rewards(ids, mask))
        # transformers' own pooling (last non-pad token, no padding here) agrees with ours
        torch.testing.assert_close(hf(input_ids=ids, attention_mask=mask).logits[:, 0], rm.sequence_rewards(ids, mask))


def test_a_new_head_is_one_log_line_not_a_load_report(tiny_model_dir, caplog, capfd):
    """Starting a reward model from a causal LM says in one line that the head is new (transformers' load report
    table would be printed on every RM run)."""
    import logging

    from rlxf.models.reward_model import RewardModel

    with caplog.at_level(logging.INFO, logger="rlxf.models.reward_model"):
        RewardModel.from_pretrained(tiny_model_dir)
    assert "reward head ['score.weight'] is new" in caplog.text
    out, err = capfd.readouterr()
    assert "LOAD REPORT" not in out + err and "MISSING" not in out + err
