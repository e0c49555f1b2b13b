"""The label cache stores only valid answers, keyed by the endpoint they came from; a labelling run that labels nothing
fails with the counts. Real loopback servers (`rlxf serve`'s handler) whose answers are rewritten into impossible
log-prob maps (NaN, inf, positive, more than all the mass) or plausible but different ones."""

from __future__ import annotations

import json
import math
import sqlite3
import threading
from pathlib import Path

import pytest

from rlxf.backends import BackendConfig, BackendStats, OpenAIBackend, as_prompt
from rlxf.backends.cache import JudgementCache, cached_requests, check_topk
from rlxf.backends.serve import OpenAIHandler, ServeEngine, start_server
from rlxf.errors import BackendError
from rlxf.feedback.label import LabelConfig, PairwiseLabeler, run_label
from rlxf.feedback.prompts import SUMMARIZE_BASE, LabellingTemplate

WORDS = "red blue green cat dog fish apple pear plum paris rome oslo the of and".split()
TOP_K = 300  # above the tiny vocabulary: the server returns the whole distribution

POISONS = {
    "nan": lambda top: {t: math.nan for t in top},
    "inf": lambda top: {**top, next(iter(top)): math.inf},
    "positive": lambda top: {t: v + 50.0 for t, v in top.items()},
    "mass": lambda top: {t: math.log(0.9) for t in top},  # every token 0.9: far more than all the mass
    "swapped": lambda top: {"1": math.log(0.9), "2": math.log(0.1)},  # valid, but not this server's answer
    "no_label": lambda top: {"The": -0.1, "\n": -3.0},  # valid, without either label token
}


class PoisonHandler(OpenAIHandler):
    """Serves normally, then rewrites the first generated token's top log-probs with `server.poison` while
    `server.left` (-1 = always) allows."""

    def completions(self, body):
        out = super().completions(body)
        srv = self.server
        with srv.lock:
            poison = srv.poison if srv.left != 0 else None
            if poison is not None:
                srv.left -= 1 if srv.left > 0 else 0
                srv.poisoned += 1
        if poison is not None:
            for choice in out["choices"]:
                tops = (choice["logprobs"] or {}).get("top_logprobs") or []
                if tops:
                    tops[0] = POISONS[poison](tops[0])
        return out


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return ServeEngine.load(tiny_model_dir, name="tiny", device="cpu", max_logprobs=512)


@pytest.fixture
def serve(engine):
    """start(poison, left) -> base URL of a poisoning server over the shared engine; all stopped at the end."""
    servers = []

    def start(poison: str | None = None, left: int = -1) -> str:
        srv, _, url = start_server(engine=engine, handler=PoisonHandler)
        srv.poison, srv.left, srv.poisoned, srv.lock = poison, left, 0, threading.Lock()
        servers.append(srv)
        return url

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def pairs(n: int) -> list[tuple[str, str, str]]:
    return [
        (" ".join(WORDS[(i + j) % len(WORDS)] for j in range(5)), WORDS[i], WORDS[(i + 7) % len(WORDS)])
        for i in range(n)
    ]


def label_with(url: str, cache: JudgementCache, n: int = 3):
    backend = OpenAIBackend(url, "tiny", max_retries=0, backoff=0.0)
    labeller = PairwiseLabeler(
        backend, LabellingTemplate("summarize", SUMMARIZE_BASE), cache=cache, k=TOP_K, progress=False
    )
    try:
        return labeller.label(pairs(n)), labeller, backend
    finally:
        backend.close()


def cached_rows(path: Path) -> list[dict]:
    db = sqlite3.connect(path)
    try:
        return [json.loads(r) for (r,) in db.execute("SELECT result FROM judgements")]
    finally:
        db.close()


# --- the check -------------------------------------------------------------------------------------------------------


def test_check_topk_rejects_impossible_distributions():
    for bad in (
        {"1": math.nan},
        {"1": math.inf},
        {"1": -math.inf, "2": -0.1},
        {"1": 50.0},
        {"1": 1e-3},
        {"1": math.log(0.6), "2": math.log(0.6)},
        {"1": "x"},
        [("1", -0.1)],
    ):
        assert check_topk(bad) is not None, bad
    for good in ({}, {"1": 0.0}, {"1": 5e-7}, {"1": math.log(0.6), "2": math.log(0.4) + 1e-4}, {"The": -30.0}):
        assert check_topk(good) is None, good


# --- item 1: only valid answers are cached, under the endpoint's key ---------------------------------------------------


@pytest.mark.parametrize("poison", ["nan", "inf", "positive", "mass"])
def test_invalid_answers_are_retried_reported_and_never_cached(tmp_path, serve, poison):
    bad, healthy = serve(poison), serve()
    cache = JudgementCache(tmp_path / "cache.sqlite")
    judged, labeller, backend = label_with(bad, cache)
    assert not any(j.valid for j in judged) and all(j.invalid_answers == 2 for j in judged)
    # each of the 6 requests was asked 3 times (the first answer and 2 more), the re-asks counted as retries
    assert backend.stats.calls == 18 and backend.stats.retries == 12
    assert len(cache) == 0
    # a later run against a healthy server with the same model name asks it everything and labels every pair
    judged, labeller, _ = label_with(healthy, cache)
    assert all(j.valid for j in judged) and labeller.requests_sent == 6
    assert len(cache) == 6 and all(check_topk(r["top"]) is None for r in cached_rows(tmp_path / "cache.sqlite"))
    cache.close()


def test_cache_key_names_the_endpoint(tmp_path, serve):
    other, healthy = serve("swapped"), serve()  # two servers, both serving a model named "tiny"
    cache = JudgementCache(tmp_path / "cache.sqlite")
    first, labeller, _ = label_with(other, cache)
    assert all(j.valid for j in first) and labeller.requests_sent == 6
    second, labeller, _ = label_with(healthy, cache)
    assert labeller.requests_sent == 6 and len(cache) == 12  # not answered from the other server's rows
    assert [j.p_first_ab for j in first] != pytest.approx([j.p_first_ab for j in second])
    again, labeller, _ = label_with(healthy, cache)  # the same endpoint again: all from the cache
    assert labeller.requests_sent == 0 and [j.p_a for j in again] == [j.p_a for j in second]
    cache.close()


def test_a_transient_invalid_answer_is_asked_again(tmp_path, serve):
    flaky, healthy = serve("nan", left=2), serve()
    cache = JudgementCache(tmp_path / "cache.sqlite")
    judged, _, backend = label_with(flaky, cache)
    assert all(j.valid for j in judged) and sum(j.invalid_answers for j in judged) == 0
    assert backend.stats.retries == 2 and len(cache) == 6
    reference, _, _ = label_with(healthy, JudgementCache(":memory:"))
    assert [j.p_a for j in judged] == pytest.approx([j.p_a for j in reference])
    cache.close()


class _Scripted:
    """A local-style backend (no base URL) that answers every scoring prompt with `top`."""

    kind, model_id = "scripted", "scripted"

    def __init__(self, top):
        self.top, self.stats = top, BackendStats()

    def prompt_key(self, p):
        return as_prompt(p).text

    def iter_next_token_logprobs(self, prompts, k, labels=()):
        for i, _ in enumerate(prompts):
            self.stats.add(calls=1)
            yield i, dict(self.top)


def test_an_invalid_cached_row_is_asked_again():
    cache = JudgementCache(":memory:")
    params = {"k": 5, "labels": ["1", "2"]}
    results, sent = cached_requests(_Scripted({"1": 50.0}), cache, "logprobs", params, ["p"])
    assert sent == 1 and results[0]["error"] == "invalid_answer" and len(cache) == 0
    # a row an older version stored (same key, NaN log-probs) is not an answer
    good = _Scripted({"1": -0.1, "2": -3.0})
    cached_requests(good, cache, "logprobs", params, ["p"])
    (key,) = [k for (k,) in cache.db.execute("SELECT key FROM judgements")]
    cache.db.execute("UPDATE judgements SET result = ? WHERE key = ?", (json.dumps({"top": {"1": math.nan}}), key))
    cache.db.commit()
    results, sent = cached_requests(good, cache, "logprobs", params, ["p"])
    assert sent == 1 and results[0] == {"top": {"1": -0.1, "2": -3.0}}


# --- item 2: a run that labels nothing fails, with the counts and what to change -------------------------------------


def write_pairs(path: Path, n: int) -> Path:
    path.write_text(
        "".join(json.dumps({"prompt": c, "response_a": a, "response_b": b}) + "\n" for c, a, b in pairs(n))
    )
    return path


def http_cfg(tmp_path: Path, url: str, **kw) -> LabelConfig:
    return LabelConfig(
        input=str(write_pairs(tmp_path / "pairs.jsonl", 3)),
        out=str(tmp_path / "labels.jsonl"),
        backend=BackendConfig(kind="openai", base_url=url, model="tiny", max_retries=0, backoff=0.0),
        **(dict(task="summarize", preamble="base", cot=False, progress=False, top_k=TOP_K) | kw),
    )


def test_a_run_with_only_invalid_answers_fails_with_counts(tmp_path, serve):
    with pytest.raises(BackendError, match=r"labelled 0 of 3 pairs.*3 invalid_answer.*fix the server"):
        run_label(http_cfg(tmp_path, serve("nan")))
    dropped = [json.loads(line) for line in (tmp_path / "labels.dropped.jsonl").read_text().splitlines()]
    assert [d["reason"] for d in dropped] == ["invalid_answer"] * 3
    metrics = json.loads((tmp_path / "labels.metrics.json").read_text())
    assert metrics["n_valid"] == 0 and metrics["n_invalid_answers"] == 6
    assert json.loads((tmp_path / "labels.label_stats.json").read_text())["invalid_answers"] == 6


def test_a_run_without_label_tokens_fails_naming_top_k(tmp_path, serve):
    with pytest.raises(BackendError, match=r"labelled 0 of 3 pairs.*3 invalid\b.*raise --top_k"):
        run_label(http_cfg(tmp_path, serve("no_label"), top_k=2))


def test_cli_exits_2_with_one_line_when_nothing_is_labelled(tmp_path, serve, capsys):
    from rlxf.cli import main

    url = serve("no_label")
    pairs_file = write_pairs(tmp_path / "pairs.jsonl", 2)
    args = ["label", "--input", str(pairs_file), "--out", str(tmp_path / "o.jsonl"), "--task", "summarize",
            "--preamble", "base", "--cot", "false", "--progress", "false", "--backend.kind", "openai",
            "--backend.base_url", url, "--backend.model", "tiny"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("rlxf: error: labelled 0 of 2 pairs") and "top_k" in err[-1]
    assert not any("Traceback" in line for line in err)
