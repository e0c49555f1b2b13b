import random

import pytest
import torch

from rlxf.errors import UserError
from rlxf.models.tiny import train_tokenizer
from rlxf.rewards.contract import (
    combine_rewards,
    list_to_token_rewards,
    load_callable,
    scalar_to_token_rewards,
    spans_to_token_rewards,
)

TEXT = "Alice lives in Paris. The cat is blue."
CORPUS = ["the cat sat on the mat. Paris is blue.", "Alice lives in Paris. Her pet is a cat."] * 20


@pytest.fixture(scope="module")
def tokenizer():
    # vocab_size=300, not 200: the byte-level alphabet alone has 256 symbols, so below that BPE learns no merge and
    # every token is one character, and no span could cut a token in two.
    return train_tokenizer(CORPUS, vocab_size=300)


@pytest.fixture(scope="module")
def text_offsets(tokenizer):
    enc = tokenizer(TEXT, return_offsets_mapping=True)  # with BOS, whose offsets are (0, 0)
    tokens = tokenizer.convert_ids_to_tokens(enc["input_ids"])
    # The premise of the hand-computed cases below (Ġ is a leading space):
    assert tokens == [
        "<|bos|>",
        "Alice",
        "Ġlives",
        "Ġin",
        "ĠParis",
        ".",
        "Ġ",
        "T",
        "he",
        "Ġcat",
        "Ġis",
        "Ġbl",
        "ue",
        ".",
    ]
    return enc["offset_mapping"]


def span(sub: str, reward: float, text: str = TEXT) -> tuple[int, int, float]:
    start = text.index(sub)
    return (start, start + len(sub), reward)


# ---------------------------------------------------------------------------------------------------------------------
# scalar and list adapters
# ---------------------------------------------------------------------------------------------------------------------


def test_scalar_to_token_rewards_any_layout():
    # row 0 right-padded, row 1 after a 2-token prompt, row 2 left-padded: the score sits on the last True
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1], [0, 1, 1, 1]], dtype=torch.bool)
    rewards, out_mask = scalar_to_token_rewards(torch.tensor([1.5, -2.0, 3.0]), mask)
    expected = torch.tensor([[0.0, 1.5, 0.0, 0.0], [0.0, 0.0, 0.0, -2.0], [0.0, 0.0, 0.0, 3.0]])
    torch.testing.assert_close(rewards, expected)
    assert torch.equal(out_mask, mask)
    # integer scores become float32; the sum of a row is its score
    rewards, _ = scalar_to_token_rewards(torch.tensor([1, 2, 3]), mask)
    assert rewards.dtype == torch.float32 and rewards.sum(-1).tolist() == [1.0, 2.0, 3.0]


def test_scalar_to_token_rewards_rejects_empty_rows():
    mask = torch.tensor([[1, 1], [0, 0]], dtype=torch.bool)
    with pytest.raises(ValueError, match=r"rows \[1\] have no response token"):
        scalar_to_token_rewards(torch.tensor([1.0, 2.0]), mask)


def test_list_to_token_rewards():
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 1, 1]], dtype=torch.bool)  # right padding; prompt region
    rewards, out_mask = list_to_token_rewards([[0.1, 0.2, 0.3], torch.tensor([1.0, 2.0])], mask)
    torch.testing.assert_close(rewards, torch.tensor([[0.1, 0.2, 0.3, 0.0], [0.0, 0.0, 1.0, 2.0]]))
    assert torch.equal(out_mask, mask)
    with pytest.raises(ValueError, match="row 1: 3 rewards for 2 response tokens"):
        list_to_token_rewards([[0.1, 0.2, 0.3], [1.0, 2.0, 3.0]], mask)
    with pytest.raises(ValueError, match="one per row"):
        list_to_token_rewards([[0.1, 0.2, 0.3]], mask)


# ---------------------------------------------------------------------------------------------------------------------
# spans, through a real tokenizer's offsets
# ---------------------------------------------------------------------------------------------------------------------


def test_spans_by_hand(text_offsets):
    n = len(text_offsets)  # 14 tokens: BOS, Alice, Ġlives, Ġin, ĠParis, ., Ġ, T, he, Ġcat, Ġis, Ġbl, ue, .
    # "Paris" (15, 20) lies inside "ĠParis" (14, 20): token 4
    # "lives in" (6, 14) overlaps "Ġlives" and "Ġin": the last one, token 3
    # "blue" (33, 37) overlaps "Ġbl" (32, 35) and "ue" (35, 37): token 12
    got = spans_to_token_rewards([span("Paris", 1.0), span("lives in", -1.0), span("blue", 0.5)], text_offsets, n)
    expected = torch.zeros(n)
    expected[4], expected[3], expected[12] = 1.0, -1.0, 0.5
    torch.testing.assert_close(got, expected)


def test_span_cutting_a_token_lands_on_it(text_offsets):
    n = len(text_offsets)
    # "Par" (15, 18) cuts "ĠParis" (14, 20) in two: still token 4
    torch.testing.assert_close(spans_to_token_rewards([span("Par", 2.0)], text_offsets, n)[4], torch.tensor(2.0))
    # "lu" (34, 36) cuts both "Ġbl" (32, 35) and "ue" (35, 37): the last one, token 12
    torch.testing.assert_close(spans_to_token_rewards([span("lu", 2.0)], text_offsets, n)[12], torch.tensor(2.0))


def test_spans_ending_on_the_same_token_add_up(text_offsets):
    n = len(text_offsets)
    # "Pa" (15, 17) and "ris" (17, 20) both end in "ĠParis": 1 + 2 = 3 on token 4; "Paris." ends on "." (token 5)
    got = spans_to_token_rewards([span("Pa", 1.0), span("ris", 2.0), span("Paris.", 5.0)], text_offsets, n)
    expected = torch.zeros(n)
    expected[4], expected[5] = 3.0, 5.0
    torch.testing.assert_close(got, expected)


def test_special_tokens_with_empty_offsets_never_match(text_offsets):
    n = len(text_offsets)
    # BOS has (0, 0); "Alice" (0, 5) goes on token 1, "A" (0, 1) too; BOS gets nothing
    got = spans_to_token_rewards([span("Alice", 1.0), span("A", 1.0)], text_offsets, n)
    assert got[0] == 0 and got[1] == 2.0
    # an empty-offset token placed after the span's last real token is not "the last overlapping token"
    got = spans_to_token_rewards([(0, 5, 1.0)], [(0, 3), (4, 4), (5, 8)], 3)
    torch.testing.assert_close(got, torch.tensor([1.0, 0.0, 0.0]))


def test_unmatched_spans_raise_or_drop(text_offsets):
    n = len(text_offsets)
    for bad in [(100, 105, 1.0), (5, 5, 1.0)]:  # past the text; empty
        with pytest.raises(ValueError, match="overlap no token"):
            spans_to_token_rewards([span("cat", 1.0), bad], text_offsets, n)
        got = spans_to_token_rewards([span("cat", 1.0), bad], text_offsets, n, unmatched="drop")
        assert got.sum() == 1.0 and got[9] == 1.0  # "cat" is in "Ġcat", token 9
    with pytest.raises(ValueError, match="start <= end"):
        spans_to_token_rewards([(5, 3, 1.0)], text_offsets, n)
    with pytest.raises(ValueError, match="'raise' or 'drop'"):
        spans_to_token_rewards([], text_offsets, n, unmatched="ignore")


def test_spans_length_pads_and_checks(text_offsets):
    got = spans_to_token_rewards([span("blue", 1.0)], text_offsets, 20)
    assert got.shape == (20,) and got[12] == 1.0 and got.sum() == 1.0
    assert not spans_to_token_rewards([], text_offsets, 20).any()
    with pytest.raises(ValueError, match="do not fit"):
        spans_to_token_rewards([], text_offsets, 5)


def spans_loop(spans, offsets, length):
    """The plainest rule: for each span, the last token with a non-empty overlap."""
    out = [0.0] * length
    for s, e, r in spans:
        last = None
        for i, (a, b) in enumerate(offsets):
            if b > a and a < e and b > s:
                last = i
        if last is not None:
            out[last] += r
    return out


def test_spans_match_loop(tokenizer):
    rng = random.Random(0)
    for text in ["Alice lives in Paris. Her pet is a cat.", "the cat sat on the mat, Paris is blue", "blue cat"]:
        offsets = tokenizer(text, return_offsets_mapping=True)["offset_mapping"]
        spans = []
        for _ in range(12):
            s = rng.randrange(len(text))
            spans.append((s, rng.randint(s + 1, len(text)), round(rng.uniform(-1, 1), 3)))
        got = spans_to_token_rewards(spans, offsets, len(offsets) + 2)
        torch.testing.assert_close(got, torch.tensor(spans_loop(spans, offsets, len(offsets) + 2)))


def test_spans_into_a_batch_with_a_prompt_region(tokenizer):
    # Each response is tokenized on its own (offsets relative to the response text), then placed after its prompt.
    responses = ["The cat is blue.", "Alice lives in Paris."]
    spans = [[span("blue", -1.0, responses[0])], [span("Paris", 1.0, responses[1]), span("Alice", 0.5, responses[1])]]
    encs = [tokenizer(r, return_offsets_mapping=True, add_special_tokens=False) for r in responses]
    prompt_len, t = 3, 3 + max(len(e["input_ids"]) for e in encs)
    mask = torch.zeros(2, t, dtype=torch.bool)
    for b, e in enumerate(encs):
        mask[b, prompt_len : prompt_len + len(e["input_ids"])] = True
    rows = [spans_to_token_rewards(s, e["offset_mapping"], len(e["input_ids"])) for s, e in zip(spans, encs)]
    rewards, _ = list_to_token_rewards(rows, mask)
    for b, (e, resp) in enumerate(zip(encs, responses)):
        toks = tokenizer.convert_ids_to_tokens(e["input_ids"])
        placed = {toks[t_ - prompt_len]: r for t_, r in enumerate(rewards[b].tolist()) if r}
        assert placed == ({"ue": -1.0} if b == 0 else {"ĠParis": 1.0, "Alice": 0.5}), (toks, placed)
    assert not rewards[~mask].any()


# ---------------------------------------------------------------------------------------------------------------------
# combining sources, loading user functions
# ---------------------------------------------------------------------------------------------------------------------


def test_combine_rewards():
    a, b = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([[0.5, 0.5], [1.0, 1.0]])
    # 2·a − 1·b
    torch.testing.assert_close(combine_rewards([(2.0, a), (-1.0, b)]), torch.tensor([[1.5, -0.5], [-1.0, 3.0]]))
    with pytest.raises(ValueError, match="share one"):
        combine_rewards([(1.0, a), (1.0, torch.zeros(2, 3))])
    with pytest.raises(ValueError, match="at least one"):
        combine_rewards([])


def test_load_callable(tmp_path, monkeypatch):
    import math
    from collections import OrderedDict

    assert load_callable("math:sqrt") is math.sqrt
    assert load_callable("collections:OrderedDict.fromkeys") == OrderedDict.fromkeys
    with pytest.raises(ValueError, match="module:function"):
        load_callable("math.sqrt")
    with pytest.raises(ImportError, match="cannot import module 'no_such_rewards_mod'"):
        load_callable("no_such_rewards_mod:score")
    with pytest.raises(AttributeError, match=r"'math' has no attribute 'sqrtt'.*'sqrt'"):
        load_callable("math:sqrtt")
    with pytest.raises(TypeError, match="not a callable"):
        load_callable("math:pi")
    # a module whose own import fails: the real missing dependency is named, not a misleading "module not found",
    # and it is a user error (one line from the CLI)
    (tmp_path / "user_rewards_broken.py").write_text("import no_such_dependency_xyz\n")
    (tmp_path / "user_rewards_ok.py").write_text("def score(texts):\n    return [len(t) for t in texts]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ImportError, match="importing 'user_rewards_broken'.*no_such_dependency_xyz") as info:
        load_callable("user_rewards_broken:score")
    assert isinstance(info.value, UserError)
    assert load_callable("user_rewards_ok:score")(["ab", "c"]) == [2, 1]
