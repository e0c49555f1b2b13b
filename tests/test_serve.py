"""`rlxf serve` (rlxf.backends.serve): OpenAI response formats, log-probs against a direct forward pass, errors, and the
CLI as a subprocess, all on loopback."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlxf.backends import LocalBackend, OpenAIBackend, Prompt, apply_chat, chat_messages
from rlxf.backends.http import _first_top
from rlxf.backends.serve import ServeEngine, start_server
from rlxf.feedback.label_math import label_logprobs_from_topk

PROMPT = "the red cat is a dog.\nSummary 1 - red\nSummary 2 - cat dog\nPreferred Summary="


@pytest.fixture(scope="module")
def url(tiny_model_dir):
    # fp32 on the CPU: the log-probs are compared with direct forward passes (a GPU would serve bf16)
    engine = ServeEngine.load(tiny_model_dir, name="tiny", device="cpu", max_logprobs=50)
    server, _, base = start_server(engine=engine)
    yield base
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


def call(url: str, path: str, body: dict | bytes | None = None) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"{url}/{path}", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def next_logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1].log_softmax(-1)  # (V,)


def test_models_and_health(url):
    status, out = call(url, "models")
    assert status == 200 and [m["id"] for m in out["data"]] == ["tiny"] and out["object"] == "list"
    assert call(url.removesuffix("/v1"), "health")[0] == 200


def test_completions_logprobs_equal_a_forward_pass(url, model, tiny_tokenizer):
    status, out = call(
        url, "completions", {"model": "tiny", "prompt": PROMPT, "max_tokens": 1, "temperature": 0, "logprobs": 5}
    )
    assert status == 200 and out["object"] == "text_completion"
    (choice,) = out["choices"]
    logp = next_logprobs(model, tiny_tokenizer.encode(PROMPT))  # BOS + prompt, as the server encodes it
    greedy = int(logp.argmax())
    lp = choice["logprobs"]
    assert lp["tokens"] == [tiny_tokenizer.decode([greedy])] and choice["text"] == lp["tokens"][0]
    assert math.isclose(lp["token_logprobs"][0], logp[greedy].item(), rel_tol=1e-5)
    top = lp["top_logprobs"][0]
    assert 1 <= len(top) <= 5 and lp["text_offset"] == [0]
    # each top entry is the log-prob of its token (tokens decoding alike are summed: compare the distinct ones)
    ids = logp.topk(5).indices.tolist()
    texts = [tiny_tokenizer.decode([i]) for i in ids]
    for i, t in zip(ids, texts):
        if texts.count(t) == 1:
            assert math.isclose(top[t], logp[i].item(), rel_tol=1e-5)
    assert out["usage"] == {
        "prompt_tokens": len(tiny_tokenizer.encode(PROMPT)),
        "completion_tokens": 1,
        "total_tokens": len(tiny_tokenizer.encode(PROMPT)) + 1,
    }
    assert choice["finish_reason"] in ("length", "stop")


def test_chat_completions_continue_the_prefill(url, model, tiny_tokenizer):
    prompt = Prompt("Which summary is better?\n", "Preferred Summary=")
    body = {
        "model": "tiny",
        "messages": chat_messages(prompt),
        "max_tokens": 1,
        "temperature": 0.0,
        "logprobs": True,
        "top_logprobs": 3,
        "continue_final_message": True,
        "add_generation_prompt": False,
    }
    status, out = call(url, "chat/completions", body)
    assert status == 200 and out["object"] == "chat.completion"
    (choice,) = out["choices"]
    text = apply_chat(tiny_tokenizer, chat_messages(prompt), False, True)
    assert text.endswith("<|assistant|>\nPreferred Summary=")  # the assistant turn is left open after the prefill
    logp = next_logprobs(model, tiny_tokenizer.encode(text, add_special_tokens=False))
    (entry,) = choice["logprobs"]["content"]
    assert entry["token"] == choice["message"]["content"] == tiny_tokenizer.decode([int(logp.argmax())])
    assert entry["bytes"] == list(entry["token"].encode())
    tops = entry["top_logprobs"]
    assert len(tops) == 3
    torch.testing.assert_close(torch.tensor([t["logprob"] for t in tops]), logp.topk(3).values)


def test_greedy_generation_matches_the_local_backend(url, tiny_model_dir):
    status, out = call(
        url, "completions", {"model": "tiny", "prompt": ["red cat", "blue"], "max_tokens": 7, "temperature": 0}
    )
    assert status == 200 and [c["index"] for c in out["choices"]] == [0, 1]
    local = LocalBackend(tiny_model_dir, device="cpu")  # the server above runs fp32 on the CPU
    assert [c["text"] for c in out["choices"]] == local.generate_greedy(["red cat", "blue"], 7)
    assert all(c["finish_reason"] == "length" for c in out["choices"]) and out["usage"]["completion_tokens"] == 14


def test_seeded_sampling_is_reproducible(url):
    body = {"model": "tiny", "prompt": "red", "max_tokens": 8, "temperature": 1.0, "top_k": 40, "seed": 7}
    assert (
        call(url, "completions", body)[1]["choices"][0]["text"]
        == call(url, "completions", body)[1]["choices"][0]["text"]
    )


@pytest.mark.parametrize(
    "path, body, status, message",
    [
        ("completions", b"{not json", 400, "not valid JSON"),
        ("completions", {"model": "other", "prompt": "x"}, 404, "does not exist"),
        ("completions", {"prompt": 3}, 400, "prompt must be"),
        ("completions", {"prompt": "x", "n": 0}, 400, "n must be an integer in [1, 64]"),
        ("completions", {"prompt": "x", "logprobs": 51}, 400, "logprobs must be an integer in [0, 50]"),
        ("completions", {"prompt": "red " * 600}, 400, "maximum context length is 512 tokens"),
        ("chat/completions", {"messages": []}, 400, "messages must be"),
        (
            "chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "continue_final_message": True},
            400,
            "final assistant message",
        ),
        ("embeddings", {"input": "x"}, 404, "no route"),
    ],
)
def test_bad_requests_get_openai_errors(url, path, body, status, message):
    got, out = call(url, path, body)
    assert got == status and message in out["error"]["message"] and out["error"]["code"] == status


def rlxf_cli(*args: str, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "rlxf.cli", *args], capture_output=True, text=True, timeout=120, env=env, **kw
    )


def test_cli_serve_help():
    proc = rlxf_cli("serve", "--help")
    assert proc.returncode == 0 and "--port" in proc.stdout and "--max_logprobs" in proc.stdout


def test_cli_serve_on_a_free_port(tiny_model_dir, tmp_path):
    ready = tmp_path / "url.txt"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    args = [
        "serve",
        "--model",
        str(tiny_model_dir),
        "--port",
        "0",
        "--served_model_name",
        "judge",
        "--ready_file",
        str(ready),
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "rlxf.cli", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.time() + 90
        while not ready.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert ready.exists(), proc.stderr.read() if proc.poll() is not None else "server did not start"
        base = ready.read_text().strip()
        assert base.startswith("http://127.0.0.1:") and not base.endswith(":0/v1")
        assert call(base, "models")[1]["data"][0]["id"] == "judge"
        status, out = call(base, "completions", {"model": "judge", "prompt": "red", "max_tokens": 2, "temperature": 0})
        assert status == 200 and out["usage"]["completion_tokens"] <= 2
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert f"at {base}" in proc.stderr.read()  # the URL is logged too


def test_a_generated_eos_keeps_its_logprobs(tiny_model_dir, tiny_tokenizer):
    """A scoring request whose most likely next token is EOS: the reply lists EOS with its top log-probs (text empty,
    finish "stop"), so a labelling client reads a top-k map (no label tokens in it) instead of retrying forever."""
    engine = ServeEngine.load(tiny_model_dir, name="eos")
    eos = tiny_tokenizer.eos_token_id
    boost = torch.zeros(engine.model.config.vocab_size)
    boost[eos] = 1e4  # steer the real model to end at once
    engine.model.get_output_embeddings().register_forward_hook(
        lambda module, args, logits: logits + boost.to(logits.device, logits.dtype)
    )
    server, _, base = start_server(engine=engine)
    try:
        body = {"model": "eos", "prompt": PROMPT, "max_tokens": 1, "temperature": 0, "logprobs": 3}
        status, out = call(base, "completions", body)
        assert status == 200
        (choice,) = out["choices"]
        assert choice["text"] == "" and choice["finish_reason"] == "stop"
        lp = choice["logprobs"]
        assert lp["tokens"] == [tiny_tokenizer.decode([eos])] and len(lp["top_logprobs"][0]) >= 1
        assert lp["token_logprobs"][0] > -1e-3 and out["usage"]["completion_tokens"] == 1
        status, out = call(
            base,
            "chat/completions",
            {**body, "messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 2},
        )
        assert status == 200 and out["choices"][0]["message"]["content"] == ""
        assert len(out["choices"][0]["logprobs"]["content"][0]["top_logprobs"]) == 2

        remote = OpenAIBackend(base, "eos", max_retries=0)
        ((index, top),) = remote.iter_next_token_logprobs([PROMPT], k=3)
        assert index == 0 and tiny_tokenizer.decode([eos]) in top and remote.stats.calls == 1
        assert not label_logprobs_from_topk(top).valid  # no label token in the map: an invalid order
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("chat", [False, True])
def test_a_reply_listing_no_generated_token_reads_as_an_empty_map(chat):
    choice = {"logprobs": {"content": []}} if chat else {"logprobs": {"top_logprobs": [], "tokens": []}}
    assert _first_top(choice, chat) == {}
    choice = (
        {"logprobs": {"content": [{"top_logprobs": [{"token": "1", "logprob": -0.1}]}]}}
        if chat
        else {"logprobs": {"top_logprobs": [{"1": -0.1}]}}
    )
    assert _first_top(choice, chat) == {"1": -0.1}
