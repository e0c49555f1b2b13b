"""`rlxf eval` without a gold world (issue 17): reward-model pairwise accuracy on any preference file, the mean RM
score of policies on any prompts, and win rates judged by a reward model, a Python function or an AI labeller (a
real `rlxf serve` on loopback, and the same model in process); `--world` unchanged. Every number is checked against a
direct computation."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlxf.backends import LocalBackend
from rlxf.backends.serve import ServeEngine, start_server
from rlxf.errors import UserError
from rlxf.evaluation import (
    EvalConfig,
    mean_with_ci,
    parse_judge,
    reward_model_pairwise,
    run_eval,
    win_rate_with_ci,
)
from rlxf.feedback.label import PairwiseLabeler
from rlxf.feedback.prompts import SUMMARIZE_BASE, LabellingTemplate
from rlxf.hf import load_tokenizer
from rlxf.models.reward_model import RewardModel, evaluate_pairs
from rlxf.sampling import GenerationSettings

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GEN = GenerationSettings(max_new_tokens=8, temperature=1.0, batch_size=16)
LABEL_OPTIONS = "task=summarize&preamble=base&top_k=512"  # short prompts for the tiny labeller; every log-prob
JUDGE_MODULE = '''
def longer(prompts, a, b):
    """P(a > b): 1 when a is the longer answer (in characters), 0 when shorter, 1/2 when as long."""
    return [1.0 if len(x) > len(y) else 0.0 if len(x) < len(y) else 0.5 for x, y in zip(a, b)]
'''


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.fixture(scope="module")
def rm_dir(factworld_rm_dir):
    return factworld_rm_dir


@pytest.fixture(scope="module")
def zero_rm_dir(tmp_path_factory, factworld_sft_dir):
    """A reward model whose head is zero: every score is 0, so every comparison is a tie."""
    out = tmp_path_factory.mktemp("rm-zero")
    rm = RewardModel.from_pretrained(factworld_sft_dir)
    torch.nn.init.zeros_(rm.hf.score.weight)
    rm.save_pretrained(out)
    load_tokenizer(factworld_sft_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory, factworld_dir):
    """Six held-out prompts, stripped of the world's metadata: any prompts file."""
    rows = read_jsonl(factworld_dir / "prompts_test.jsonl")[:6]
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory, factworld_dir):
    """Twelve held-out human pairs as Parquet (any format the loaders read), without the world's extra columns."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = read_jsonl(factworld_dir / "preferences_test.jsonl")[:12]
    path = tmp_path_factory.mktemp("pairs") / "pairs.parquet"
    table = {k: [r[k] for r in rows] for k in ("prompt", "chosen", "rejected")}
    pq.write_table(pa.table(table), path)
    return path


@pytest.fixture(scope="module")
def judge_module(tmp_path_factory):
    """A module `eval_judges` on sys.path with the judge `longer`."""
    root = tmp_path_factory.mktemp("judges")
    (root / "eval_judges.py").write_text(JUDGE_MODULE)
    sys.path.insert(0, str(root))
    yield root
    sys.path.remove(str(root))


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    # fp32 on the CPU, every log-prob returned (vocab 160 <= 512): the server's labels equal the local model's
    engine = ServeEngine.load(tiny_model_dir, name="tiny", device="cpu", max_logprobs=512)
    srv, _, url = start_server(engine=engine)
    yield url
    srv.shutdown()
    srv.server_close()


def direct_rm_scores(rm_dir: Path, prompts: list[str], responses: list[str]) -> list[float]:
    """Reward at the EOS after BOS + prompt + response, tokenized by hand (what the RM was trained on)."""
    tok = load_tokenizer(rm_dir)
    rm = RewardModel.from_pretrained(rm_dir).eval()
    out = []
    with torch.no_grad():
        for p, r in zip(prompts, responses):
            ids = [tok.bos_token_id, *tok(p, add_special_tokens=False)["input_ids"]]
            ids += [*tok(r, add_special_tokens=False)["input_ids"], tok.eos_token_id]
            x = torch.tensor([ids])
            out.append(rm.sequence_rewards(x, torch.ones_like(x)).item())
    return out


def hand_interval(outcomes: list[float]) -> tuple[float, float, float]:
    n = len(outcomes)
    mean = sum(outcomes) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in outcomes) / (n - 1))
    return mean, max(0.0, mean - 1.96 * sd / math.sqrt(n)), min(1.0, mean + 1.96 * sd / math.sqrt(n))


def rlxf(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "rlxf.cli", *args], capture_output=True, text=True, timeout=300, env=env
    )


# --- 1. reward-model pairwise accuracy on any preference file ---------------------------------------------------


def test_rm_pairwise_accuracy_equals_direct_scores(rm_dir, pairs_file, factworld_dir, tmp_path):
    import pyarrow.parquet as pq

    table = pq.read_table(pairs_file).to_pylist()
    chosen = direct_rm_scores(rm_dir, [r["prompt"] for r in table], [r["chosen"] for r in table])
    rejected = direct_rm_scores(rm_dir, [r["prompt"] for r in table], [r["rejected"] for r in table])
    outcomes = [1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(chosen, rejected)]
    summary = run_eval(EvalConfig(reward_model=str(rm_dir), pairs_file=str(pairs_file), out=str(tmp_path)))
    info = summary["reward_model_pairwise"]
    assert info["n_pairs"] == len(table) == 12
    assert 0.0 < info["accuracy"] < 1.0  # not a degenerate case: the interval has a width
    mean, lo, hi = hand_interval(outcomes)
    assert (info["accuracy"], info["ci_low"], info["ci_high"]) == pytest.approx((mean, lo, hi))
    assert summary["reward_model_pairwise_accuracy"] == info["accuracy"]
    assert "policies" not in summary
    md = (tmp_path / "eval.md").read_text()
    assert f"{mean:.3f} [{lo:.3f}, {hi:.3f}]" in md and "12 pairs" in md
    # the trainer's evaluation agrees
    from rlxf.data.formats import load_preferences
    from rlxf.data.tokenize import encode_preferences

    tok = load_tokenizer(rm_dir)
    rows = encode_preferences(load_preferences(pairs_file), tok)
    rm = RewardModel.from_pretrained(rm_dir)
    assert evaluate_pairs(rm, rows, tok.pad_token_id, 5, "cpu")["eval/pairwise_accuracy"] == pytest.approx(mean)


def test_rm_ties_count_half(zero_rm_dir, pairs_file):
    info = reward_model_pairwise(str(zero_rm_dir), str(pairs_file))
    assert info["accuracy"] == 0.5 and info["ci_low"] == 0.5 and info["ci_high"] == 0.5 and info["n_pairs"] == 12


def test_intervals():
    assert win_rate_with_ci([1.0, 0.0, 0.5, 1.0]) == pytest.approx(hand_interval([1.0, 0.0, 0.5, 1.0]))
    assert win_rate_with_ci([1.0, 1.0]) == (1.0, 1.0, 1.0)  # clipped to [0, 1], zero width
    stats = mean_with_ci([1.0, 2.0, 4.0])
    sd = math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2)
    assert stats["mean"] == pytest.approx(7 / 3) and stats["std"] == pytest.approx(sd) and stats["n"] == 3
    assert stats["ci_high"] - stats["mean"] == pytest.approx(1.96 * sd / math.sqrt(3))
    assert math.isnan(win_rate_with_ci([])[0])


# --- 2. / 3. policies on any prompts: RM score, RM / callable judges ---------------------------------------------


@pytest.fixture(scope="module")
def rm_eval(tmp_path_factory, factworld_model_dir, factworld_sft_dir, prompts_file, rm_dir):
    """Untrained model (baseline) vs SFT on 6 prompts × 2 samples, scored by the RM and judged by it."""
    out = tmp_path_factory.mktemp("eval-rm")
    cfg = EvalConfig(
        policies=[str(factworld_model_dir), str(factworld_sft_dir)],
        names=["base", "sft"],
        prompts_file=str(prompts_file),
        reward_model=str(rm_dir),
        judge=f"rm:{rm_dir}",
        samples_per_prompt=2,
        generation=GEN,
        out=str(out),
    )
    return run_eval(cfg), out


def test_mean_rm_score_per_policy(rm_eval, rm_dir):
    summary, out = rm_eval
    for name in ("base", "sft"):
        rows = read_jsonl(out / f"responses_{name}.jsonl")
        assert len(rows) == 12 and all("gold" not in r for r in rows)
        direct = direct_rm_scores(rm_dir, [r["prompt"] for r in rows], [r["response"] for r in rows])
        assert [r["rm_score"] for r in rows] == pytest.approx(direct, abs=1e-4)
        m = summary["policies"][name]
        stats = mean_with_ci(direct)
        assert m["rm_score"] == pytest.approx(stats["mean"], abs=1e-4)
        assert m["rm_score_std"] == pytest.approx(stats["std"], abs=1e-4)
        assert m["rm_score_ci_low"] < m["rm_score"] < m["rm_score_ci_high"]
        assert not {"gold_score", "win_rate", "hallucination_rate"} & set(m)  # no world, no gold metrics
        assert m["mean_length_words"] == pytest.approx(sum(len(r["response"].split()) for r in rows) / 12)
    assert summary["policies"]["base"]["kl_to_reference"] == pytest.approx(0.0, abs=1e-5)  # the reference itself
    assert summary["policies"]["sft"]["kl_to_reference"] > 0
    # both policies answered the same prompts, in the same order
    assert [r["prompt"] for r in read_jsonl(out / "responses_base.jsonl")] == [
        r["prompt"] for r in read_jsonl(out / "responses_sft.jsonl")
    ]
    md = (out / "eval.md").read_text()
    assert "RM score [95% CI]" in md and "gold" not in md


def test_rm_judge_win_rate(rm_eval):
    summary, out = rm_eval
    base = read_jsonl(out / "responses_base.jsonl")
    sft = read_jsonl(out / "responses_sft.jsonl")
    outcomes = [1.0 if s["rm_score"] > b["rm_score"] else 0.5 if s["rm_score"] == b["rm_score"] else 0.0
                for s, b in zip(sft, base)]  # fmt: skip
    m = summary["policies"]["sft"]
    assert (m["judge_win_rate"], m["judge_win_rate_ci_low"], m["judge_win_rate_ci_high"]) == pytest.approx(
        win_rate_with_ci(outcomes)
    )
    assert m["judge_n"] == 12 and m["judge_n_invalid"] == 0
    judged = read_jsonl(out / "judge_sft.jsonl")
    assert [j["outcome"] for j in judged] == outcomes
    assert [j["baseline_response"] for j in judged] == [b["response"] for b in base]
    # the baseline against itself: every pair a tie
    b = summary["policies"]["base"]
    assert (b["judge_win_rate"], b["judge_win_rate_ci_low"], b["judge_win_rate_ci_high"]) == (0.5, 0.5, 0.5)
    assert summary["baseline"] == "base" and summary["judge"].startswith("rm:")


def test_zero_rm_judge_gives_ties(factworld_model_dir, factworld_sft_dir, prompts_file, zero_rm_dir, tmp_path):
    summary = run_eval(
        EvalConfig(
            policies=[str(factworld_model_dir), str(factworld_sft_dir)],
            names=["base", "sft"],
            prompts_file=str(prompts_file),
            judge=f"rm:{zero_rm_dir}",
            generation=GEN,
            out=str(tmp_path),
        )
    )
    m = summary["policies"]["sft"]
    assert (m["judge_win_rate"], m["judge_win_rate_ci_low"], m["judge_win_rate_ci_high"]) == (0.5, 0.5, 0.5)
    assert "rm_score" not in m  # no --reward_model: no RM score


def test_callable_judge_prefers_the_longer_answer(
    judge_module, factworld_model_dir, factworld_sft_dir, prompts_file, tmp_path
):
    summary = run_eval(
        EvalConfig(
            policies=[str(factworld_model_dir), str(factworld_sft_dir)],
            names=["base", "sft"],
            prompts_file=str(prompts_file),
            judge="callable:eval_judges:longer",
            samples_per_prompt=2,
            generation=GEN,
            out=str(tmp_path),
        )
    )
    base = [r["response"] for r in read_jsonl(tmp_path / "responses_base.jsonl")]
    sft = [r["response"] for r in read_jsonl(tmp_path / "responses_sft.jsonl")]
    expected = [1.0 if len(s) > len(b) else 0.0 if len(s) < len(b) else 0.5 for s, b in zip(sft, base)]
    m = summary["policies"]["sft"]
    assert m["judge_win_rate"] == pytest.approx(sum(expected) / len(expected))
    assert (m["judge_win_rate_ci_low"], m["judge_win_rate_ci_high"]) == pytest.approx(win_rate_with_ci(expected)[1:])
    assert [j["p_win"] for j in read_jsonl(tmp_path / "judge_sft.jsonl")] == expected
    assert "reward_model_pairwise_accuracy" not in summary and "rm_score" not in m


def test_callable_judge_ties_are_half(judge_module, monkeypatch):
    make = parse_judge("callable:eval_judges:longer")
    from rlxf.evaluation import _judge_metrics, judge_outcomes

    p = judge_outcomes(make(), ["q"] * 4, ["ab", "a", "abc", "same"], ["cd", "ab", "a", "same"])
    assert p == [0.5, 0.0, 1.0, 0.5]  # equal lengths -> P = 1/2; identical responses are a tie without asking
    m = _judge_metrics(p)
    assert m["judge_win_rate"] == pytest.approx(0.5) and m["judge_p_win"] == pytest.approx(0.5)


# --- 3. the AI judge: `rlxf label`'s machinery through a real loopback server and in process -------------------------


@pytest.fixture(scope="module")
def ai_judged(server, tiny_model_dir, factworld_model_dir, factworld_sft_dir, prompts_file, tmp_path_factory):
    """Baseline (untrained) vs SFT on 6 prompts, judged by the tiny labeller served over HTTP and loaded in process."""
    runs = {}
    for kind, spec in (
        ("http", f"openai:{server}:tiny?{LABEL_OPTIONS}&max_concurrency=2"),
        ("local", f"local:{tiny_model_dir}?{LABEL_OPTIONS}"),
    ):
        out = tmp_path_factory.mktemp(f"eval-{kind}")
        summary = run_eval(
            EvalConfig(
                policies=[str(factworld_model_dir), str(factworld_sft_dir)],
                names=["base", "sft"],
                prompts_file=str(prompts_file),
                judge=spec,
                generation=GEN,
                out=str(out),
            )
        )
        runs[kind] = (summary, read_jsonl(out / "judge_sft.jsonl"))
    return runs


def test_ai_judge_equals_the_labeller(ai_judged, tiny_model_dir):
    """P(policy > baseline) per pair is `PairwiseLabeler`'s p_a with a = policy, b = baseline (both orders, soft
    labels); the served model and the same model in process agree; the win rate counts P > 1/2 as a win."""
    (s_http, j_http), (s_local, j_local) = ai_judged["http"], ai_judged["local"]
    assert [j["response"] for j in j_http] == [j["response"] for j in j_local]  # same seed, same samples
    assert sum(j["response"] != j["baseline_response"] for j in j_http) >= 3  # the judge was asked
    assert [j["p_win"] for j in j_http] == pytest.approx([j["p_win"] for j in j_local], rel=1e-5)
    labeller = PairwiseLabeler(LocalBackend(str(tiny_model_dir)), LabellingTemplate("summarize", SUMMARIZE_BASE))
    direct = labeller.label([(j["prompt"], j["response"], j["baseline_response"]) for j in j_local])
    assert [j["p_win"] for j in j_local] == pytest.approx([d.p_a for d in direct], rel=1e-6)
    for summary, judged in ((s_http, j_http), (s_local, j_local)):
        p = [j["p_win"] for j in judged]
        hard = [1.0 if x > 0.5 else 0.5 if x == 0.5 else 0.0 for x in p]
        m = summary["policies"]["sft"]
        assert [j["outcome"] for j in judged] == hard
        assert (m["judge_win_rate"], m["judge_win_rate_ci_low"], m["judge_win_rate_ci_high"]) == pytest.approx(
            win_rate_with_ci(hard)
        )
        assert m["judge_p_win"] == pytest.approx(sum(p) / len(p)) and m["judge_n"] == 6
        assert summary["policies"]["base"]["judge_win_rate"] == 0.5
    assert s_http["judge"].startswith("openai") and s_local["judge"].startswith("local:")


# --- the CLI, as a user runs it ------------------------------------------------------------------------------------


def test_cli_rm_accuracy_without_a_world(rm_dir, pairs_file, tmp_path):
    proc = rlxf("eval", "--reward_model", str(rm_dir), "--pairs_file", str(pairs_file), "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    info = json.loads((tmp_path / "eval.json").read_text())["reward_model_pairwise"]
    line = f"{info['accuracy']:.3f} [{info['ci_low']:.3f}, {info['ci_high']:.3f}] (95% CI, ties ½), 12 pairs"
    assert line in proc.stdout


def test_cli_policies_rm_score_and_http_judge(
    ai_judged, server, rm_dir, factworld_model_dir, factworld_sft_dir, prompts_file, tmp_path
):
    proc = rlxf("eval", "--policies", f"{factworld_model_dir},{factworld_sft_dir}", "--names", "base,sft",
                "--prompts_file", str(prompts_file), "--reward_model", str(rm_dir),
                "--judge", f"openai:{server}:tiny?{LABEL_OPTIONS}", "--generation.max_new_tokens", "8",
                "--generation.batch_size", "16", "--out", str(tmp_path))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "eval.json").read_text())
    assert (
        "RM score [95% CI]" in proc.stdout
        and "judge win rate vs base [95% CI]" in proc.stdout
        and "Judge: openai" in proc.stdout
    )
    # the same samples and judgements as the in-process run over the same server
    _, judged = ai_judged["http"]
    assert [j["p_win"] for j in read_jsonl(tmp_path / "judge_sft.jsonl")] == pytest.approx(
        [j["p_win"] for j in judged], rel=1e-6
    )
    assert {"rm_score", "judge_win_rate", "kl_to_reference"} <= set(summary["policies"]["sft"])
    assert "reward_model_pairwise" not in summary  # no pairs file, no world


def test_cli_errors_name_what_is_missing(factworld_model_dir, tmp_path):
    proc = rlxf("eval", "--policies", str(factworld_model_dir), "--out", str(tmp_path))
    assert proc.returncode == 2 and "--prompts_file" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "nothing to evaluate"),
        ({"policies": ["p"]}, "--prompts_file"),
        ({"reward_model": "r"}, "--pairs_file"),
        ({"pairs_file": "f", "policies": ["p"], "prompts_file": "f"}, "--reward_model"),
        ({"judge": "rm:x"}, "--policies"),
        ({"rm_score": True, "policies": ["p"], "prompts_file": "f"}, "--reward_model"),
    ],
)
def test_config_errors(kwargs, message, tmp_path):
    with pytest.raises(UserError, match=message):
        run_eval(EvalConfig(out=str(tmp_path), **kwargs))


@pytest.mark.parametrize(
    "spec", ["nope:x", "rm", "openai:not-a-url", "local:http://127.0.0.1:8000/v1", "openai:http://h:1/v1?bogus=1"]
)
def test_bad_judge_specs(spec):
    with pytest.raises(UserError):
        parse_judge(spec)


def test_openai_judge_spec_parsing():
    from rlxf.evaluation import _OPENAI_TARGET

    assert _OPENAI_TARGET.match("http://127.0.0.1:8000/v1:tiny").groups() == ("http://127.0.0.1:8000/v1", "tiny")
    assert _OPENAI_TARGET.match("http://127.0.0.1:8000/v1").groups() == ("http://127.0.0.1:8000/v1", None)
    assert _OPENAI_TARGET.match("https://api.x.org/v1:Qwen/Qwen2.5-7B").groups() == (
        "https://api.x.org/v1",
        "Qwen/Qwen2.5-7B",
    )
    assert _OPENAI_TARGET.match("http://h:8000:m").groups() == ("http://h:8000", "m")


# --- 4. --world as before ------------------------------------------------------------------------------------------


def test_world_gold_table_unchanged_by_the_new_metrics(
    judge_module, factworld_dir, factworld_model_dir, factworld_sft_dir, rm_dir, tmp_path
):
    prompts = tmp_path / "prompts.jsonl"  # world rows (with their metadata), fewer of them
    prompts.write_text("".join(json.dumps(r) + "\n" for r in read_jsonl(factworld_dir / "prompts_test.jsonl")[:6]))
    common = dict(policies=[str(factworld_model_dir), str(factworld_sft_dir)], names=["base", "sft"],
                  world=str(factworld_dir), prompts_file=str(prompts), reward_model=str(rm_dir), generation=GEN)  # fmt: skip
    plain = run_eval(EvalConfig(out=str(tmp_path / "plain"), **common))
    more = run_eval(
        EvalConfig(out=str(tmp_path / "more"), rm_score=True, judge="callable:eval_judges:longer", **common)
    )
    gold_keys = ["win_rate", "win_rate_ci_low", "win_rate_ci_high", "gold_score", "hallucination_rate",
                 "retain_accuracy", "list_validity", "mean_length_words", "kl_to_reference"]  # fmt: skip
    for name in ("base", "sft"):
        assert set(gold_keys) <= set(plain["policies"][name])
        assert "rm_score" not in plain["policies"][name] and "judge_win_rate" not in plain["policies"][name]
        same = [json.dumps(run["policies"][name][k]) for run in (plain, more) for k in gold_keys]  # NaN == NaN
        assert same[: len(gold_keys)] == same[len(gold_keys) :]
        assert "rm_score" in more["policies"][name] and "judge_win_rate" in more["policies"][name]
    plain_md = (tmp_path / "plain" / "eval.md").read_text().splitlines()
    more_md = (tmp_path / "more" / "eval.md").read_text().splitlines()
    assert plain_md[:4] == more_md[:4]
    assert plain_md[0] == (
        "| policy | gold win rate vs base | gold score | hallucination rate | retain accuracy | list validity | "
        "length (words) | KL to ref |"
    )
    assert "RM score [95% CI]" in "\n".join(more_md) and "RM score" not in "\n".join(plain_md)
    assert plain["reward_model_pairwise"]["n_pairs"] == len(read_jsonl(factworld_dir / "preferences_test.jsonl"))
    assert all("gold" in r for r in read_jsonl(tmp_path / "plain" / "responses_sft.jsonl"))


def test_ai_judge_without_a_valid_answer_counts_nothing(tiny_model_dir):
    """Prompts too long for the labeller give no judgement: left out of the win rate and counted."""
    from rlxf.evaluation import _judge_metrics, judge_outcomes

    judge = parse_judge(f"local:{tiny_model_dir}?{LABEL_OPTIONS}&max_prompt_tokens=8")()
    try:
        p = judge_outcomes(judge, ["the cat is", "a dog"], ["red cat", "blue"], ["green", "pear plum"])
    finally:
        judge.close()
    assert all(math.isnan(x) for x in p)
    m = _judge_metrics(p)
    assert m["judge_n"] == 0 and m["judge_n_invalid"] == 2 and math.isnan(m["judge_win_rate"])


def test_bad_preamble_file_fails_before_sampling(tmp_path):
    with pytest.raises((UserError, OSError)):
        parse_judge(f"local:{tmp_path}?preamble_file={tmp_path / 'missing.txt'}")


def test_rm_reads_a_chat_prompt_response_as_the_assistant_turn(rm_dir):
    """A response to a message-list prompt is scored as the assistant's turn of the chat template, ending at its EOS
    (as the RM trains on chat pairs); a string prompt's response as plain text + EOS."""
    from rlxf.evaluation import RewardModelScorer

    scorer = RewardModelScorer(str(rm_dir))
    tok = scorer.tokenizer
    chat = [{"role": "user", "content": "What is the colour of Zorbin?"}]
    got = scorer.score([chat, chat, "Q: the pet of Kalmo?\nA:"], [" red", " a cat", " dog"])
    full = tok.apply_chat_template([*chat, {"role": "assistant", "content": " red"}], tokenize=False).rstrip()
    ids = [tok.bos_token_id, *tok(full, add_special_tokens=False)["input_ids"]]
    assert ids[-1] == tok.eos_token_id
    x = torch.tensor([ids])
    assert got[0] == pytest.approx(scorer.model.sequence_rewards(x, torch.ones_like(x)).item(), abs=1e-5)
    assert got[2] == pytest.approx(direct_rm_scores(rm_dir, ["Q: the pet of Kalmo?\nA:"], [" dog"])[0], abs=1e-5)
    assert got[0] != got[1]
    assert scorer.score([chat], [" red"]) == got[:1]  # memoised: the same pair is scored once
