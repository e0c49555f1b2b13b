"""Requests per second of `rlxf serve` with 1, 4 and 16 concurrent clients, batched against one-at-a-time.

Each client is a thread with its own official `openai` client that sends greedy completions (a short prompt,
`max_tokens` new tokens, log-probs on) back to back for `--seconds`. The server runs in this process on loopback with
a tiny Llama built here (no download), as `rlxf serve` runs it. `--batch_size 1` is the server as it was before
batching (one request at a time on the model).

    python benchmarks/bench_serve.py                       # writes benchmarks/results/serve.md
    python benchmarks/bench_serve.py --clients 1 4 --seconds 3 --out /tmp/serve   # quicker

The prompts differ per client and request, so nothing is cached.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from any directory: import the rlxf of this checkout
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import transformers  # noqa: E402

from rlxf.backends.serve import ServeEngine, start_server  # noqa: E402
from rlxf.models.tiny import TinyModelConfig, make_tiny_model  # noqa: E402

WORDS = "red blue green cat dog fish apple pear plum paris oslo rome the of and".split()


def build_model(root: Path, hidden_size: int, layers: int) -> Path:
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(" ".join(WORDS[(i + j) % len(WORDS)] for j in range(8)) for i in range(400)))
    cfg = TinyModelConfig(corpus=str(corpus), out=str(root / "model"), vocab_size=256, hidden_size=hidden_size,
                          intermediate_size=4 * hidden_size, layers=layers)  # fmt: skip
    return make_tiny_model(cfg)


def run_clients(url: str, clients: int, seconds: float, max_tokens: int) -> dict[str, float]:
    """Requests answered per second by `clients` threads sending back to back for `seconds`."""
    from openai import OpenAI

    done, errors = [0] * clients, [0] * clients
    start = threading.Barrier(clients + 1)

    def client(i: int) -> None:
        api = OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)
        start.wait()
        end, n = time.perf_counter() + seconds, 0
        while time.perf_counter() < end:
            prompt = " ".join(WORDS[(i * 7 + n + j) % len(WORDS)] for j in range(6))
            try:
                api.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0, logprobs=5)
                done[i] += 1
            except Exception:  # counted, not fatal: a benchmark reports failures
                errors[i] += 1
            n += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    return {"clients": clients, "requests": sum(done), "errors": sum(errors), "req_per_s": sum(done) / elapsed}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16], help="concurrent clients, one run each")
    p.add_argument("--seconds", type=float, default=10.0, help="length of each run")
    p.add_argument("--max_tokens", type=int, default=8, help="new tokens per request")
    p.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 16], help="server batch sizes to compare")
    p.add_argument("--hidden_size", type=int, default=64, help="tiny Llama width")
    p.add_argument("--layers", type=int, default=2, help="tiny Llama blocks")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--out", default="benchmarks/results", help="directory for serve.md and serve.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model(Path(tmp), args.hidden_size, args.layers)
        for batch_size in args.batch_sizes:
            engine = ServeEngine.load(model_dir, name="tiny", device="cpu", batch_size=batch_size)
            server, _, url = start_server(engine=engine)
            try:
                run_clients(url, 1, 0.5, args.max_tokens)  # warm-up: first-call allocations, connection set-up
                for clients in args.clients:
                    row = {"batch_size": batch_size, **run_clients(url, clients, args.seconds, args.max_tokens)}
                    print(json.dumps(row), flush=True)
                    rows.append(row)
            finally:
                server.shutdown()
                server.server_close()

    env = (f"Python {platform.python_version()}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
           f"transformers {transformers.__version__}, {os.cpu_count()} CPUs")  # fmt: skip
    lines = [
        f"# rlxf serve: requests per second ({args.seconds:g} s per run, {args.max_tokens} new tokens, greedy, "
        "log-probs on)",
        "",
        env,
        "",
        "| clients | " + " | ".join(f"batch_size {b}" for b in args.batch_sizes) + " |",
        "|---:|" + "---:|" * len(args.batch_sizes),
    ]
    for clients in args.clients:
        cells = [next(r for r in rows if r["batch_size"] == b and r["clients"] == clients) for b in args.batch_sizes]
        lines.append(f"| {clients} | " + " | ".join(f"{c['req_per_s']:.1f}" for c in cells) + " |")
    failed = sum(r["errors"] for r in rows)
    lines += ["", f"Failed requests: {failed}."]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve.md").write_text("\n".join(lines) + "\n")
    (out / "serve.json").write_text(json.dumps({"env": env, "rows": rows}, indent=2) + "\n")
    print("\n".join(lines))
    return {"env": env, "rows": rows}


if __name__ == "__main__":
    main()
