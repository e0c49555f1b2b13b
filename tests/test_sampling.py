import torch

from rlxf.models.tiny import TinyModelConfig, build_tiny_model
from rlxf.sampling import GenerationSettings, decode_samples, generate


def model_with_bias(tokenizer, favoured: int | None = None, banned: int | None = None):
    """A tiny Llama whose output layer has a bias, so the next-token choice can be forced."""
    model = build_tiny_model(tokenizer, TinyModelConfig(hidden_size=32, intermediate_size=64)).eval()
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    head.weight.data.zero_()
    head.bias.data.zero_()
    if favoured is not None:
        head.bias.data[favoured] = 20.0
    if banned is not None:
        head.bias.data[banned] = -1e9
    model.lm_head = head
    return model


def prompts(tok):
    return [
        tok("red cat is")["input_ids"],
        tok("the colour of apple pear plum is a")["input_ids"],
        tok("dog")["input_ids"],
    ]


def test_greedy_batch_equals_one_at_a_time(tiny_tokenizer):
    # Left padding must not change what a prompt generates: batched and single greedy outputs agree.
    model = build_tiny_model(tiny_tokenizer, TinyModelConfig(hidden_size=32, intermediate_size=64)).eval()
    kw = dict(eos_token_id=tiny_tokenizer.eos_token_id, pad_token_id=tiny_tokenizer.pad_token_id)
    settings = GenerationSettings(max_new_tokens=6, temperature=0)
    batched = generate(model, prompts(tiny_tokenizer), settings=settings, **kw)
    for i, p in enumerate(prompts(tiny_tokenizer)):
        alone = generate(model, [p], settings=settings, **kw)
        assert alone[0][0].response_ids == batched[i][0].response_ids


def test_sampling_is_reproducible_from_the_seed(tiny_tokenizer):
    model = build_tiny_model(tiny_tokenizer, TinyModelConfig(hidden_size=32, intermediate_size=64)).eval()
    kw = dict(eos_token_id=tiny_tokenizer.eos_token_id, pad_token_id=tiny_tokenizer.pad_token_id, n=3)
    settings = GenerationSettings(max_new_tokens=8, temperature=1.0, top_p=0.9)
    ids = lambda out: [[s.response_ids for s in group] for group in out]
    a = generate(model, prompts(tiny_tokenizer), settings=settings, seed=7, **kw)
    b = generate(model, prompts(tiny_tokenizer), settings=settings, seed=7, **kw)
    c = generate(model, prompts(tiny_tokenizer), settings=settings, seed=8, **kw)
    assert ids(a) == ids(b) and ids(a) != ids(c)
    assert [len(group) for group in a] == [3, 3, 3] and all(s.prompt_index == i for i, g in enumerate(a) for s in g)


def test_generation_stops_at_eos(tiny_tokenizer):
    eos = tiny_tokenizer.eos_token_id
    kw = dict(
        eos_token_id=eos, pad_token_id=tiny_tokenizer.pad_token_id, settings=GenerationSettings(max_new_tokens=5)
    )
    stops = generate(model_with_bias(tiny_tokenizer, favoured=eos), prompts(tiny_tokenizer), **kw)
    assert all(s.response_ids == [eos] and s.finished for g in stops for s in g)
    assert decode_samples(tiny_tokenizer, stops)[0] == [""]
    never = generate(model_with_bias(tiny_tokenizer, banned=eos), prompts(tiny_tokenizer), **kw)
    assert all(len(s.response_ids) == 5 and not s.finished and eos not in s.response_ids for g in never for s in g)


def test_sampled_logprobs_equal_a_forward_pass_with_left_padding(tiny_tokenizer):
    # The sampler's own KV-cache loop returns log π(y_t); a plain forward over prompt + response must agree, for
    # prompts of different lengths in one left-padded batch.
    from rlxf.logprobs import token_logprobs

    model = build_tiny_model(tiny_tokenizer, TinyModelConfig(hidden_size=32, intermediate_size=64)).eval()
    eos, pad_id = tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id
    out = generate(model, prompts(tiny_tokenizer), eos_token_id=eos, pad_token_id=pad_id, n=2, seed=3,
                   settings=GenerationSettings(max_new_tokens=6, temperature=0.7), return_logprobs=True)  # fmt: skip
    for prompt, group in zip(prompts(tiny_tokenizer), out):
        for s in group:
            ids = torch.tensor([prompt + s.response_ids])
            with torch.no_grad():
                logits = model(input_ids=ids).logits[:, len(prompt) - 1 : -1]  # positions predicting the response
            expected = token_logprobs(logits, torch.tensor([s.response_ids]))[0]
            torch.testing.assert_close(torch.tensor(s.logprobs), expected, rtol=1e-4, atol=1e-5)
