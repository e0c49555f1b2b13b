"""`rlxf label` (rlxf.feedback.label) and the d-RLAIF source (rlxf.rewards.rlaif): hand-computed labels through a
scripted backend, real labelling with the tiny model (local, chat, over HTTP), harmless inversion, metrics,
kill-and-resume through the CLI, bad input."""

from __future__ import annotations

import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from fault_server import FaultSchedule, start_fault_server
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from rlxf.backends import BackendConfig, BackendStats, LocalBackend, as_prompt
from rlxf.backends.serve import ServeEngine, start_server
from rlxf.feedback.label import LabelConfig, PairwiseLabeler, run_label
from rlxf.feedback.label_math import expected_calibration_error
from rlxf.feedback.prompts import HARMLESS_BASE, SUMMARIZE_BASE, LabellingTemplate
from rlxf.rewards.rlaif import DirectScoreSource, strip_trailing

WORDS = "red blue green cat dog fish apple pear plum paris rome oslo the of and".split()
L = math.log


def write_pairs(path: Path, n: int, human: bool = True) -> Path:
    rows = []
    for i in range(n):
        prompt = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(5))
        a, b = WORDS[i % len(WORDS)] + " " + WORDS[(i + 3) % len(WORDS)], WORDS[(i + 7) % len(WORDS)]
        rows.append(
            {"prompt": prompt, "chosen": a, "rejected": b, "id": i}
            if human
            else {"prompt": prompt, "response_a": a, "response_b": b, "id": i}
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return ServeEngine.load(tiny_model_dir, name="tiny", max_logprobs=512)


@pytest.fixture(scope="module")
def server(engine):
    srv, _, url = start_server(engine=engine)
    yield url
    srv.shutdown()
    srv.server_close()


def local_cfg(tmp_path: Path, model: Path, name: str, **kw) -> LabelConfig:
    defaults = dict(task="summarize", preamble="base", cot=False, progress=False)
    return LabelConfig(
        input=str(kw.pop("input")),
        out=str(tmp_path / name),
        backend=BackendConfig(model=str(model)),
        **(defaults | kw),
    )


# --- the labeller by hand, through a scripted backend -----------------------------------------------------------------


class ScriptedBackend:
    """Answers each scoring prompt with the top-k map `script(slot_1_text, slot_2_text)`; rationales are fixed."""

    kind, model_id = "scripted", "scripted"

    def __init__(self, script):
        self.script, self.stats = script, BackendStats()

    def prompt_key(self, p):
        return as_prompt(p).text

    def single_token(self, text):
        return None

    def iter_next_token_logprobs(self, prompts, k, labels=()):
        for i, p in enumerate(prompts):
            self.stats.add(calls=1)
            text = as_prompt(p).text
            if "SCORE:" in text:
                yield i, self.script(text)
                continue
            noun = "Summary" if "Summary 1 - " in text else "Response"
            slot1 = text.split(f"{noun} 1 - ")[-1].split("\n")[0]
            slot2 = text.split(f"{noun} 2 - ")[-1].split("\n")[0]
            yield i, self.script(slot1, slot2)

    def iter_generate(self, prompts, max_new_tokens, temperature=0.0, top_k=0, seed=0):
        for i, _ in enumerate(prompts):
            self.stats.add(calls=1)
            yield i, " both are fine. Preferred Summary=2 and more"

    def close(self):
        pass


def two_label_map(p_one: float) -> dict[str, float]:
    return {"1": L(p_one), "2": L(1 - p_one)}


TOP5 = {"1": -0.2, "The": -2.5, " 1": -3.0, "\n": -3.5, "**": -4.0}  # spec §4: label "2" missing


def test_labeller_by_hand():
    scripted = {
        ("A", "B"): two_label_map(0.8),
        ("B", "A"): two_label_map(0.6),  # spec §4: P(a) = 0.6, same slot
        ("C", "D"): TOP5,
        ("D", "C"): {"The": -0.1, "\n": -3.0},  # one order imputed, the other invalid
        ("E", "F"): {"x": -0.1},
        ("F", "E"): {"y": -0.1},  # both invalid
    }
    backend = ScriptedBackend(lambda s1, s2: scripted[(s1, s2)])
    labeller = PairwiseLabeler(backend, LabellingTemplate("summarize", SUMMARIZE_BASE))
    ab, cd, ef = labeller.label([("ctx", "A", "B"), ("ctx", "C", "D"), ("ctx", "E", "F")])
    # ½ (0.8 + 1 − 0.6) = 0.6; both orders prefer slot 1
    assert math.isclose(ab.p_a, 0.6) and (ab.p_first_ab, ab.p_first_ba) == pytest.approx((0.8, 0.6))
    # ℓ(1) = logsumexp(−0.2, −3.0), ℓ(2) = log(1 − Σ top-5 mass) = −7.030875 ⇒ p_first = 0.998983; only order used
    assert cd.imputed and math.isclose(cd.p_a, 0.998983, abs_tol=1e-6) and math.isnan(cd.p_first_ba)
    assert not ef.valid and math.isnan(ef.p_a)
    assert backend.stats.calls == 6 and labeller.requests_sent == 6  # 2 calls per pair without CoT


def test_geometric_combination_and_harmless_inversion_by_hand():
    backend = ScriptedBackend(lambda s1, s2: two_label_map(0.9 if s1 == "A" else 0.3))
    geo = PairwiseLabeler(backend, LabellingTemplate("summarize", SUMMARIZE_BASE), combine="geometric")
    # σ(½ [logit 0.9 − logit 0.3]) = 0.820871 (spec §4)
    assert math.isclose(geo.label([("c", "A", "B")])[0].p_a, 0.820871, abs_tol=1e-6)
    # harmless: the labeller picks the MORE harmful one. P(a more harmful) = ½ (0.9 + 1 − 0.5) = 0.7 ⇒ p_a = 0.3
    harm = ScriptedBackend(lambda s1, s2: two_label_map(0.9 if s1 == "A" else 0.5))
    (j,) = PairwiseLabeler(harm, LabellingTemplate("harmless", HARMLESS_BASE)).label([("c", "A", "B")])
    assert math.isclose(j.p_a, 0.3) and math.isclose(j.p_first_ab, 0.9)  # per-order probabilities are the raw ones


def test_cot_rationale_is_cut_at_the_ending():
    backend = ScriptedBackend(lambda s1, s2: two_label_map(0.7))
    labeller = PairwiseLabeler(backend, LabellingTemplate("summarize", SUMMARIZE_BASE, cot=True))
    (j,) = labeller.label([("c", "A", "B")])
    # the labeller wrote "Preferred Summary=2" inside its rationale: rlxf appends the ending itself
    assert j.rationales_ab == [" both are fine."] and backend.stats.calls == 4  # 4 calls per pair with CoT


def test_a_label_digit_merging_with_the_ending_is_refused():
    # a vocabulary without byte-level digit splitting learns "Summary=1" as one token: the label would never be the
    # next token after "Summary=", so reading its log-prob there is meaningless; the labeller refuses up front
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator(["Preferred Summary=1", "Preferred Summary=2"] * 50, trainers.BpeTrainer(vocab_size=60))
    backend = SimpleNamespace(tokenizer=PreTrainedTokenizerFast(tokenizer_object=tok))
    with pytest.raises(ValueError, match="tokenises as"):
        PairwiseLabeler(backend, LabellingTemplate("summarize", SUMMARIZE_BASE))


# --- real labelling with the tiny model ------------------------------------------------------------------------------


def test_local_labels_metrics_and_resume(tmp_path, tiny_model_dir):
    pairs = write_pairs(tmp_path / "pairs.jsonl", 6)
    cfg = local_cfg(tmp_path, tiny_model_dir, "labels.jsonl", input=pairs)
    summary = run_label(cfg)
    rows = read_rows(tmp_path / "labels.jsonl")
    assert summary["n_labelled"] == len(rows) == 6 and summary["calls"] == 12
    for r in rows:
        assert r["label_prob"] == pytest.approx(max(r["p_a"], 1 - r["p_a"])) and r["label_prob"] >= 0.5
        assert r["p_a"] == pytest.approx(0.5 * (r["p_first_ab"] + 1 - r["p_first_ba"]))
        assert r["same_position"] == ((r["p_first_ab"] > 0.5) == (r["p_first_ba"] > 0.5))
        assert r["chosen"] != r["rejected"] and not r["imputed"] and r["valid"]  # local: label tokens read exactly
        assert r["human_agrees"] == (r["ai_prefers"] == "a" and r["p_a"] > 0.5)  # human chose a
        assert {"labeler", "prompt_id", "id"} <= set(r)
    metrics = json.loads((tmp_path / "labels.metrics.json").read_text())
    agrees = torch.tensor([r["human_agrees"] for r in rows])
    assert metrics["alignment"]["accuracy"] == pytest.approx(agrees.double().mean().item())
    assert metrics["position_bias"]["rate"] == pytest.approx(sum(r["same_position"] for r in rows) / 6)
    conf = torch.tensor([r["label_prob"] for r in rows], dtype=torch.float64)
    assert metrics["calibration"]["ece"] == pytest.approx(expected_calibration_error(conf, agrees).item())
    # a second run is answered from the cache: no call, same file
    before = (tmp_path / "labels.jsonl").read_text()
    assert run_label(cfg)["calls"] == 0 and (tmp_path / "labels.jsonl").read_text() == before


def test_harmless_inversion_end_to_end(tmp_path, tiny_model_dir):
    pairs = write_pairs(tmp_path / "pairs.jsonl", 5, human=False)
    preamble = tmp_path / "preamble.txt"
    preamble.write_text(HARMLESS_BASE.text)
    cache = str(tmp_path / "shared.sqlite")
    plain = local_cfg(
        tmp_path, tiny_model_dir, "plain.jsonl", input=pairs, task="harmless", preamble_file=str(preamble), cache=cache
    )
    run_label(plain)
    inverted = local_cfg(
        tmp_path,
        tiny_model_dir,
        "inv.jsonl",
        input=pairs,
        task="harmless",
        preamble_file=str(preamble),
        preamble_invert=True,
        cache=cache,
    )
    # the same prompts and log-probs (all from the cache): only the reading of them flips
    assert run_label(inverted)["calls"] == 0
    for p, q in zip(read_rows(tmp_path / "plain.jsonl"), read_rows(tmp_path / "inv.jsonl")):
        assert q["p_a"] == pytest.approx(1 - p["p_a"]) and q["label_prob"] == pytest.approx(p["label_prob"])
        assert (q["chosen"], q["rejected"]) == (p["rejected"], p["chosen"]) or p["p_a"] == 0.5
        assert (q["p_first_ab"], q["p_first_ba"]) == (p["p_first_ab"], p["p_first_ba"])
    # the stored harmless preamble inverts by itself; the metrics say so
    stored = local_cfg(tmp_path, tiny_model_dir, "stored.jsonl", input=pairs, task="harmless")
    run_label(stored)
    assert json.loads((tmp_path / "stored.metrics.json").read_text())["invert"] is True


def test_chat_labelling_local_equals_http(tmp_path, tiny_model_dir, tiny_tokenizer, server):
    pairs = write_pairs(tmp_path / "pairs.jsonl", 4)
    local = local_cfg(tmp_path, tiny_model_dir, "local.jsonl", input=pairs)
    local.backend.api = "chat"
    run_label(local)
    remote = local_cfg(tmp_path, tiny_model_dir, "remote.jsonl", input=pairs, top_k=len(tiny_tokenizer))
    remote.backend = BackendConfig(kind="openai", base_url=server, model="tiny", api="chat")
    run_label(remote)
    for lo, re_ in zip(read_rows(tmp_path / "local.jsonl"), read_rows(tmp_path / "remote.jsonl")):
        assert lo["chosen"] == re_["chosen"] and lo["label_prob"] == pytest.approx(re_["label_prob"], rel=1e-5)
    # rel 1e-5: a batched, left-padded float32 forward pass against the server's one-sequence pass


def test_self_consistency_samples_rationales(tmp_path, tiny_model_dir):
    pairs = write_pairs(tmp_path / "pairs.jsonl", 2)
    cfg = local_cfg(
        tmp_path,
        tiny_model_dir,
        "sc.jsonl",
        input=pairs,
        cot=True,
        self_consistency=2,
        rationale_max_tokens=3,
        sc_temperature=1.0,
    )
    assert run_label(cfg)["calls"] == 2 * 2 * 2 * 2  # pairs × orders × samples × (rationale + scoring)
    rows = read_rows(tmp_path / "sc.jsonl")
    assert all(len(r["rationale_ab"]) == 2 and len(r["rationale_ba"]) == 2 for r in rows)
    assert run_label(cfg)["calls"] == 0 and read_rows(tmp_path / "sc.jsonl") == rows  # samples are cached


def test_too_long_pairs_are_dropped_and_counted(tmp_path, tiny_model_dir):
    pairs = tmp_path / "pairs.jsonl"
    rows = [
        {"prompt": "red cat", "response_a": "dog", "response_b": "fish"},
        {"prompt": "red cat " * 40, "response_a": "dog", "response_b": "fish"},
    ]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = run_label(local_cfg(tmp_path, tiny_model_dir, "l.jsonl", input=pairs, max_prompt_tokens=300))
    assert summary["n_labelled"] == 1 and summary["n_dropped"] == 1
    (dropped,) = read_rows(tmp_path / "l.dropped.jsonl")
    assert dropped["reason"] == "too_long" and dropped["origin"].endswith(":2")
    assert json.loads((tmp_path / "l.metrics.json").read_text())["n_too_long"] == 1


# --- d-RLAIF ---------------------------------------------------------------------------------------------------------


def test_direct_score_by_hand_through_the_reward_contract():
    maps = {
        "eight-nine": {"8": L(0.5), "9": L(0.5)},  # s = 8.5 ⇒ r = (8.5 − 5.5) / 4.5 = 0.666667
        "uniform": {"1": L(0.2), **{str(i): L(0.1) for i in range(2, 10)}},  # with q = ½ below: P(1) = P(10) = 0.1
        "ten": {"10": 0.0},  # all mass on a "10" token ⇒ s = 10, r = 1
        "split": {"1": L(0.3), "5": L(0.7)},  # q = 0.4 ⇒ P(10) = 0.12, P(1) = 0.18; s = 0.18 + 1.2 + 3.5 = 4.88
    }
    after_one = {"uniform": {"0": L(0.5)}, "split": {"0": L(0.4), "\n": L(0.6)}}

    def script(text: str) -> dict[str, float]:
        response = text.split("SUMMARY: ")[-1].split("\n")[0]
        return after_one[response] if text.endswith("SCORE:1") else maps[response]

    source = DirectScoreSource(ScriptedBackend(script))
    scores = source.score(["post"] * 4, list(maps))
    torch.testing.assert_close(scores, torch.tensor([8.5, 5.5, 10.0, 4.88], dtype=torch.float64))
    response_ids = [[5, 6, 7], [5], [5, 6], [5, 6, 7, 8]]
    rewards, mask = source([{"prompt": "post"}] * 4, response_ids, list(maps), None)
    want = torch.zeros(4, 4)
    want[0, 2], want[1, 0], want[2, 1], want[3, 3] = 3 / 4.5, 0.0, 1.0, (4.88 - 5.5) / 4.5
    torch.testing.assert_close(rewards, want)
    assert mask.tolist() == [[True] * 3 + [False], [True] + [False] * 3, [True] * 2 + [False] * 2, [True] * 4]
    assert not hasattr(source, "world")  # gold logging reads --gold_world, not the reward source


def test_direct_source_with_real_backends(tmp_path, tiny_model_dir, server):
    rows = [{"prompt": "red cat is a dog"}, {"prompt": "oslo"}]
    texts, ids = ["blue fish.", "the pear!!!  "], [[7, 8, 9], [4, 5]]
    local = DirectScoreSource.from_spec(f"{tiny_model_dir}?task=helpful")
    assert isinstance(local.backend, LocalBackend) and local.ten_is_token is False  # "10" is "1" + "0" here
    rewards, mask = local(rows, ids, texts, None)
    last = rewards[[0, 1], [2, 1]]
    assert torch.isfinite(last).all() and (last.abs() <= 1).all() and rewards.sum() == last.sum()
    # the split of "10" cost one extra request per response
    assert local.backend.stats.calls == 4
    remote = DirectScoreSource.from_spec(f"{server}?model=tiny&task=helpful&top_k=300")
    torch.testing.assert_close(remote(rows, ids, texts, None)[0], rewards)
    assert strip_trailing("the pear!!!  ") == "the pear!" and strip_trailing("ok...") == "ok."
    # a rollout too long for the labeller gets reward 0 and is counted, instead of stopping training
    room = len(local.backend.encode(local.prompts(["red"], [texts[0]])[0])) + 10  # fits the first prompt only
    short = DirectScoreSource(LocalBackend(local.backend.model, local.backend.tokenizer, max_context=room))
    rewards, _ = short([{"prompt": "red"}, {"prompt": "red " * 30}], ids, texts, None)
    assert rewards[1].abs().sum() == 0 and short.n_too_long == 1 and short.n_invalid == 1


# --- through the CLI -------------------------------------------------------------------------------------------------


def rlxf_cli(*args: str) -> subprocess.Popen:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "rlxf.cli", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def cached_count(path: Path) -> int:
    try:
        with sqlite3.connect(path, timeout=1) as db:
            return db.execute("SELECT COUNT(*) FROM judgements").fetchone()[0]
    except sqlite3.OperationalError:  # not created yet
        return 0


def test_cli_label_help():
    proc = rlxf_cli("label", "--help")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "--backend.base_url" in out and "--preamble_invert" in out


def test_cli_bad_input_names_file_line_and_field(tmp_path, tiny_model_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "response_a": "x", "response_b": "y"}\n{"prompt": "p", "response_a": "x"}\n')
    proc = rlxf_cli("label", "--input", str(bad), "--backend.model", str(tiny_model_dir), "--out", str(tmp_path / "o"))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "bad.jsonl, line 2, field 'response_b'" in err and "Traceback" not in err


def test_cli_label_killed_and_resumed(tmp_path, engine, server):
    pairs = write_pairs(tmp_path / "pairs.jsonl", 12)
    schedule = FaultSchedule(["slow"], slow_s=0.15)  # stalls every request so the job can be killed midway
    srv, _, url = start_fault_server(engine, schedule)
    out, cache = tmp_path / "labels.jsonl", tmp_path / "labels.cache.sqlite"
    args = [
        "label",
        "--input",
        str(pairs),
        "--out",
        str(out),
        "--task",
        "summarize",
        "--preamble",
        "base",
        "--cot",
        "false",
        "--top_k",
        "300",
        "--progress",
        "false",
        "--backend.kind",
        "openai",
        "--backend.base_url",
        url,
        "--backend.model",
        "tiny",
        "--backend.max_concurrency",
        "2",
    ]
    total = 12 * 2
    try:
        proc = rlxf_cli(*args)
        deadline = time.time() + 90
        while cached_count(cache) < 6 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=30)
        done = cached_count(cache)
        assert 6 <= done < total and not out.exists()  # killed midway; no output yet, so no torn line either
        schedule.slow_s = 0.0
        proc = rlxf_cli(*args)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-2000:]
    finally:
        srv.shutdown()
        srv.server_close()
    stats = json.loads((tmp_path / "labels.label_stats.json").read_text())
    # the second run asked only for what the first had not finished
    assert stats["requests_cached"] == done and stats["requests_sent"] == stats["calls"] == total - done
    # and its output equals an uninterrupted run's
    fresh = local_cfg(tmp_path, Path("unused"), "fresh.jsonl", input=pairs, top_k=300)
    fresh.backend = BackendConfig(kind="openai", base_url=server, model="tiny")
    run_label(fresh)
    resumed, uninterrupted = read_rows(out), read_rows(tmp_path / "fresh.jsonl")
    # equal up to float rounding: `rlxf serve` batches concurrent requests, and a row padded into a different batch
    # rounds differently in its last bits (~1e-7), as on any batching server
    assert len(resumed) == len(uninterrupted) == 12
    for got, want in zip(resumed, uninterrupted):
        assert got.keys() == want.keys()
        for key, value in want.items():
            if isinstance(value, float):
                assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
            else:
                assert got[key] == value, key
