"""`rlxf serve` as the official `openai` client sees it (issue 17): a real server on loopback, the real SDK, no mocks.

Models list / retrieve, completions and chat with log-probs, stop strings and special tokens kept out of the text, n > 1,
streaming for both endpoints, text-part and null message content, 400s for fields the server does not implement, and
concurrent clients batched on the model with correct, independent answers."""

from __future__ import annotations

import http.client
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from rlxf.backends.serve import ServeEngine, _Job, start_server

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPT = "the red cat is a dog. the blue fish is"
USER = [{"role": "user", "content": "what colour is the cat"}]


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return ServeEngine.load(tiny_model_dir, name="tiny", device="cpu", max_logprobs=20)


@pytest.fixture(scope="module")
def base(engine):
    server, _, url = start_server(engine=engine)
    yield url
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def client(base):
    return openai.OpenAI(base_url=base, api_key="x", max_retries=0, timeout=120)


def special_free(engine: ServeEngine, text: str) -> bool:
    return not any(s in text for s in engine.special_texts)


def test_models_list_and_retrieve(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    model = client.models.retrieve("tiny")
    assert model.id == "tiny" and model.object == "model"
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.models.retrieve("other")


def test_completions_logprobs_and_text_offsets(client, engine):
    out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, logprobs=3)
    (choice,) = out.choices
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) >= 1
    assert special_free(engine, choice.text)
    assert lp.text_offset == sorted(lp.text_offset) and all(0 <= o <= len(choice.text) for o in lp.text_offset)
    for token, offset, top in zip(lp.tokens, lp.text_offset, lp.top_logprobs):
        if token not in engine.special_texts:  # an EOS is listed (with its log-probs) at the end of the text
            assert choice.text[offset : offset + len(token)] == token
        assert token in top and 1 <= len(top) <= 4
    assert out.usage.completion_tokens == len(lp.tokens)


def test_chat_logprobs_and_top_logprobs(client, engine):
    out = client.chat.completions.create(
        model="tiny", messages=USER, max_tokens=10, temperature=0, logprobs=True, top_logprobs=2
    )
    (choice,) = out.choices
    content = choice.logprobs.content
    assert choice.message.role == "assistant" and special_free(engine, choice.message.content)
    assert len(content) >= 1 and all(len(e.top_logprobs) == 2 for e in content)
    assert all(e.top_logprobs[0].logprob >= e.logprob - 1e-6 for e in content)  # greedy: the top token
    text = "".join(e.token for e in content if e.token not in engine.special_texts)
    assert text == choice.message.content


@pytest.mark.parametrize("chat", [False, True])
def test_stop_strings_leave_no_stop_text_or_stop_token(client, engine, chat):
    def ask(**kw):
        if chat:
            out = client.chat.completions.create(model="tiny", messages=USER, temperature=0, logprobs=True, **kw)
            c = out.choices[0]
            return c.message.content, [e.token for e in c.logprobs.content], c.finish_reason
        out = client.completions.create(model="tiny", prompt=PROMPT, temperature=0, logprobs=1, **kw)
        c = out.choices[0]
        return c.text, c.logprobs.tokens, c.finish_reason

    full, _, _ = ask(max_tokens=24)
    assert len(full) >= 6, full
    stop = full[len(full) // 2 : len(full) // 2 + 2]  # a stop string from the middle of the greedy text
    text, tokens, finish = ask(max_tokens=24, stop=[stop, "never-generated"])
    assert text == full[: full.index(stop)] and stop not in text and finish == "stop"
    assert special_free(engine, text)
    assert len("".join(tokens)) <= len(text) and text.startswith("".join(tokens))  # no token of the stop string


def test_special_token_text_is_cut_from_the_text(engine):
    """A model may spell a special token out byte by byte: the text ends before it (as at a stop string)."""
    tok = engine.tokenizer
    ids = tok.encode(" red cat", add_special_tokens=False)
    spelled = tok.encode(" <|", add_special_tokens=False) + tok.encode("eos|> dog", add_special_tokens=False)
    assert tok.decode(ids + spelled, skip_special_tokens=True) == " red cat <|eos|> dog"
    job = engine.job([1], 64, 0.0, 1.0, 0, None, [])
    job.new = ids + spelled
    out = engine.finish(job)
    assert out["text"] == " red cat " and out["finish_reason"] == "stop"
    assert out["ids"] == job.new[: len(out["ids"])] and len(out["ids"]) >= len(ids)  # no token of "<|eos|>"
    assert tok.decode(out["ids"]) == out["text"] and out["offsets"][-1] <= len(out["text"])


def test_a_generated_eos_is_a_token_but_never_text(tiny_model_dir, tiny_tokenizer):
    engine = ServeEngine.load(tiny_model_dir, name="eos", device="cpu")
    boost = torch.zeros(engine.model.config.vocab_size)
    boost[tiny_tokenizer.eos_token_id] = 1e4
    engine.model.get_output_embeddings().register_forward_hook(lambda m, a, logits: logits + boost.to(logits.dtype))
    server, _, url = start_server(engine=engine)
    try:
        client = openai.OpenAI(base_url=url, api_key="x", max_retries=0)
        out = client.chat.completions.create(model="eos", messages=USER, max_tokens=4, logprobs=True, top_logprobs=1)
        c = out.choices[0]
        assert c.message.content == "" and c.finish_reason == "stop"
        assert [e.token for e in c.logprobs.content] == [tiny_tokenizer.eos_token]
        out = client.completions.create(model="eos", prompt=PROMPT, max_tokens=4, logprobs=1)
        c = out.choices[0]
        assert c.text == "" and c.logprobs.tokens == [tiny_tokenizer.eos_token] and c.logprobs.text_offset == [0]
    finally:
        server.shutdown()
        server.server_close()


def test_n_choices_are_indexed_and_seeded(client):
    kw = {"model": "tiny", "max_tokens": 10, "temperature": 1.0, "seed": 11, "n": 2}
    a = client.completions.create(prompt=PROMPT, **kw)
    b = client.completions.create(prompt=PROMPT, **kw)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # seeded: each choice repeats
    one = client.completions.create(prompt=PROMPT, **{**kw, "n": 1, "seed": 12})
    assert one.choices[0].text == a.choices[1].text  # choice j samples with seed + j
    two = client.completions.create(prompt=[PROMPT, "red"], **kw)
    assert [c.index for c in two.choices] == [0, 1, 2, 3]
    assert [c.text for c in two.choices[:2]] == [c.text for c in a.choices]

    chat = client.chat.completions.create(messages=USER, **kw)
    again = client.chat.completions.create(messages=USER, **kw)
    assert [c.index for c in chat.choices] == [0, 1]
    assert [c.message.content for c in chat.choices] == [c.message.content for c in again.choices]


def test_streamed_completions_reassemble_the_text(client):
    kw = {"model": "tiny", "prompt": PROMPT, "max_tokens": 16, "temperature": 0, "logprobs": 2}
    whole = client.completions.create(**kw)
    parts, finish, usage = {}, {}, None
    for chunk in client.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        usage = chunk.usage or usage
        for c in chunk.choices:
            parts[c.index] = parts.get(c.index, "") + c.text
            finish[c.index] = c.finish_reason or finish.get(c.index)
    assert parts == {0: whole.choices[0].text} and finish == {0: whole.choices[0].finish_reason}
    assert usage.completion_tokens == whole.usage.completion_tokens


def test_streamed_chat_reassembles_the_content(client):
    kw = {"model": "tiny", "messages": USER, "max_tokens": 16, "temperature": 0.7, "seed": 3, "n": 2}
    whole = client.chat.completions.create(**kw)
    parts, finish = {}, {}
    for chunk in client.chat.completions.create(stream=True, **kw):
        assert chunk.object == "chat.completion.chunk"
        for c in chunk.choices:
            parts[c.index] = parts.get(c.index, "") + (c.delta.content or "")
            finish[c.index] = c.finish_reason or finish.get(c.index)
    assert parts == {c.index: c.message.content for c in whole.choices}
    assert finish == {c.index: c.finish_reason for c in whole.choices}


def test_a_stream_ends_with_done(base):
    host, port = base.removeprefix("http://").removesuffix("/v1").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    body = {"model": "tiny", "prompt": "red", "max_tokens": 3, "temperature": 0, "stream": True}
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    raw = resp.read().decode()
    conn.close()
    assert resp.status == 200 and resp.getheader("Content-Type") == "text/event-stream"
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[-2].removeprefix("data: "))["choices"][0]["finish_reason"] in ("stop", "length")


def test_text_parts_and_null_assistant_content(client):
    def greedy(messages):
        out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
        return out.choices[0].message.content

    parts = [
        {"role": "user", "content": [{"type": "text", "text": "what colour "}, {"type": "text", "text": "is the cat"}]}
    ]
    assert greedy(parts) == greedy(USER)
    turns = [*USER, {"role": "assistant", "content": None}, {"role": "user", "content": "and the dog"}]
    empty = [*USER, {"role": "assistant", "content": ""}, {"role": "user", "content": "and the dog"}]
    assert greedy(turns) == greedy(empty)
    with pytest.raises(openai.BadRequestError, match="text part"):
        greedy([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}])


TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}


@pytest.mark.parametrize(
    "field, value",
    [
        ("tools", [TOOL]),
        ("tool_choice", "required"),
        ("response_format", {"type": "json_object"}),
        ("logit_bias", {"5": 10}),
        ("presence_penalty", 0.5),
        ("frequency_penalty", -0.5),
    ],
)
def test_unsupported_fields_are_400s_naming_the_field(client, field, value):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=USER, max_tokens=2, **{field: value})
    assert e.value.status_code == 400 and field in str(e.value) and e.value.param == field
    if field.endswith("penalty") or field == "logit_bias":
        with pytest.raises(openai.BadRequestError, match=field):
            client.completions.create(model="tiny", prompt="red", max_tokens=2, **{field: value})


def test_no_op_values_of_unsupported_fields_are_accepted(client):
    out = client.chat.completions.create(
        model="tiny", messages=USER, max_tokens=2, presence_penalty=0, frequency_penalty=0.0, logit_bias={}
    )
    assert out.choices[0].finish_reason in ("stop", "length")


def test_concurrent_clients_are_batched_with_independent_answers(client, engine):
    """16 clients at once: each gets its own answer, the same as alone (greedy: batched; seeded sampling: run alone)."""
    prompts = [f"{w} is the" for w in "red blue green cat dog fish apple pear plum paris rome oslo".split()]
    requests = [{"prompt": p, "temperature": 0} for p in prompts] + [
        {"prompt": p, "temperature": 1.0, "seed": i} for i, p in enumerate(prompts[:4])
    ]

    def ask(req):
        out = client.completions.create(model="tiny", max_tokens=8, logprobs=1, **req)
        return out.choices[0].text, out.choices[0].logprobs.token_logprobs

    alone = [ask(r) for r in requests]
    before = engine.batches
    with engine.lock:  # hold the model until every request is waiting: they run together
        with ThreadPoolExecutor(len(requests)) as pool:
            futures = [pool.submit(ask, r) for r in requests]
            deadline = time.time() + 60
            while engine._queue.qsize() < len(requests) - 1 and time.time() < deadline:
                time.sleep(0.01)
            engine.lock.release()
            try:
                together = [f.result(timeout=120) for f in futures]
            finally:
                engine.lock.acquire()
    for (text_a, lp_a), (text_b, lp_b) in zip(alone, together):
        assert text_a == text_b
        torch.testing.assert_close(torch.tensor(lp_a), torch.tensor(lp_b), atol=1e-4, rtol=1e-4)
    # greedy requests share a batch or two; the 4 seeded ones run alone
    assert engine.batches - before <= 4 + 3, engine.batches - before


def test_threads_share_one_engine_across_servers(engine):
    """Two servers over one engine (as test fixtures do) share its model thread."""
    servers = [start_server(engine=engine) for _ in range(2)]
    try:
        outs = []

        def go(url):
            c = openai.OpenAI(base_url=url, api_key="x", max_retries=0)
            outs.append(c.completions.create(model="tiny", prompt="red", max_tokens=3, temperature=0).choices[0].text)

        threads = [threading.Thread(target=go, args=(url,)) for _, _, url in servers]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(outs) == 2 and outs[0] == outs[1]
    finally:
        for srv, _, _ in servers:
            srv.shutdown()
            srv.server_close()


def test_job_rows_are_independent(engine):
    """A _Job is one sequence; the model thread fills new ids for each."""
    jobs = [_Job([1, 5, 6], 3, 0.0, 0, 1.0, None, [], False), _Job([1, 7], 3, 0.0, 0, 1.0, None, [], False)]
    outs = engine.generate(jobs)
    assert [len(o["ids"]) <= 3 for o in outs] == [True, True]
