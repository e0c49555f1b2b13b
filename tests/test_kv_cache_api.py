"""The KV cache through the current transformers API: no deprecated `past_key_values` (removed in 5.40), and the
cached forward pass gives the logits of a full forward pass, on Llama, GPT-2 and Qwen2 models."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from rlxf.backends.local import LocalBackend
from rlxf.hf import forward_with_cache, load_tokenizer
from rlxf.sampling import GenerationSettings, generate


def _model(kind: str, vocab: int) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "llama":
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
        return LlamaForCausalLM(cfg).eval()
    if kind == "gpt2":  # learned positions
        return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2, n_head=4)).eval()
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    return Qwen2ForCausalLM(cfg).eval()


@pytest.mark.parametrize("kind", ["llama", "gpt2", "qwen2"])
def test_cached_steps_match_a_full_forward(kind):
    model = _model(kind, 40)
    ids = torch.randint(3, 40, (2, 7))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*past_key_values.*")
        full = model(input_ids=ids).logits  # (2, 7, V)
        out, cache = forward_with_cache(model, None, input_ids=ids[:, :4])
        steps = [out.logits]
        for t in range(4, 7):
            out, cache = forward_with_cache(model, cache, input_ids=ids[:, t : t + 1])
            steps.append(out.logits)
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)


def test_sampling_and_local_backend_use_no_deprecated_cache_argument(tiny_model_dir):
    """Fails on transformers >= 5.25 if any generation path still passes `past_key_values`."""
    tok = load_tokenizer(tiny_model_dir)
    model = LlamaForCausalLM.from_pretrained(tiny_model_dir).eval()
    prompts = [tok("red blue", add_special_tokens=True)["input_ids"], tok("cat", add_special_tokens=True)["input_ids"]]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*past_key_values.*")
        warnings.filterwarnings("error", message=".*cache_params.*")
        samples = generate(model, prompts, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, n=2,
                           settings=GenerationSettings(max_new_tokens=5))  # fmt: skip
        backend = LocalBackend(model, tok)
        greedy = backend.generate_greedy(["red blue"], 4)
    assert len(samples) == 2 and all(len(group) == 2 for group in samples)
    assert len(greedy) == 1
