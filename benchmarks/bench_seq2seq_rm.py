"""Seq2seq RM reward extraction vs a scalar (Bradley–Terry) RM forward: same backbone, same batch of responses.

    .venv/bin/python benchmarks/bench_seq2seq_rm.py --batch-size 16 --prompt-len 64 --response-len 64 --repeats 5

Both sides are rlxf reward sources called as an RL trainer calls them, `source(prompt_rows, response_ids, texts,
tokenizer)`, on the same random prompts and responses (ids drawn from the tokenizer's vocabulary, every response
finished with EOS):
- scalar: `RewardModelSource(rm:DIR)`, one forward pass over prompt + response (B rows);
- seq2seq: `Seq2SeqRewardSource(seq2seq:DIR)`, one teacher-forced pass over prompt + D1 + response + D2 + response
  (docs/methods/seq2seq_rm.md §2.4), the LM head on the response positions only.
The two models share the backbone's weights (a tiny Llama, built locally; the scalar RM adds its score head, the
seq2seq RM its LM head). Each side is timed `--repeats` times after one warm-up call; the median is reported, with
the ratio seq2seq / scalar (the issue's target: ≤ 1.2×) and tokens per second: response tokens scored per second
and model tokens processed per second. The seq2seq pass reads about |x| + 2|y| tokens against |x| + |y|, so the ratio
grows with the response's share of the sequence; `--prompt-len` and `--response-len` show it.
Results go to stdout as a Markdown table and to `--out` as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch


def build_models(tmp: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    from transformers import AutoModelForSequenceClassification, LlamaConfig, LlamaForCausalLM

    from rlxf.models.tiny import train_tokenizer
    from rlxf.rewards.seq2seq import CONFIG_KEY, Seq2SeqTemplate

    words = "red blue green cat dog fish apple pear plum paris rome oslo the is of and a what colour city pet".split()
    corpus = [" ".join(words[(i * 7 + j) % len(words)] for j in range(12)) for i in range(300)]
    tok = train_tokenizer(corpus, vocab_size=args.vocab_size)
    config = LlamaConfig(
        vocab_size=max(len(tok), args.vocab_size), hidden_size=args.hidden, intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        max_position_embeddings=4096, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    lm = LlamaForCausalLM(config)
    setattr(lm.config, CONFIG_KEY, Seq2SeqTemplate.for_tokenizer(tok, t_ref=args.response_len).to_dict())
    seq2seq_dir, scalar_dir = tmp / "seq2seq", tmp / "scalar"
    lm.save_pretrained(seq2seq_dir)
    tok.save_pretrained(seq2seq_dir)
    config.num_labels = 1
    scalar = AutoModelForSequenceClassification.from_config(config)
    scalar.model.load_state_dict(lm.model.state_dict())  # the same backbone
    scalar.save_pretrained(scalar_dir)
    tok.save_pretrained(scalar_dir)
    return seq2seq_dir, scalar_dir


def batch(tok, args: argparse.Namespace):
    g = torch.Generator().manual_seed(1)
    low = max(s for s in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) if s is not None) + 1
    high = len(tok)
    rows, ids = [], []
    for _ in range(args.batch_size):
        prompt = [tok.bos_token_id, *torch.randint(low, high, (args.prompt_len - 1,), generator=g).tolist()]
        rows.append({"prompt": "", "prompt_ids": prompt})
        ids.append([*torch.randint(low, high, (args.response_len - 1,), generator=g).tolist(), tok.eos_token_id])
    texts = [tok.decode(r, skip_special_tokens=True) for r in ids]
    return rows, ids, texts


def timed(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=16, help="responses per reward call (default 16)")
    parser.add_argument("--prompt-len", type=int, default=64, help="prompt tokens, BOS included (default 64)")
    parser.add_argument("--response-len", type=int, default=64, help="response tokens, EOS included (default 64)")
    parser.add_argument("--hidden", type=int, default=256, help="hidden size of the tiny Llama (default 256)")
    parser.add_argument("--layers", type=int, default=4, help="layers (default 4)")
    parser.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    parser.add_argument("--vocab-size", type=int, default=32000, help="LM-head rows, as a real tokenizer's (32000)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per side; the median is reported (5)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--out", default="benchmarks/results/seq2seq_rm.json", help="JSON results file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from rlxf.hf import load_tokenizer
    from rlxf.rewards.seq2seq import Seq2SeqRewardSource
    from rlxf.rewards.sources import RewardModelSource

    with tempfile.TemporaryDirectory() as tmp:
        seq2seq_dir, scalar_dir = build_models(Path(tmp), args)
        tok = load_tokenizer(seq2seq_dir)
        rows, ids, texts = batch(tok, args)
        scalar = RewardModelSource(scalar_dir, device=args.device, batch_size=args.batch_size)
        seq2seq = Seq2SeqRewardSource(seq2seq_dir, device=args.device, batch_size=args.batch_size)
        with torch.no_grad():
            t_scalar = statistics.median(timed(lambda: scalar(rows, ids, texts, tok), args.repeats))
            t_seq2seq = statistics.median(timed(lambda: seq2seq(rows, ids, texts, tok), args.repeats))
        template = seq2seq.template
    response_tokens = sum(len(r) for r in ids)
    scalar_tokens = sum(len(r["prompt_ids"]) + len(r_ids) for r, r_ids in zip(rows, ids))
    extra = len(template.review_ids) + len(template.revised_ids)
    seq2seq_tokens = sum(len(r["prompt_ids"]) + extra + 2 * len(r_ids) - 2 for r, r_ids in zip(rows, ids))
    result = {
        "settings": vars(args),
        "scalar_s": t_scalar,
        "seq2seq_s": t_seq2seq,
        "ratio": t_seq2seq / t_scalar,
        "scalar_response_tokens_per_s": response_tokens / t_scalar,
        "seq2seq_response_tokens_per_s": response_tokens / t_seq2seq,
        "scalar_model_tokens_per_s": scalar_tokens / t_scalar,
        "seq2seq_model_tokens_per_s": seq2seq_tokens / t_seq2seq,
        "scalar_model_tokens": scalar_tokens,
        "seq2seq_model_tokens": seq2seq_tokens,
        "torch": torch.__version__,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print("| side | median s per call | response tokens/s | model tokens/s | model tokens |")
    print("|---|---:|---:|---:|---:|")
    for side in ("scalar", "seq2seq"):
        print(f"| {side} | {result[f'{side}_s']:.4f} | {result[f'{side}_response_tokens_per_s']:,.0f} | "
              f"{result[f'{side}_model_tokens_per_s']:,.0f} | {result[f'{side}_model_tokens']:,} |")  # fmt: skip
    print(f"\nseq2seq / scalar time: {result['ratio']:.2f}x (target <= 1.2x)")


if __name__ == "__main__":
    main()
