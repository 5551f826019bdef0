"""Serving throughput: N concurrent clients against the same N requests sent one after another (sequential
serving, the anchor), on the same `mlxlora serve` server in the same run, over 127.0.0.1.

    .venv/bin/python scripts/bench_serve.py --model ~/.cache/mlxlora/smollm2-135m-instruct-q4 --clients 8

Prints generated tokens/s across clients for both and their ratio. Greedy; every request asks for the same
max_tokens with its own prompt; token counts are the server's usage.completion_tokens.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import threading
import time

from mlxlora.commands.serve import load_engine
from mlxlora.config import ServeConfig
from mlxlora.serve.server import make_server, serve_forever

PROMPTS = ["Define war.", "Write a line about rivers.", "What is a cat?", "Name three colours.",
           "Say something about the sea.", "Describe a mountain.", "What is rain?", "Tell a short joke."]


def one(port: int, prompt: str, max_tokens: int) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0}
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    r = conn.getresponse()
    out = json.loads(r.read())
    conn.close()
    assert r.status == 200, out
    return out["usage"]["completion_tokens"]


def sequential(port, prompts, max_tokens) -> tuple[int, float]:
    t0 = time.perf_counter()
    tokens = sum(one(port, p, max_tokens) for p in prompts)
    return tokens, time.perf_counter() - t0


def concurrent(port, prompts, max_tokens) -> tuple[int, float]:
    counts = [0] * len(prompts)

    def run(i):
        counts[i] = one(port, prompts[i], max_tokens)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts), time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    settings = ServeConfig(port=0, max_batch=max(args.clients, 1))
    engine = load_engine(args.model, {}, settings=settings)
    srv = make_server(engine, settings)
    thread = threading.Thread(target=serve_forever, args=(srv,), daemon=True)
    thread.start()
    port = srv.server_address[1]
    prompts = [PROMPTS[i % len(PROMPTS)] + f" ({i})" for i in range(args.clients)]
    one(port, "warm up", 8)
    seq, con = [], []
    for _ in range(args.repeats):  # alternate, so both meet the same machine load
        n, s = sequential(port, prompts, args.max_tokens)
        seq.append(n / s)
        n, s = concurrent(port, prompts, args.max_tokens)
        con.append(n / s)
    srv.shutdown()
    thread.join()
    s, c = statistics.median(seq), statistics.median(con)
    print(f"model {args.model}, {args.clients} clients x {args.max_tokens} max tokens, median of {args.repeats}")
    print(f"sequential serving: {s:.1f} tok/s (runs: {', '.join(f'{x:.1f}' for x in seq)})")
    print(f"concurrent clients: {c:.1f} tok/s (runs: {', '.join(f'{x:.1f}' for x in con)})")
    print(f"ratio concurrent / sequential: {c / s:.2f}x")


if __name__ == "__main__":
    main()
