"""Labeller backends (rlxf.backends.base): the local model against a direct forward pass, the HTTP client against
`rlxf serve` on loopback, and retries against a server that injects faults."""

from __future__ import annotations

import json
import math

import pytest
import torch
from fault_server import FaultSchedule, start_fault_server
from transformers import AutoModelForCausalLM

from rlxf.backends import (
    BackendError,
    LocalBackend,
    OpenAIBackend,
    Prompt,
    PromptTooLongError,
    parse_backend_spec,
)
from rlxf.backends.serve import ServeEngine, start_server
from rlxf.feedback.label import LabelConfig, run_label
from rlxf.feedback.label_math import label_logprobs, label_logprobs_from_topk, label_token_ids
from rlxf.models.tiny import TinyModelConfig, build_tiny_model, train_tokenizer

ENDING = "Preferred Summary="
PROMPTS = [
    Prompt("the red cat is a dog.\nSummary 1 - red\nSummary 2 - cat dog\n", ENDING),
    Prompt("oslo\n", ENDING),
    Prompt("what colour is the fish of rome and the pear of paris?\nSummary 1 - a\nSummary 2 - b\n", ENDING),
]


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return ServeEngine.load(tiny_model_dir, name="tiny", max_logprobs=512)


@pytest.fixture(scope="module")
def server(engine):
    srv, _, url = start_server(engine=engine)
    yield url
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def local(tiny_model_dir):
    return LocalBackend(tiny_model_dir, batch_size=2, device="cpu")  # fp32: compared with direct forward passes


def labels_of(tops):
    return torch.tensor([label_logprobs_from_topk(t).logprobs for t in tops], dtype=torch.float32)  # (B, 2)


# --- local backend ---------------------------------------------------------------------------------------------------


def test_local_label_logprobs_equal_a_direct_forward_pass(local, tiny_model_dir, tiny_tokenizer):
    tops = local.next_token_logprobs(PROMPTS, k=3, labels=("1", "2"))
    # the local backend adds every label variant exactly, whatever the top 3 are: nothing is imputed
    assert all(not label_logprobs_from_topk(t).imputed for t in tops)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids_of = label_token_ids(tiny_tokenizer)
    want = []
    for p in PROMPTS:  # one unpadded forward pass per prompt, BOS included as in completions APIs
        ids = torch.tensor([tiny_tokenizer.encode(p.text)])
        with torch.no_grad():
            logp = model(ids).logits[:, -1].log_softmax(-1)  # (1, V)
        want.append(label_logprobs(logp, ids_of)[0])
    torch.testing.assert_close(labels_of(tops), torch.stack(want))
    assert local.stats.calls >= 3 and local.stats.prompt_tokens > 0


def test_space_variant_labels_are_summed():
    # a vocabulary that holds both "1" and " 1" (byte-level "Ġ1"): both spellings are read and summed
    tok = train_tokenizer(["Preferred Summary=1", "Preferred Summary= 2", "pick 1 or 2", "SCORE: 1 2"] * 40, 300)
    assert len(tok.encode(" 1", add_special_tokens=False)) == 1
    model = build_tiny_model(tok, TinyModelConfig(hidden_size=32, intermediate_size=64, heads=4, layers=2))
    backend = LocalBackend(model, tok, model_id="space-variants")
    (top,) = backend.next_token_logprobs([Prompt("pick one\n", ENDING)], k=1, labels=("1", "2"))
    assert {"1", " 1", "2", " 2"} <= set(top)
    ids = tok.encode("pick one\n" + ENDING)
    with torch.no_grad():
        logp = model(torch.tensor([ids])).logits[:, -1].double().log_softmax(-1)  # (1, V)
    # ℓ_1 = log(P("1") + P(" 1")), from two distinct vocabulary ids
    one, space_one = tok.convert_tokens_to_ids(["1", "Ġ1"])
    assert math.isclose(top["1"], logp[0, one].item(), rel_tol=1e-5)
    assert math.isclose(top[" 1"], logp[0, space_one].item(), rel_tol=1e-5)
    read = label_logprobs_from_topk(top)
    want = label_logprobs(logp, label_token_ids(tok))[0]
    torch.testing.assert_close(torch.tensor(read.logprobs, dtype=torch.float32), want.float())


def test_local_batched_equals_unbatched(tiny_model_dir):
    batched = LocalBackend(tiny_model_dir, batch_size=3)
    single = LocalBackend(tiny_model_dir, batch_size=1)
    b_tops = batched.next_token_logprobs(PROMPTS, k=5, labels=("1", "2"))
    s_tops = single.next_token_logprobs(PROMPTS, k=5, labels=("1", "2"))
    for b, s in zip(b_tops, s_tops):
        common = sorted(set(b) & set(s))
        assert len(common) >= 5
        torch.testing.assert_close(torch.tensor([b[t] for t in common]), torch.tensor([s[t] for t in common]))
    assert batched.stats.forward_passes == 1 and single.stats.forward_passes == 3  # one pass per batch
    assert batched.generate_greedy(PROMPTS, 6) == single.generate_greedy(PROMPTS, 6)


def test_local_prompt_too_long_is_reported_per_prompt(tiny_model_dir):
    backend = LocalBackend(tiny_model_dir, max_context=40)
    results = dict(backend.iter_next_token_logprobs(PROMPTS, k=2))
    assert isinstance(results[0], PromptTooLongError) and isinstance(results[2], PromptTooLongError)
    assert isinstance(results[1], dict)  # "oslo" fits
    with pytest.raises(PromptTooLongError, match="context is 40 tokens"):
        backend.next_token_logprobs(PROMPTS, k=2)


# --- HTTP backend against `rlxf serve` -------------------------------------------------------------------------------


@pytest.mark.parametrize("api", ["completions", "chat"])
def test_http_logprobs_equal_local(api, server, tiny_model_dir, tiny_tokenizer):
    remote = OpenAIBackend(server, api=api, timeout=30)
    assert remote.model == "tiny"  # discovered from GET /v1/models
    local = LocalBackend(tiny_model_dir, chat=api == "chat", batch_size=2)
    k = len(tiny_tokenizer)  # the whole vocabulary: no label can be missing
    r_tops = remote.next_token_logprobs(PROMPTS, k=k)
    l_tops = local.next_token_logprobs(PROMPTS, k=5, labels=("1", "2"))
    torch.testing.assert_close(labels_of(r_tops), labels_of(l_tops))
    # top-5 maps agree too (ids that decode alike, e.g. partial UTF-8 bytes as "\ufffd", merge within the top 5)
    for r, lo in zip(remote.next_token_logprobs(PROMPTS, k=5), l_tops):
        assert set(r) <= set(lo)
        torch.testing.assert_close(torch.tensor([r[t] for t in r]), torch.tensor([lo[t] for t in r]))
    assert remote.generate_greedy(PROMPTS[:2], 6) == local.generate_greedy(PROMPTS[:2], 6)
    stats = remote.stats.snapshot()
    assert stats["calls"] == 1 + 3 + 3 + 2 and stats["retries"] == 0  # models, 2 × 3 scorings, 2 generations
    assert stats["prompt_tokens"] > 0 and stats["completion_tokens"] >= 3


def test_http_top_k_list_can_miss_labels(server):
    remote = OpenAIBackend(server, "tiny")
    tops = remote.next_token_logprobs(PROMPTS, k=2)
    assert all(len(t) <= 3 for t in tops)  # top 2 (+ the sampled token)
    read = [label_logprobs_from_topk(t) for t in tops]
    # the untrained tiny model rarely ranks "1"/"2" in its top 2: those orders are invalid, never silently 0/1
    for t, r in zip(tops, read):
        missing = [lab for lab in ("1", "2") if lab not in t and " " + lab not in t]
        assert r.valid == (len(missing) < 2) and r.imputed == (len(missing) == 1)


def test_4xx_fails_fast_with_the_server_message(server):
    remote = OpenAIBackend(server, "no-such-model", max_retries=5, backoff=0.01)
    with pytest.raises(BackendError, match="HTTP 404.*no-such-model.*not retried"):
        remote.next_token_logprobs(PROMPTS[:1], k=2)
    assert remote.stats.calls == 1 and remote.stats.retries == 0


def test_context_length_400_is_a_per_prompt_error(engine):
    small = ServeEngine(LocalBackend(engine.model, engine.tokenizer, max_context=40), "tiny")  # same model, 40 tokens
    srv, _, url = start_server(engine=small)
    try:
        results = dict(OpenAIBackend(url, "tiny").iter_next_token_logprobs(PROMPTS, k=2))
    finally:
        srv.shutdown()
        srv.server_close()
    assert isinstance(results[0], PromptTooLongError) and "maximum context length is 40" in str(results[0])
    assert isinstance(results[1], dict)


def test_retries_exhausted_raise(engine):
    schedule = FaultSchedule(["500"])
    srv, _, url = start_fault_server(engine, schedule)
    try:
        remote = OpenAIBackend(url, "tiny", max_retries=2, backoff=0.01, backoff_max=0.02)
        with pytest.raises(BackendError, match="gave up after 3 attempts; last error: HTTP 500"):
            remote.next_token_logprobs(PROMPTS[:1], k=2)
    finally:
        srv.shutdown()
        srv.server_close()
    assert remote.stats.calls == 3 and remote.stats.retries == 2 and schedule.faults == 3


def test_labelling_survives_faults(engine, server, tmp_path, tiny_tokenizer):
    pairs = tmp_path / "pairs.jsonl"
    words = "red blue green cat dog fish apple pear plum paris rome oslo".split()
    rows = [{"prompt": " ".join(words[i : i + 4]), "chosen": words[i], "rejected": words[i + 1]} for i in range(6)]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def label(url: str, out: str) -> dict:
        backend = dict(
            kind="openai",
            base_url=url,
            model="tiny",
            max_concurrency=3,
            timeout=1.5,
            backoff=0.01,
            backoff_max=0.05,
            max_retries=8,
        )
        cfg = LabelConfig(
            input=str(pairs),
            out=str(tmp_path / out),
            task="summarize",
            preamble="base",
            cot=True,
            rationale_max_tokens=4,
            top_k=len(tiny_tokenizer),
            progress=False,
        )
        cfg.backend.__dict__.update(backend)
        return run_label(cfg)

    clean = label(server, "clean.jsonl")
    schedule = FaultSchedule(
        ["ok", "500", "ok", "malformed", "timeout", "ok", "429", "wrong", "ok", "drop"], max_faults=8, sleep_s=2.0
    )
    srv, _, url = start_fault_server(engine, schedule)
    try:
        faulty = label(url, "faulty.jsonl")
        assert faulty["n_labelled"] == 6
    finally:
        srv.shutdown()
        srv.server_close()
    want = (tmp_path / "clean.jsonl").read_text().splitlines()
    got = (tmp_path / "faulty.jsonl").read_text().splitlines()
    assert len(got) == len(want) == 6  # none lost
    for w, g in zip(map(json.loads, want), map(json.loads, got)):
        assert (g["chosen"], g["rejected"], g["rationale_ab"]) == (w["chosen"], w["rejected"], w["rationale_ab"])
        assert math.isclose(g["label_prob"], w["label_prob"], rel_tol=1e-6)
    assert schedule.faults == 8 and set(schedule.injected) == {"500", "malformed", "timeout", "429", "wrong", "drop"}
    stats = json.loads((tmp_path / "faulty.label_stats.json").read_text())
    # 6 pairs x 2 orders x (rationale + scoring) = 24 requests; each injected fault cost exactly one retry
    assert stats["requests_sent"] == 24 and stats["retries"] == 8 and stats["calls"] == 24 + 8
    assert clean["retries"] == 0 and clean["calls"] == 24


def test_backend_spec_parsing():
    cfg, extra = parse_backend_spec("runs/judge?batch_size=16&task=helpful", extra_keys=("task",))
    assert (cfg.kind, cfg.model, cfg.batch_size, extra) == ("local", "runs/judge", 16, {"task": "helpful"})
    cfg, _ = parse_backend_spec("http://127.0.0.1:8000/v1?model=judge&api=chat&timeout=5")
    assert (cfg.kind, cfg.base_url, cfg.model, cfg.api, cfg.timeout) == (
        "openai",
        "http://127.0.0.1:8000/v1",
        "judge",
        "chat",
        5.0,
    )
    with pytest.raises(ValueError, match="unknown key"):
        parse_backend_spec("runs/judge?bogus=1")
    with pytest.raises(ValueError, match="expected an integer"):
        parse_backend_spec("runs/judge?batch_size=many")
