"""The seq2seq RM's reward rule and its one teacher-forced pass (rlxf.rewards.seq2seq): the spec's worked examples
by hand (docs/methods/seq2seq_rm.md §4), one pass == greedy decoding until the first divergence, padding sides, ids
that do not round-trip through text, the template checked at load."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlxf.errors import UserError
from rlxf.rewards.seq2seq import (
    CONFIG_KEY,
    Seq2SeqTemplate,
    Seq2SeqTemplateError,
    reference_length,
    rewards_from_matches,
    teacher_forced_matches,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# §4 "Variants": T = 6 content tokens + EOS, first divergence at position 3
MATCH = torch.tensor([[1, 1, 0, 1, 0, 0, 1]], dtype=torch.bool)
ALL = torch.ones_like(MATCH)


def test_variant_a_worked_example():
    r = rewards_from_matches(MATCH, ALL, alpha=0.1, beta=1.0, variant="A")
    torch.testing.assert_close(r, torch.tensor([[0.1, 0.1, -1.0, 0.0, -1.0, -1.0, 0.0]]))
    assert r.sum().item() == pytest.approx(-2.8)


def test_variant_b_worked_example():
    r = rewards_from_matches(MATCH, ALL, alpha=0.1, beta=1.0, variant="B")
    torch.testing.assert_close(r, torch.tensor([[0.1, 0.1, -1.0, 0.1, -1.0, -1.0, 0.1]]))
    assert r.sum().item() == pytest.approx(-2.6)


def test_soft_variant_worked_example():
    p_token = torch.tensor([[0.9, 0.6, 0.2, 0.7, 0.05, 0.3, 0.8]])
    p_pred = torch.tensor([[0.9, 0.6, 0.5, 0.7, 0.6, 0.4, 0.8]])
    r = rewards_from_matches(MATCH, ALL, 0.1, 1.0, "soft", p_token=p_token, p_pred=p_pred, c=5.0)
    expected = torch.tensor([[0.09, 0.06, -0.1833, 0.07, -0.4970, -0.0575, 0.08]])
    torch.testing.assert_close(r, expected, atol=1e-4, rtol=0)
    assert r.sum().item() == pytest.approx(-0.4378, abs=1e-4)
    # the cap: a gap of more than c nats costs β, never more
    capped = rewards_from_matches(
        torch.tensor([[False]]),
        torch.tensor([[True]]),
        0.1,
        1.0,
        "soft",
        torch.tensor([[1e-6]]),
        torch.tensor([[0.9]]),
    )
    assert capped.item() == pytest.approx(-1.0)


def test_all_match_and_t_ref():
    t_ref = reference_length([10, 12, 30])
    assert t_ref == 12 and 1 / t_ref == pytest.approx(1 / 12)
    alpha = 1 / reference_length([100] * 3)
    every = torch.ones((1, 100), dtype=torch.bool)  # T = 99 content tokens + EOS
    for variant in ("A", "B"):
        r = rewards_from_matches(every, every, alpha, 1.0, variant)
        assert torch.all(r == alpha) and r.sum().item() == pytest.approx(1.0)


def test_eos_cases():
    # positions 1-4 match, the RM predicts EOS at 5 where the policy wrote content (then the policy's EOS at 6)
    match = torch.tensor([[1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    r = rewards_from_matches(match, torch.ones_like(match), 0.25, 1.0, "A")
    assert r[0, :4].tolist() == [0.25] * 4 and r[0, 4].item() == -1.0
    # the policy's EOS at position 3 where the RM predicts content
    match = torch.tensor([[1, 1, 0]], dtype=torch.bool)
    r = rewards_from_matches(match, torch.ones_like(match), 0.25, 1.0, "A")
    assert r[0, 2].item() == -1.0


def test_mask_and_bad_variant():
    match = torch.tensor([[1, 0, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    r = rewards_from_matches(match, mask, 0.5, 1.0, "B")
    assert r.tolist() == [[0.5, -1.0, 0.5, 0.0], [0.5, 0.5, 0.0, 0.0]]
    with pytest.raises(UserError, match="variant"):
        rewards_from_matches(match, mask, 0.5, 1.0, "C")


@pytest.fixture(scope="module")
def random_lm(tiny_model_dir):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


def greedy_until_divergence(model, context, target):
    """The paper's procedure: the RM decodes greedily while it agrees with y; from the first divergence on it is fed
    y token by token (teacher forcing). Returns ŷ_t for every position, one forward per token (the slow reference)."""
    seq, preds = list(context), []
    for t in range(len(target)):
        with torch.no_grad():
            logits = model(torch.tensor([seq])).logits[0, -1]
        pred = int(logits.argmax())
        preds.append(pred)
        # before the divergence the RM's own token is y_t; after it y_t is fed: either way y_t comes next
        seq.append(pred if pred == target[t] else target[t])
    return preds


def test_one_pass_equals_greedy_decoding_until_divergence(random_lm, tiny_tokenizer):
    g = torch.Generator().manual_seed(1)
    vocab = len(tiny_tokenizer)
    contexts, targets = [], []
    for n_ctx, n_tgt in [(5, 7), (9, 3), (3, 10)]:
        contexts.append(torch.randint(4, vocab, (n_ctx,), generator=g).tolist())
        targets.append(torch.randint(4, vocab, (n_tgt,), generator=g).tolist())
    # row 0 agrees with the model's greedy decoding for its first 3 tokens, so the greedy phase is not empty
    for t in range(3):
        with torch.no_grad():
            targets[0][t] = int(random_lm(torch.tensor([contexts[0] + targets[0][:t]])).logits[0, -1].argmax())
    m = teacher_forced_matches(random_lm, contexts, targets, pad_id=0)
    assert m.match[0, 0] and m.match[0, 1]
    for i, (ctx, tgt) in enumerate(zip(contexts, targets)):
        assert m.prediction[i, : len(tgt)].tolist() == greedy_until_divergence(random_lm, ctx, tgt)


def test_left_and_right_padding_agree(random_lm):
    contexts = [[1, 5, 6, 7, 8, 9, 10, 11], [1, 12, 13], [1, 14, 15, 16, 17]]
    targets = [[20, 21, 2], [22, 23, 24, 25, 26, 2], [27]]
    left = teacher_forced_matches(random_lm, contexts, targets, pad_id=0, padding_side="left")
    right = teacher_forced_matches(random_lm, contexts, targets, pad_id=0, padding_side="right")
    alone = [teacher_forced_matches(random_lm, [c], [t], pad_id=0) for c, t in zip(contexts, targets)]
    assert torch.equal(left.prediction, right.prediction)
    torch.testing.assert_close(left.p_token, right.p_token, atol=1e-5, rtol=1e-4)
    for i, a in enumerate(alone):
        n = len(targets[i])
        assert left.prediction[i, :n].tolist() == a.prediction[0].tolist()
        torch.testing.assert_close(left.p_pred[i, :n], a.p_pred[0], atol=1e-5, rtol=1e-4)
    assert left.mask.sum(-1).tolist() == [3, 6, 1]


def test_match_topk_counts_more_tokens_as_matches(random_lm):
    contexts, targets = [[1, 5, 6, 7]], [[8, 9, 10, 11, 12, 13]]
    top1 = teacher_forced_matches(random_lm, contexts, targets, pad_id=0, match_topk=1).match
    top_all = teacher_forced_matches(random_lm, contexts, targets, pad_id=0, match_topk=10_000).match
    assert top_all.all() and top1.sum() <= top_all.sum()


def test_template_is_built_from_ids_and_checked(tiny_tokenizer, tiny_model_dir):
    template = Seq2SeqTemplate.for_tokenizer(tiny_tokenizer, t_ref=12)
    assert template.alpha == pytest.approx(1 / 12) and template.beta == 1.0
    ctx = template.context([1, 5], [7, 8])
    assert ctx == [1, 5, *template.review_ids, 7, 8, *template.revised_ids]
    template.check(tiny_tokenizer, "here")
    changed = Seq2SeqTemplate(**{**template.to_dict(), "review_delimiter": "\n[RESPONSE]\n"})
    with pytest.raises(Seq2SeqTemplateError, match="review_delimiter"):
        changed.check(tiny_tokenizer, "here")
    assert issubclass(Seq2SeqTemplateError, UserError)
    config = AutoModelForCausalLM.from_pretrained(tiny_model_dir).config
    with pytest.raises(Seq2SeqTemplateError, match=CONFIG_KEY):
        Seq2SeqTemplate.from_config(config, "a plain LM")
