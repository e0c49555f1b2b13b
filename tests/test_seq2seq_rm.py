"""`rlxf seq2seq-rm` and the `seq2seq:DIR` reward source end to end: a short CLI run learns to copy chosen responses and
to flag rejected ones, the template is checked at load, rewards are computed on the policy's own ids, every preference
format trains, and PPO / weighted sums / adaptive segments / `rlxf segments show` / `rlxf eval` use the RM."""

from __future__ import annotations

import copy
import json
import math
import statistics
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlxf.credit.inspect import ShowSegmentsConfig, run_show_segments
from rlxf.credit.segments import CreditConfig
from rlxf.data.formats import load_preferences
from rlxf.data.tokenize import encode_preferences
from rlxf.engine import TrainConfig
from rlxf.hf import load_tokenizer
from rlxf.models.reward_model import RewardModel
from rlxf.rewards.seq2seq import (
    CONFIG_KEY,
    Seq2SeqRewardSource,
    Seq2SeqTemplate,
    Seq2SeqTemplateError,
    rewards_from_matches,
    teacher_forced_matches,
)
from rlxf.rewards.sources import WeightedSum, build_reward_source
from rlxf.sampling import GenerationSettings
from rlxf.trainers.ppo import PPOConfig, train_ppo
from rlxf.trainers.seq2seq_rm import Seq2SeqRMConfig, oriented_pairs, seq2seq_rows, train_seq2seq_rm

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ANIMALS = {"cat": "red", "dog": "blue", "fish": "green", "pear": "red"}
"""The toy world: each animal has one true colour; a rejected response names another."""


def toy_pairs() -> list[dict]:
    rows = []
    for animal, colour in ANIMALS.items():
        for wrong in ("red", "blue", "green"):
            if wrong != colour:
                rows.append({"prompt": f"what colour is the {animal}", "chosen": f" the {animal} is {colour}.",
                             "rejected": f" the {animal} is {wrong}."})  # fmt: skip
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def seq2seq_run(tmp_path_factory, tiny_model_dir):
    """A short `rlxf seq2seq-rm` run through the CLI on the toy pairs; returns the run directory."""
    tmp = tmp_path_factory.mktemp("seq2seq-rm")
    data = write_jsonl(tmp / "pairs.jsonl", toy_pairs())
    out = tmp / "run"
    cmd = [sys.executable, "-m", "rlxf.cli", "--log-level", "WARNING", "seq2seq-rm", "--model", str(tiny_model_dir),
           "--train_file", str(data), "--eval_file", str(data), "--out", str(out), "--train.max_steps", "80",
           "--train.batch_size", "8", "--train.per_device_batch_size", "8", "--train.lr", "1e-2",
           "--train.eval_every", "40", "--train.report_to", "none", "--train.progress", "false",
           "--train.threads", "1", "--sanity_train_pairs", "0"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_cli_run_learns_to_copy_chosen_and_flag_rejected(seq2seq_run):
    lines = [json.loads(line) for line in (seq2seq_run / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in lines if "eval/copy_rate_chosen" in m]
    assert [m["step"] for m in evals] == [0, 40, 80]
    first, last = evals[0], evals[-1]
    assert last["eval/copy_rate_chosen"] > first["eval/copy_rate_chosen"] + 0.3, evals
    assert last["eval/copy_rate_chosen"] >= 0.9
    assert last["eval/flag_rate_gap"] > 0.05 > first["eval/flag_rate_gap"]
    assert last["eval/pairwise_accuracy"] > first["eval/pairwise_accuracy"]
    data = next(m for m in lines if "data/pairs" in m)
    assert data["data/pairs"] == 8 and data["data/rows"] == 16
    saved = json.loads((seq2seq_run / "final" / "config.json").read_text())[CONFIG_KEY]
    # T_ref: the median token length of the chosen responses, EOS excluded
    tok = load_tokenizer(seq2seq_run / "final")
    lengths = [len(tok(r["chosen"], add_special_tokens=False)["input_ids"]) for r in toy_pairs()]
    assert saved["t_ref"] == statistics.median(lengths)
    assert saved["alpha"] == pytest.approx(1 / saved["t_ref"]) and saved["beta"] == 1.0


def encode_response(tok, text, eos=True):
    return tok(text, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if eos else [])


def test_source_rewards_chosen_over_rejected_and_logs_truncation(seq2seq_run):
    rm_dir = seq2seq_run / "final"
    tok = load_tokenizer(rm_dir)
    source = build_reward_source(f"seq2seq:{rm_dir}", device="cpu")
    assert isinstance(source, Seq2SeqRewardSource) and source.variant == "A"
    rows = [{"prompt": "what colour is the cat"}] * 3
    texts = [" the cat is red.", " the cat is blue.", " the cat is red"]
    ids = [encode_response(tok, texts[0]), encode_response(tok, texts[1]), encode_response(tok, texts[2], eos=False)]
    rewards, mask = source(rows, ids, texts, tok)
    assert mask.sum(-1).tolist() == [len(i) for i in ids]  # EOS scored when emitted; a cut response scores 1..T
    totals = rewards.sum(-1)
    assert totals[0] > totals[1]
    wrong = next(t for t, (a, b) in enumerate(zip(ids[0], ids[1])) if a != b)
    assert rewards[1, wrong] == -1.0  # the RM expects "red" where the response says "blue"
    stats = source.pop_stats()
    assert stats["seq2seq/truncated_frac"] == pytest.approx(1 / 3) and source.pop_stats() == {}
    b = build_reward_source(f"seq2seq:{rm_dir}:variant=B:match_topk=2", device="cpu")
    assert (b.variant, b.match_topk) == ("B", 2)


@pytest.fixture(scope="module")
def bpe_rm_dir(tmp_path_factory):
    """An untrained seq2seq RM whose tokenizer has merges (' the', ' cat'), so some id sequences do not round-trip."""
    from conftest import toy_corpus

    from rlxf.models.tiny import TinyModelConfig, build_tiny_model, train_tokenizer

    tok = train_tokenizer(toy_corpus(), vocab_size=400)
    torch.manual_seed(0)
    model = build_tiny_model(tok, TinyModelConfig(hidden_size=32, intermediate_size=64, heads=4, layers=2))
    setattr(model.config, CONFIG_KEY, Seq2SeqTemplate.for_tokenizer(tok, t_ref=5).to_dict())
    out = tmp_path_factory.mktemp("bpe-rm")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_rewards_use_the_policys_ids_even_when_the_text_does_not_round_trip(bpe_rm_dir):
    tok = load_tokenizer(bpe_rm_dir)
    source = Seq2SeqRewardSource(bpe_rm_dir, device="cpu", variant="B")
    # " the cat is red." with " cat" spelled " c" + "a" + "t": re-encoding the text gives other ids
    canonical = encode_response(tok, " the cat is red.")
    vocab = tok.get_vocab()
    pieces = [canonical[0], vocab["Ġc"], vocab["a"], vocab["t"], *canonical[2:]]
    text = tok.decode(pieces, skip_special_tokens=True)
    assert text == " the cat is red." and encode_response(tok, text) != pieces
    rows = [{"prompt": "what colour is the cat"}] * 2
    rewards, mask = source(rows, [pieces, canonical], [text, text], tok)
    assert mask.sum(-1).tolist() == [len(pieces), len(canonical)]
    # the same numbers from the pass on exactly these ids, built by hand
    template = source.template
    prompt = [tok.bos_token_id, *tok("what colour is the cat", add_special_tokens=False)["input_ids"]]
    for b, ids in enumerate([pieces, canonical]):
        m = teacher_forced_matches(source.model, [template.context(prompt, ids[:-1])], [ids], tok.pad_token_id)
        expected = rewards_from_matches(m.match, m.mask, template.alpha, template.beta, "B")
        torch.testing.assert_close(rewards[b : b + 1, : len(ids)], expected)


def test_template_and_tokenizer_are_checked_at_load(seq2seq_run, tmp_path, tiny_model_dir):
    import shutil

    changed = tmp_path / "changed"
    shutil.copytree(seq2seq_run / "final", changed)
    config = json.loads((changed / "config.json").read_text())
    config[CONFIG_KEY]["revised_delimiter"] = "\n[REWRITE]\n"
    (changed / "config.json").write_text(json.dumps(config))
    with pytest.raises(Seq2SeqTemplateError, match="revised_delimiter"):
        build_reward_source(f"seq2seq:{changed}", device="cpu")
    # a policy with another tokenizer (one more token)
    other = copy.deepcopy(load_tokenizer(seq2seq_run / "final"))
    other.add_tokens(["<extra>"])
    source = Seq2SeqRewardSource(seq2seq_run / "final", device="cpu")
    ids = [other(" a b", add_special_tokens=False)["input_ids"]]
    with pytest.raises(Seq2SeqTemplateError, match="another tokenizer"):
        source([{"prompt": "a"}], ids, [" a b"], other)
    # a plain LM is no seq2seq RM
    with pytest.raises(Seq2SeqTemplateError, match="not a seq2seq reward model"):
        Seq2SeqRewardSource(tiny_model_dir, device="cpu")


def test_every_preference_format_gives_the_same_rows(tiny_model_dir, tmp_path):
    tok = load_tokenizer(tiny_model_dir)
    template = Seq2SeqTemplate.for_tokenizer(tok, t_ref=5)
    standard = {"prompt": "what colour is the cat", "chosen": " the cat is red.", "rejected": " the cat is blue."}
    soft_swapped = {**standard, "chosen": standard["rejected"], "rejected": standard["chosen"], "label_prob": 0.2}
    conversational = {"prompt": [{"role": "user", "content": "what colour is the cat"}],
                      "chosen": [{"role": "assistant", "content": "the cat is red."}],
                      "rejected": [{"role": "assistant", "content": "the cat is blue."}]}  # fmt: skip
    implicit = {"chosen": "\n\nHuman: what colour is the cat\n\nAssistant: the cat is red.",
                "rejected": "\n\nHuman: what colour is the cat\n\nAssistant: the cat is blue."}  # fmt: skip
    built = {}
    for name, row in [("standard", standard), ("soft", soft_swapped), ("chat", conversational),
                      ("implicit", implicit)]:  # fmt: skip
        path = write_jsonl(tmp_path / f"{name}.jsonl", [row])
        encoded = encode_preferences(load_preferences(path), tok)
        pairs, counts = oriented_pairs(encoded, tok.eos_token_id, use_label_prob=True)
        rows, too_long = seq2seq_rows(pairs, template, 512, 256, tok.bos_token_id)
        built[name] = (rows, counts, too_long)
    # identical responses after tokenisation carry no correction: skipped and counted (the loaders already refuse
    # identical texts, so the encoded row is made here)
    same = {"prompt_ids": [1, 5], "chosen_ids": [7, 8, 2], "rejected_ids": [7, 8, 2]}
    assert oriented_pairs([same], 2, True) == ([], {"swapped": 0, "identical": 1, "no_preference": 0})
    assert built["soft"][1]["swapped"] == 1 and built["soft"][0] == built["standard"][0]
    red = tok(" the cat is red.", add_special_tokens=False)["input_ids"]
    for name in ("standard", "chat", "implicit"):
        rows = built[name][0]
        assert [r["kind"] for r in rows] == ["correction", "identity"], name
        for r in rows:
            target = [t for t, m in zip(r["input_ids"], r["target_mask"]) if m]
            assert target[-1] == tok.eos_token_id and target.count(tok.eos_token_id) == 1, name
        if name == "standard":
            assert target == [*red, tok.eos_token_id]
    # too long: the prompt is cut from the left first, then the row is skipped and counted
    pairs, _ = oriented_pairs(encode_preferences(load_preferences(tmp_path / "standard.jsonl"), tok), 2, True)
    full = len(built["standard"][0][0]["input_ids"])
    rows, too_long = seq2seq_rows(pairs, template, full - 2, 256, tok.bos_token_id)
    assert too_long == 0 and len(rows[0]["input_ids"]) == full - 2 and rows[0]["input_ids"][0] == tok.bos_token_id
    rows, too_long = seq2seq_rows(pairs, template, 10, 256, tok.bos_token_id)
    assert rows == [] and too_long == 2


def test_conversational_training_in_process_and_gpt2(gpt2_dir, tmp_path):
    """A GPT-2 RM trained on chat-format pairs for a few steps; its source scores the policy's responses."""
    rows = [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in toy_pairs()]  # fmt: skip
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    train = TrainConfig(max_steps=3, batch_size=4, per_device_batch_size=4, lr=1e-3, progress=False, report_to="none")
    result = train_seq2seq_rm(Seq2SeqRMConfig(model=str(gpt2_dir), train_file=str(data), eval_split=0.25,
                                              out=str(tmp_path / "rm"), train=train))  # fmt: skip
    assert result["finished"] and "eval/flag_rate_gap" in result["eval"]
    assert all(map(torch.isfinite, map(torch.tensor, result["history"]["loss/nll"])))
    tok = load_tokenizer(tmp_path / "rm" / "final")
    source = Seq2SeqRewardSource(tmp_path / "rm" / "final", device="cpu")
    ids = [encode_response(tok, " Naslul's colour is blue.")]
    rewards, mask = source([{"prompt": "Q: hi\nA:"}], ids, [" Naslul's colour is blue."], tok)
    assert mask.all() and torch.all((rewards == -1.0) | (rewards > 0) | (rewards == 0))


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory, tiny_model_dir):
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = load_tokenizer(tiny_model_dir)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tok), n_positions=256, n_embd=32, n_layer=2, n_head=4,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)  # fmt: skip
    out = tmp_path_factory.mktemp("gpt2")
    GPT2LMHeadModel(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    return write_jsonl(path, [{"prompt": f"what colour is the {a}"} for a in ANIMALS])


def ppo_config(model_dir, prompts, out, reward, train=None, **kw):
    return PPOConfig(
        model=str(model_dir), prompts_file=str(prompts), out=str(out), reward=reward, k=2,
        generation=GenerationSettings(max_new_tokens=6, temperature=1.0, batch_size=4), kl_coef=0.02,
        train=TrainConfig(**{"batch_size": 2, "per_device_batch_size": 2, "max_steps": 4, "lr": 1e-3,
                             "progress": False, "report_to": "none", "seed": 0} | (train or {})),
        **kw,
    )  # fmt: skip


def test_ppo_with_seq2seq_reward_runs_and_resumes_exactly(seq2seq_run, tiny_model_dir, prompts_file, tmp_path):
    reward = f"seq2seq:{seq2seq_run / 'final'}"
    full = train_ppo(ppo_config(tiny_model_dir, prompts_file, tmp_path / "a", reward))
    assert full["finished"] and "seq2seq/truncated_frac" in full["history"]
    assert not train_ppo(ppo_config(tiny_model_dir, prompts_file, tmp_path / "b", reward, {"stop_after": 2}))[
        "finished"
    ]
    second = train_ppo(ppo_config(tiny_model_dir, prompts_file, tmp_path / "b", reward, {"resume": True}))
    assert second["finished"]
    for key in ("rewards/mean", "loss/policy", "loss/value", "seq2seq/match_rate"):
        torch.testing.assert_close(second["history"][key], full["history"][key][2:], msg=key)
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "a" / "final").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "b" / "final").state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], msg=name)


def test_hybrid_with_a_bt_scalar_and_adaptive_segments(seq2seq_run, tiny_model_dir, prompts_file, tmp_path):
    bt_dir = tmp_path / "bt"
    torch.manual_seed(0)
    RewardModel.from_pretrained(tiny_model_dir).save_pretrained(bt_dir)
    load_tokenizer(tiny_model_dir).save_pretrained(bt_dir)
    rm_dir = seq2seq_run / "final"
    hybrid = build_reward_source(f"seq2seq:{rm_dir} + 0.5*rm:{bt_dir}", device="cpu")
    assert isinstance(hybrid, WeightedSum)
    tok = load_tokenizer(rm_dir)
    rows, texts = [{"prompt": "what colour is the cat"}], [" the cat is blue."]
    ids = [encode_response(tok, texts[0])]
    both, mask = hybrid(rows, ids, texts, tok)
    dense, _ = build_reward_source(f"seq2seq:{rm_dir}", device="cpu")(rows, ids, texts, tok)
    scalar, _ = build_reward_source(f"rm:{bt_dir}", device="cpu")(rows, ids, texts, tok)
    torch.testing.assert_close(both, dense + 0.5 * scalar)  # the BT score sits on EOS, on top of the dense rewards
    assert torch.count_nonzero(scalar) == 1 and scalar[0, -1] != 0
    # adaptive segments on the seq2seq token rewards, in RL
    credit = CreditConfig(granularity="segment", token_reward=f"seq2seq:{rm_dir}")
    result = train_ppo(
        ppo_config(
            tiny_model_dir, prompts_file, tmp_path / "ppo", f"seq2seq:{rm_dir}", {"max_steps": 2}, credit=credit
        )
    )
    assert result["finished"]
    # `rlxf segments show` renders where the RM diverges
    pairs = write_jsonl(tmp_path / "pairs.jsonl", toy_pairs()[:2])
    text = run_show_segments(ShowSegmentsConfig(input=str(pairs), model=str(rm_dir), credit=credit, color=False))
    assert f"seq2seq:{rm_dir}" in text and text.count("chosen ℓ=+1") == 2


def test_rloo_with_seq2seq_reward(seq2seq_run, tiny_model_dir, prompts_file, tmp_path):
    from rlxf.trainers.rloo import RLOOConfig, train_rloo

    train = TrainConfig(batch_size=2, per_device_batch_size=2, max_steps=2, lr=1e-3, progress=False, report_to="none")
    cfg = RLOOConfig(model=str(tiny_model_dir), prompts_file=str(prompts_file), out=str(tmp_path),
                     reward=f"seq2seq:{seq2seq_run / 'final'}:variant=soft", k=2, train=train,
                     generation=GenerationSettings(max_new_tokens=6, temperature=1.0, batch_size=4))  # fmt: skip
    result = train_rloo(cfg)
    assert result["finished"] and len(result["history"]["seq2seq/reward_sum"]) == 2


def test_early_stop_when_the_flag_rate_gap_stops_improving(tiny_model_dir, tmp_path):
    """With a learning rate too small to change anything the held-out gap never improves: patience 2 stops at step 2
    and still writes the final model."""
    data = write_jsonl(tmp_path / "pairs.jsonl", toy_pairs())
    train = TrainConfig(max_steps=10, batch_size=8, per_device_batch_size=8, lr=1e-12, eval_every=1, progress=False,
                        report_to="none")  # fmt: skip
    cfg = Seq2SeqRMConfig(model=str(tiny_model_dir), train_file=str(data), eval_file=str(data), out=str(tmp_path / "rm"),
                          early_stop_patience=2, sanity_train_pairs=0, train=train)  # fmt: skip
    result = train_seq2seq_rm(cfg)
    assert result["stopped_early"] and len(result["history"]["loss/nll"]) == 2
    assert len(result["history"]["eval/flag_rate_gap"]) == 3  # steps 0, 1, 2
    assert (tmp_path / "rm" / "final" / "config.json").exists()


def test_eval_reports_the_sanity_metrics(seq2seq_run, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", toy_pairs())
    cmd = [sys.executable, "-m", "rlxf.cli", "--log-level", "WARNING", "eval", "--seq2seq_rm",
           str(seq2seq_run / "final"), "--pairs_file", str(data), "--out", str(tmp_path / "eval")]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "copy_rate_chosen" in done.stdout and "flag_rate_gap" in done.stdout


def test_lora_trains_only_adapters_and_saves_a_usable_merged_rm(tiny_model_dir, tmp_path):
    """With lora.r > 0 the loss falls; final/ is the merged model (its config.json keeps the template, so it loads as a
    reward source) in which only the adapted linear layers moved: embeddings and norms are the base model's."""
    from rlxf.hf import load_model
    from rlxf.models.lora import LoraSettings

    data = write_jsonl(tmp_path / "pairs.jsonl", toy_pairs())
    train = TrainConfig(max_steps=12, batch_size=8, per_device_batch_size=8, lr=1e-2, progress=False, report_to="none")
    cfg = Seq2SeqRMConfig(model=str(tiny_model_dir), train_file=str(data), out=str(tmp_path / "rm"),
                          lora=LoraSettings(r=4, alpha=8.0, dropout=0.0), sanity_train_pairs=0, train=train)  # fmt: skip
    losses = train_seq2seq_rm(cfg)["history"]["loss/nll"]
    assert all(map(math.isfinite, losses)) and losses[-1] < losses[0]
    final = tmp_path / "rm" / "final"
    assert (final / "config.json").is_file() and not (final / "adapter_config.json").exists()
    base, merged = load_model(tiny_model_dir).state_dict(), load_model(final).state_dict()
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed and all(k.endswith("proj.weight") for k in changed), sorted(changed)[:5]
    Seq2SeqRewardSource(final, device="cpu")  # the template is there and fits the tokenizer
