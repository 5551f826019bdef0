"""`mlxlora serve` under load and abuse, on 127.0.0.1 only, bounded in count and time: concurrent clients of
mixed lengths (some leave early), capped max_tokens, time-outs, hostile bodies, and Ctrl-C mid-generation."""

import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlx.core as mx
import pytest

import tiny
from mlxlora import LoraConfig
from mlxlora.commands.serve import load_engine
from mlxlora.serve.server import ServeConfig, make_server, serve_forever

PROMPT = "Once upon a time"
CLIENTS = 50


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-load")
    src = tiny.make_model(root / "tinyllama", "llama")
    ad = tiny.make_adapter(src, root / "a", LoraConfig(r=4, lora_alpha=16), seed=3, size=0.2)
    return src, ad


def start(src, ad, **settings):
    engine = load_engine(str(src), {"a": str(ad)}, settings=ServeConfig(port=0, **settings))
    srv = make_server(engine, ServeConfig(port=0, **settings))
    thread = threading.Thread(target=serve_forever, args=(srv,), daemon=True)
    thread.start()
    return srv, thread, engine


@pytest.fixture(scope="module")
def server(setup):
    src, ad = setup
    srv, thread, engine = start(src, ad, workers=16, backlog=64, max_pending=32, max_batch=8, max_tokens_limit=64)
    yield srv.server_address[1], engine
    srv.shutdown()
    thread.join(timeout=60)
    assert not thread.is_alive()


def post(port, body: dict | bytes, path="/v1/completions", timeout=120):
    """(status, parsed JSON or the list of SSE events) of one POST."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn.request("POST", path, raw, {"Content-Type": "application/json"})
    r = conn.getresponse()
    text = r.read().decode()
    conn.close()
    if r.getheader("Content-Type") == "text/event-stream":
        return r.status, [json.loads(b[6:]) for b in text.strip().split("\n\n") if b != "data: [DONE]"]
    return r.status, json.loads(text)


def raw_request(port, data: bytes) -> tuple[int, dict]:
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)  # the body ends here, whatever Content-Length said
        chunks = []
        while True:
            c = s.recv(65536)
            if not c:
                break
            chunks.append(c)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def greedy(port, max_tokens=16, model="a"):
    return post(port, {"model": model, "prompt": PROMPT, "max_tokens": max_tokens})


def test_max_tokens_is_capped_by_the_server_limit_and_the_context(server):
    port, engine = server
    status, body = greedy(port, max_tokens=10**12)
    assert status == 200 and body["usage"]["completion_tokens"] <= 64  # --max-tokens-limit 64
    long_prompt = "x" * 600  # byte-level tokenizer: 600 tokens, over the 512-token context
    status, body = post(port, {"prompt": long_prompt, "max_tokens": 4})
    assert status == 400 and "context length is 512" in body["error"]["message"]
    status, body = post(port, {"prompt": "y" * 500, "max_tokens": 60})  # 12 tokens of room left
    assert status == 200 and body["usage"]["completion_tokens"] <= 512 - body["usage"]["prompt_tokens"]


@pytest.mark.parametrize("data,status,needle", [
    (b"POST /v1/completions HTTP/1.0\r\nContent-Length: -5\r\n\r\n", 400, "negative"),
    (b"POST /v1/completions HTTP/1.0\r\nContent-Length: abc\r\n\r\n", 411, "Content-Length"),
    (b"POST /v1/completions HTTP/1.0\r\nContent-Length: 50\r\n\r\n{\"prompt\": 1", 400, "ended after"),
])
def test_bad_content_lengths_are_4xx(server, data, status, needle):
    port, _ = server
    got, body = raw_request(port, data)
    assert got == status and needle in body["error"]["message"]


def test_hostile_bodies_are_400_and_the_server_keeps_serving(server):
    port, engine = server
    _, want = greedy(port)
    deep = b'{"prompt": "hi", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    for raw, needle in ((deep, "nested"), (b'{"prompt": "hi", "temperature": NaN}', "NaN"),
                        (b'{"prompt": "hi", "top_p": Infinity}', "Infinity"),
                        (b'{"prompt": "hi", "temperature": 1e400}', "finite")):
        status, body = post(port, raw)
        assert status == 400 and needle in body["error"]["message"], body
    status, body = post(port, {"messages": [{"role": "wizard", "content": "hi"}]}, "/v1/chat/completions")
    assert status == 400 and "unknown role 'wizard'" in body["error"]["message"]
    assert greedy(port)[1]["choices"] == want["choices"]


def test_a_short_request_is_not_blocked_by_a_long_one(server):
    port, engine = server
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("POST", "/v1/completions", json.dumps({"prompt": PROMPT, "max_tokens": 64, "stream": True}),
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.readline().startswith(b"data: ")  # the long one is generating
    status, body = greedy(port, max_tokens=2)
    long_text = resp.read().decode()  # the long stream is still open: it ends after the short one was answered
    conn.close()
    assert status == 200 and body["usage"]["completion_tokens"] <= 2
    assert long_text.rstrip().endswith("data: [DONE]")


def _client(port, kind: str, max_tokens: int, results: list, i: int):
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        body = {"model": "a" if i % 2 else None, "prompt": f"{PROMPT} {i}", "max_tokens": max_tokens,
                "stream": kind in ("stream", "leave-stream")}
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        if kind == "leave":  # gone before the answer
            time.sleep(0.05)
            conn.sock.shutdown(socket.SHUT_RDWR)
            conn.close()
            results[i] = ("left", None)
            return
        r = conn.getresponse()
        if kind == "leave-stream" and r.status == 200:
            r.readline()
            conn.close()
            results[i] = ("left", None)
            return
        text = r.read().decode()
        conn.close()
        if r.status == 200 and body["stream"]:
            events = [json.loads(b[6:]) for b in text.strip().split("\n\n") if b != "data: [DONE]"]
            results[i] = (200, sum(1 for e in events if e["choices"] and e["choices"][0]["text"]))
        else:
            results[i] = (r.status, json.loads(text))
    except Exception as e:  # a reset, a time-out: reported by the test
        results[i] = ("error", repr(e))


def _load(port, seed: int) -> list:
    rng = random.Random(seed)
    kinds = ["plain"] * 5 + ["stream"] * 2 + ["leave", "leave-stream"]
    jobs = [(rng.choice(kinds), rng.choice([4, 8, 16, 32, 48])) for _ in range(CLIENTS)]
    jobs = [(k, 64 if k.startswith("leave") else n) for k, n in jobs]
    results = [None] * CLIENTS
    threads = [threading.Thread(target=_client, args=(port, k, n, results, i)) for i, (k, n) in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads)
    return results


def test_fifty_concurrent_clients_are_all_answered_or_refused_and_nothing_grows(server):
    port, engine = server
    _, want = greedy(port)
    rounds, threads_after, memory_after = [], [], []
    for seed in (1, 2):
        results = _load(port, seed)
        t0 = time.monotonic()
        while engine.pending and time.monotonic() - t0 < 120:  # cancelled rows leave at the next step
            time.sleep(0.05)
        assert engine.pending == 0
        rounds.append(results)
        threads_after.append(threading.active_count())
        mx.clear_cache()
        memory_after.append(mx.get_active_memory())
    for results in rounds:
        assert not [r for r in results if r[0] == "error"], results
        statuses = {r[0] for r in results}
        assert statuses <= {200, 503, "left"} and 200 in statuses
        for r in results:
            if r[0] == 503:
                assert "busy" in r[1]["error"]["message"]
            elif r[0] == 200 and isinstance(r[1], dict):
                assert r[1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert engine.stats["cancelled"] >= 1  # clients that left had their rows freed
    assert threads_after[1] <= threads_after[0]  # a fixed pool: the second round starts no new thread
    assert memory_after[1] <= memory_after[0] + 8 * 2**20  # KV caches are freed when rows leave
    assert greedy(port)[1]["choices"] == want["choices"]  # still answering, and the same text


def test_a_request_past_its_time_limit_gets_504(setup):
    src, ad = setup
    srv, thread, engine = start(src, ad, request_timeout=1e-6)
    try:
        status, body = greedy(srv.server_address[1], max_tokens=32)
        assert status == 504 and "--request-timeout" in body["error"]["message"]
        assert engine.stats["timed_out"] == 1
    finally:
        srv.shutdown()
        thread.join(timeout=60)


def test_ctrl_c_during_a_generation_stops_the_server_cleanly(setup):
    src, ad = setup
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), MLXLORA_BLAS_ACTIVE="1")
    proc = subprocess.Popen([sys.executable, "-m", "mlxlora", "serve", "--model", str(src), "--port", "0", "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        port = int(line.split("127.0.0.1:")[1].split("/")[0])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("POST", "/v1/completions", json.dumps({"prompt": PROMPT, "max_tokens": 400, "stream": True}),
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200 and resp.readline().startswith(b"data: ")
        proc.send_signal(signal.SIGINT)
        rest = resp.read().decode()  # the stream ends (an error event, or the end of the answer)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert "terminate called" not in err and "Traceback" not in err, err
        assert "stopped" in err and ("shutting down" in rest or "[DONE]" in rest), rest[-500:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_full_server_answers_503_at_once(setup):
    src, ad = setup
    srv, thread, engine = start(src, ad, max_pending=1)
    port = srv.server_address[1]
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        conn.request("POST", "/v1/completions", json.dumps({"prompt": PROMPT, "max_tokens": 200, "stream": True}),
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.readline().startswith(b"data: ")  # the one slot is taken
        status, body = greedy(port, max_tokens=2)
        assert status == 503 and "--max-pending 1" in body["error"]["message"]
        conn.close()  # the long one leaves; its slot frees at the next step
        t0 = time.monotonic()
        while engine.pending and time.monotonic() - t0 < 60:
            time.sleep(0.05)
        assert greedy(port, max_tokens=2)[0] == 200
    finally:
        srv.shutdown()
        thread.join(timeout=60)
