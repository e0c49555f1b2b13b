"""Reward sources (rlxf.rewards.sources): the (B, T) reward contract on hand-made inputs."""

from __future__ import annotations

import pytest
import torch

from rlxf.hf import load_tokenizer
from rlxf.models.reward_model import RewardModel
from rlxf.models.tiny import train_tokenizer
from rlxf.rewards.sources import (
    CallableSource,
    DPOImplicitRewardSource,
    FactWorldGoldSource,
    RewardModelSource,
    WeightedSum,
    build_reward_source,
    response_mask,
    token_char_offsets,
)
from rlxf.worlds.factworld import fact_response, fact_row, load_factworld

TEXT = " Zorbin's colour is red."


@pytest.fixture(scope="module")
def bpe():
    """A BPE tokenizer with merges (vocab 300 > 256 bytes): ' red' is one token."""
    return train_tokenizer([TEXT.strip(), "the cat is red", "Zorbin's pet is cat."] * 5, vocab_size=300)


@pytest.fixture(scope="module")
def chars():
    """vocab_size <= 256 leaves no room for merges: a character-level (byte-level) tokenizer."""
    return train_tokenizer([TEXT], vocab_size=200)


def encode(tok, text: str, eos: bool = True) -> list[int]:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return ids + [tok.eos_token_id] if eos else ids


# --------------------------------------------------------------------------------------------- offsets and mask


def test_response_mask_right_padded():
    mask = response_mask([[5, 6, 7], [1], [2, 3]])
    assert mask.tolist() == [[True, True, True], [True, False, False], [True, True, False]]


def test_offsets_by_decoding_token_by_token(bpe, chars):
    ids = encode(bpe, TEXT)
    assert [bpe.decode([i]) for i in ids] == [" ", "Zorbin", "'s", " colour", " is", " red", ".", "<|eos|>"]
    # each token covers the characters its decode adds; EOS decodes to nothing: an empty span at the end
    expected = [(0, 1), (1, 7), (7, 9), (9, 16), (16, 19), (19, 23), (23, 24), (24, 24)]
    assert token_char_offsets(ids, TEXT, bpe) == expected
    # a character-level tokenizer: token i is character i
    ids = encode(chars, TEXT)
    assert token_char_offsets(ids, TEXT, chars) == [(i, i + 1) for i in range(len(TEXT))] + [(24, 24)]


def test_offsets_follow_the_sampled_ids_not_a_re_encoding(bpe):
    # The policy may spell " red" as " " + "r" + "e" + "d": offsets must describe those ids, one char each.
    ids = encode(bpe, " is", eos=False) + [bpe.convert_tokens_to_ids(c) for c in ("Ġ", "r", "e", "d")]
    assert token_char_offsets(ids, " is red", bpe) == [(0, 3), (3, 4), (4, 5), (5, 6), (6, 7)]


def test_offsets_reject_a_text_of_other_ids(bpe):
    with pytest.raises(ValueError, match="decode to"):
        token_char_offsets(encode(bpe, " is red"), " is blue", bpe)


def test_multibyte_character_is_covered_by_the_token_that_completes_it(chars):
    # "é" is 2 bytes = 2 byte-level tokens; the first decodes to a replacement char, not a prefix: empty span
    text = " é"
    ids = encode(chars, text, eos=False)
    assert len(ids) == 3
    assert token_char_offsets(ids, text, chars) == [(0, 1), (1, 1), (1, 2)]


# --------------------------------------------------------------------------------------------- callable source


def reward_scalar(prompts, texts):
    return [float(len(t)) for t in texts]


def reward_mixed(prompts, texts):
    # response 0: a number; response 1: one reward per token; response 2: a span that cuts " red" (19..23) in two
    return [2.0, [0.1, 0.2, 0.3], [(20, 22, -1.0), (1, 9, 0.5)]]


def test_callable_scalar_goes_on_the_last_token(bpe):
    source = CallableSource(f"{__name__}:reward_scalar")
    texts = [" is red", " red"]
    ids = [encode(bpe, t) for t in texts]  # [" is", " red", EOS], [" red", EOS]
    rewards, mask = source([{"prompt": "q"}] * 2, ids, texts, bpe)
    torch.testing.assert_close(rewards, torch.tensor([[0.0, 0.0, 7.0], [0.0, 4.0, 0.0]]))
    assert mask.tolist() == [[True, True, True], [True, True, False]]


def test_callable_numbers_lists_and_spans(bpe):
    texts = [" red", " is red", TEXT]
    ids = [encode(bpe, " red"), encode(bpe, " is red"), encode(bpe, TEXT)]  # 2, 3, 8 tokens
    rewards, mask = CallableSource(reward_mixed)([{"prompt": "q"}] * 3, ids, texts, bpe)
    expected = torch.zeros(3, 8)
    expected[0, 1] = 2.0  # the EOS of " red"
    expected[1, :3] = torch.tensor([0.1, 0.2, 0.3])
    expected[2, 5] = -1.0  # [20, 22) cuts the token " red" = [19, 23): it lands on that token
    expected[2, 2] = 0.5  # [1, 9) "Zorbin's" ends in the token "'s" = [7, 9)
    torch.testing.assert_close(rewards, expected)
    assert mask.sum(-1).tolist() == [2, 3, 8]


def test_callable_errors(bpe):
    ids, texts = [encode(bpe, " red")], [" red"]
    with pytest.raises(ValueError, match="1 token rewards for 2 response tokens"):
        CallableSource(lambda p, t: [[1.0]])([{"prompt": "q"}], ids, texts, bpe)
    with pytest.raises(ValueError, match="returned 2 items for 1 responses"):
        CallableSource(lambda p, t: [1.0, 2.0])([{"prompt": "q"}], ids, texts, bpe)
    with pytest.raises(TypeError, match="got str"):
        CallableSource(lambda p, t: ["good"])([{"prompt": "q"}], ids, texts, bpe)
    with pytest.raises(ValueError, match="overlap no token"):
        CallableSource(lambda p, t: [[(10, 12, 1.0)]])([{"prompt": "q"}], ids, texts, bpe)
    with pytest.raises(ValueError, match="no token"):
        CallableSource(lambda p, t: [1.0])([{"prompt": "q"}], [[]], [""], bpe)


# --------------------------------------------------------------------------------------------- FactWorld gold


def test_factworld_wrong_fact_gets_minus_one_on_the_last_token_of_its_value(factworld_dir, factworld_model_dir):
    world = load_factworld(factworld_dir)
    tok = load_tokenizer(factworld_model_dir)
    entity, truth = next(iter(world.kb.entities.items()))
    row = fact_row(world.kb, entity, ["colour", "pet"])
    wrong_pet = next(v for v in world.kb.values["pet"] if v != truth["pet"])
    text = fact_response(entity, [("colour", truth["colour"]), ("pet", wrong_pet)])
    ids = encode(tok, text)
    offsets = token_char_offsets(ids, text, tok)

    def last_token_of(value: str) -> int:
        end = text.rindex(value) + len(value)  # the value's end character (exclusive)
        return max(i for i, (s, e) in enumerate(offsets) if s < end and e > end - len(value) and e > s)

    rewards, mask = FactWorldGoldSource(factworld_dir, level="token")([row], [ids], [text], tok)
    expected = torch.zeros(1, len(ids))
    expected[0, last_token_of(truth["colour"])] = 1.0  # requested and right
    expected[0, last_token_of(wrong_pet)] = -1.0  # requested and wrong: a hallucination
    torch.testing.assert_close(rewards, expected)
    assert mask.all()

    # sequence level: the gold score (1 − 1) / 2 = 0 on the EOS; with a right pet it is (1 + 1) / 2 = 1
    right = fact_response(entity, [("colour", truth["colour"]), ("pet", truth["pet"])])
    texts, id_lists = [text, right], [ids, encode(tok, right)]
    rewards, _ = FactWorldGoldSource(factworld_dir)([row, row], id_lists, texts, tok)
    assert rewards.sum(-1).tolist() == [0.0, 1.0]
    assert rewards[1, len(id_lists[1]) - 1] == 1.0

    # a missing fact costs nothing per token unless missing_on_last; then the total is the raw score 1 − 1 = 0
    only_colour = fact_response(entity, [("colour", truth["colour"])])
    id_lists = [encode(tok, only_colour)]
    plain = FactWorldGoldSource(factworld_dir, level="token")([row], id_lists, [only_colour], tok)[0]
    with_missing = FactWorldGoldSource(factworld_dir, level="token", missing_on_last=True)
    assert plain.sum().item() == 1.0
    assert with_missing([row], id_lists, [only_colour], tok)[0].sum().item() == 0.0


# --------------------------------------------------------------------------------------------- reward model


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory, tiny_model_dir):
    out = tmp_path_factory.mktemp("rm")
    torch.manual_seed(0)
    RewardModel.from_pretrained(tiny_model_dir).save_pretrained(out)
    load_tokenizer(tiny_model_dir).save_pretrained(out)
    return out


def test_reward_model_scalar_and_per_token(rm_dir):
    tok = load_tokenizer(rm_dir)
    rm = RewardModel.from_pretrained(rm_dir).eval()
    prompts = [{"prompt": "what colour is the cat?"}, {"prompt": "the dog"}]
    texts = [" red.", " is blue and red"]
    ids = [encode(tok, texts[0]), encode(tok, texts[1], eos=False)]  # one finished, one cut at the length limit
    prompt_ids = [[tok.bos_token_id, *encode(tok, p["prompt"], eos=False)] for p in prompts]
    with torch.no_grad():  # naive twin: each sequence alone, no padding
        values = [rm(torch.tensor([p + r]), torch.ones(1, len(p) + len(r), dtype=torch.long))[0] for p, r in
                  zip(prompt_ids, ids)]  # fmt: skip

    rewards, mask = RewardModelSource(rm_dir, device="cpu")(prompts, ids, texts, tok)
    for b, (p, r) in enumerate(zip(prompt_ids, ids)):
        expected = torch.zeros(mask.shape[1])
        expected[len(r) - 1] = values[b][-1]  # the head at the last token (EOS when finished)
        torch.testing.assert_close(rewards[b], expected)

    per_token, _ = RewardModelSource(rm_dir, per_token=True, device="cpu")(prompts, ids, texts, tok)
    for b, (p, r) in enumerate(zip(prompt_ids, ids)):
        v = values[b]
        n = len(r)
        # increments v_t − v_(t−1) over the response, v_(−1) = the value at the prompt's last token
        expected = torch.tensor([v[len(p) + t] - v[len(p) + t - 1] for t in range(n)])
        torch.testing.assert_close(per_token[b, :n], expected)
        assert not per_token[b, n:].any()
        # they telescope to the final reward minus the value at the prompt's end
        torch.testing.assert_close(per_token[b].sum(), v[-1] - v[len(p) - 1])

    # `prompt_ids` in the row is used as is: the same numbers
    rows = [{**p, "prompt_ids": pid} for p, pid in zip(prompts, prompt_ids)]
    torch.testing.assert_close(RewardModelSource(rm_dir, device="cpu")(rows, ids, texts, tok)[0], rewards)


def test_reward_model_rejects_another_tokenizer(rm_dir, bpe):
    with pytest.raises(ValueError, match="another tokenizer"):
        RewardModelSource(rm_dir, device="cpu")([{"prompt": "q"}], [encode(bpe, " red")], [" red"], bpe)


# --------------------------------------------------------------------------------------------- DPO implicit rewards


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory, tiny_model_dir):
    """A fake `rlxf dpo` run: OUT/final holds a policy (the tiny model with perturbed weights), OUT/config.json names
    the reference (the tiny model) and β = 0.3."""
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("dpo-run")
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    policy.save_pretrained(out / "final")
    load_tokenizer(tiny_model_dir).save_pretrained(out / "final")
    (out / "config.json").write_text(f'{{"model": "{tiny_model_dir}", "ref_model": "", "beta": 0.3}}')
    return out


def test_dpo_implicit_rewards_match_per_sequence_loop(dpo_run, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(tiny_model_dir)
    policy = AutoModelForCausalLM.from_pretrained(dpo_run / "final").eval()
    ref = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    prompts = [{"prompt": "what colour is the cat?"}, {"prompt": "the dog"}, {"prompt": "a"}]
    texts = [" red.", " is blue and red", " fish"]
    ids = [encode(tok, texts[0]), encode(tok, texts[1], eos=False), encode(tok, texts[2])]
    prompt_ids = [[tok.bos_token_id, *encode(tok, p["prompt"], eos=False)] for p in prompts]

    source = DPOImplicitRewardSource(dpo_run / "final", device="cpu", batch_size=2)  # 2 batches, one padded
    assert source.beta == 0.3 and source.ref_dir == tiny_model_dir  # both from OUT/config.json
    rewards, mask = source(prompts, ids, texts, tok)
    assert mask.sum(-1).tolist() == [len(r) for r in ids]
    for b, (p, r) in enumerate(zip(prompt_ids, ids)):
        seq = torch.tensor([p + r])
        with torch.no_grad():  # naive twin: each sequence alone, no padding; token y_t is predicted at len(p) + t − 1
            lp = policy(seq).logits[0].double().log_softmax(-1)
            lr = ref(seq).logits[0].double().log_softmax(-1)
        expected = [0.3 * (lp[len(p) + t - 1, y] - lr[len(p) + t - 1, y]).item() for t, y in enumerate(r)]
        torch.testing.assert_close(rewards[b, : len(r)], torch.tensor(expected, dtype=torch.float32))
        assert not rewards[b, len(r) :].any()
        # the per-token rewards sum to the sequence's implicit DPO reward β·(log π(y|x) − log π_ref(y|x))
        total = 0.3 * sum(lp[len(p) + t - 1, y].item() - lr[len(p) + t - 1, y].item() for t, y in enumerate(r))
        torch.testing.assert_close(rewards[b].sum(), torch.tensor(total, dtype=torch.float32))


def test_dpo_spec_reference_and_beta(dpo_run, tiny_model_dir, tmp_path):
    source = build_reward_source(f"dpo:{dpo_run / 'final'}", device="cpu")
    assert isinstance(source, DPOImplicitRewardSource) and source.beta == 0.3
    source = build_reward_source(f"dpo:{dpo_run / 'final'}:{tiny_model_dir}:beta=0.5", device="cpu")
    assert source.beta == 0.5 and source.ref_dir == tiny_model_dir
    # a model dir without a run config: β defaults to 0.1, and the reference must be named
    assert build_reward_source(f"dpo:{tiny_model_dir}:{dpo_run / 'final'}", device="cpu").beta == 0.1
    with pytest.raises(ValueError, match="needs its reference model"):
        build_reward_source(f"dpo:{tiny_model_dir}", device="cpu")
    # the rewards of a model against itself are 0
    tok = load_tokenizer(tiny_model_dir)
    same = build_reward_source(f"dpo:{tiny_model_dir}:{tiny_model_dir}", device="cpu")
    rewards, _ = same([{"prompt": "the cat"}], [encode(tok, " red")], [" red"], tok)
    assert not rewards.any()


# --------------------------------------------------------------------------------------------- sums and specs


def test_weighted_sum(bpe):
    texts = [" red"]
    ids = [encode(bpe, " red")]
    a, b = CallableSource(lambda p, t: [1.0]), CallableSource(lambda p, t: [[0.5, 0.25]])
    rewards, mask = WeightedSum([(2.0, a), (-4.0, b)])([{"prompt": "q"}], ids, texts, bpe)
    # 2·[0, 1] − 4·[0.5, 0.25] = [−2, 1]
    torch.testing.assert_close(rewards, torch.tensor([[-2.0, 1.0]]))
    assert mask.all()


def test_build_reward_source_parses_specs(factworld_dir, rm_dir):
    source = build_reward_source(f"callable:{__name__}:reward_scalar")
    assert isinstance(source, CallableSource) and source.fn is reward_scalar
    source = build_reward_source(f"factworld:{factworld_dir}:token")
    assert isinstance(source, FactWorldGoldSource) and source.level == "token"
    assert build_reward_source(f"factworld:{factworld_dir}").level == "sequence"
    source = build_reward_source(f"rm:{rm_dir}:token", device="cpu")
    assert isinstance(source, RewardModelSource) and source.per_token
    source = build_reward_source(f"0.5*rm:{rm_dir} + -2*factworld:{factworld_dir}:token", device="cpu")
    assert isinstance(source, WeightedSum)
    assert [w for w, _ in source.terms] == [0.5, -2.0]
    assert not source.terms[0][1].per_token and source.terms[1][1].level == "token"
    assert not hasattr(source, "world")  # gold logging reads --gold_world, not the reward source


@pytest.mark.parametrize(
    ("spec", "error", "match"),
    [
        ("", ValueError, "empty reward spec"),
        ("rm", ValueError, "no 'KIND:ARGS'"),
        (
            "gold:runs/x",
            ValueError,
            r"unknown reward kind 'gold'.*\['callable', 'dpo', 'factworld', 'rlaif', 'rm', 'seq2seq'\]",
        ),
        ("dpo:/nonexistent/dpo", FileNotFoundError, "does not exist"),
        ("dpo:a:b:c", ValueError, r"expected 'dpo:DIR\[:REF_DIR\]\[:beta=B\]'"),
        ("dpo:a:beta=x", ValueError, "'beta=x'.*not a number"),
        ("callable:nomodule_xyz:fn", ImportError, "cannot import module 'nomodule_xyz'"),
        (f"callable:{__name__}:nope", AttributeError, "has no attribute 'nope'"),
        (f"abc*callable:{__name__}:reward_scalar", ValueError, "weight 'abc'.*not a number"),
        (f"callable:{__name__}:reward_scalar+", ValueError, "stray"),
        ("factworld:/nonexistent/world", FileNotFoundError, "kb.json not found"),
    ],
)
def test_build_reward_source_errors(spec, error, match):
    with pytest.raises(error, match=match):
        build_reward_source(spec)


def test_rlaif_spec_builds_a_direct_score_source(tiny_model_dir):
    """'rlaif:DIR?task=helpful' is d-RLAIF through the reward contract: one scalar in [-1, 1] on the last token."""
    from rlxf.rewards.rlaif import DirectScoreSource

    source = build_reward_source(f"rlaif:{tiny_model_dir}?task=helpful")
    assert isinstance(source, DirectScoreSource)
    rewards, mask = source([{"prompt": "Human: hi"}] * 2, [[5, 6, 7], [8]], ["a reply", "b"], tokenizer=None)
    assert rewards.shape == mask.shape == (2, 3)
    assert rewards[0, :2].abs().sum() == 0 and -1 <= float(rewards[0, 2]) <= 1 and -1 <= float(rewards[1, 0]) <= 1


def test_rlaif_spec_wording_picks_the_rater_prompt(tiny_model_dir):
    """Summarisation scores with the paper's d-RLAIF prompt by default; `wording=rlxf` picks rlxf's wording, and a
    wording a task does not have is a clear error naming the ones it has."""
    from rlxf.errors import UserError

    paper = build_reward_source(f"rlaif:{tiny_model_dir}")
    rlxf_wording = build_reward_source(f"rlaif:{tiny_model_dir}?wording=rlxf")
    assert "Given a TEXT (completed with a SUBREDDIT and a TITLE)" in paper.prompts(["x"], ["y"])[0].text
    assert "Given a piece of text and a SUMMARY" in rlxf_wording.prompts(["x"], ["y"])[0].text
    with pytest.raises(UserError, match=r"no 'paper' d-RLAIF wording for task 'helpful'; choose one of \['rlxf'\]"):
        build_reward_source(f"rlaif:{tiny_model_dir}?task=helpful&wording=paper")
