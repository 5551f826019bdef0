"""The OpenAI-compatible server and the chat REPL, over real HTTP and stdin, against direct generation."""

import json
import os
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner

import tiny
from mlxlora import LoraConfig
from mlxlora.cli import cli
from mlxlora.commands.serve import load_engine
from mlxlora.inference import load_with_adapter
from mlxlora.serve.server import ServeConfig, StopText, make_server, serve_forever

MAX_TOKENS = 16
CHAT = [{"role": "user", "content": "Hello there"}]
PROMPT = "Once upon a time"
ADAPTERS = {
    "a": LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "b": LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"),
    "c": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], use_dora=True),
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    src = tiny.make_model(root / "tinyllama", "llama")
    dirs = {n: tiny.make_adapter(src, root / n, cfg, seed, size=0.2) for seed, (n, cfg) in enumerate(ADAPTERS.items(), start=3)}
    return src, dirs


def direct(src, adapter_dir, prompt, messages=None, max_tokens=MAX_TOKENS) -> dict:
    """Greedy generation on a fresh base with one adapter loaded the ordinary way (no server, no multi)."""
    from mlx_lm import stream_generate

    base = load_with_adapter(str(src), str(adapter_dir) if adapter_dir else None)
    if messages is not None:
        prompt = base.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    out = list(stream_generate(base.model, base.tokenizer, prompt, max_tokens=max_tokens))
    last = out[-1]
    return {"text": "".join(r.text for r in out), "finish": last.finish_reason, "prompt_tokens": last.prompt_tokens,
            "completion_tokens": last.generation_tokens - (last.finish_reason == "stop")}


@pytest.fixture(scope="module")
def reference(setup):
    """model name -> {"chat": ..., "text": ...} direct greedy results."""
    src, dirs = setup
    ref = {}
    for name in ["tinyllama", *dirs]:
        d = dirs.get(name)
        ref[name] = {"chat": direct(src, d, None, CHAT), "text": direct(src, d, PROMPT)}
    return ref


@pytest.fixture(scope="module")
def server(setup):
    src, dirs = setup
    engine = load_engine(str(src), {n: str(d) for n, d in dirs.items()})
    srv = make_server(engine, ServeConfig(port=0, max_request_bytes=20_000))
    thread = threading.Thread(target=serve_forever, args=(srv,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    thread.join(timeout=30)


def request(url, path, body=None, raw: bytes | None = None):
    """(status, parsed JSON or the SSE events, or text) of one HTTP request."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            status, ctype, text = r.status, r.headers["Content-Type"], r.read().decode()
    except urllib.error.HTTPError as e:
        status, ctype, text = e.code, e.headers["Content-Type"], e.read().decode()
    if ctype == "text/event-stream":
        return status, events(text)
    return status, json.loads(text)


def events(text: str) -> list:
    """Parse server-sent events: every one is `data: ...` + a blank line; the last is [DONE]."""
    assert text.endswith("\n\n")
    blocks = text[:-2].split("\n\n")
    assert all(b.startswith("data: ") for b in blocks)
    assert blocks[-1] == "data: [DONE]"
    return [json.loads(b[len("data: "):]) for b in blocks[:-1]]


def chat(url, model, **kw):
    return request(url, "/v1/chat/completions", {"model": model, "messages": CHAT, "max_tokens": MAX_TOKENS, **kw})


def completion(url, model, **kw):
    return request(url, "/v1/completions", {"model": model, "prompt": PROMPT, "max_tokens": MAX_TOKENS, **kw})


def test_models_lists_base_and_adapters(server):
    status, body = request(server, "/v1/models")
    assert status == 200 and body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["tinyllama", "a", "b", "c"]
    assert [m["parent"] for m in body["data"]] == [None, "tinyllama", "tinyllama", "tinyllama"]


def test_model_field_picks_the_adapter(server, reference):
    texts = {}
    for name in ["tinyllama", "a", "b", "c"]:
        status, body = chat(server, name)
        want = reference[name]["chat"]
        assert status == 200 and body["object"] == "chat.completion" and body["model"] == name
        choice = body["choices"][0]
        assert choice["message"] == {"role": "assistant", "content": want["text"]}
        assert choice["finish_reason"] == want["finish"]
        assert body["usage"] == {"prompt_tokens": want["prompt_tokens"], "completion_tokens": want["completion_tokens"],
                                 "total_tokens": want["prompt_tokens"] + want["completion_tokens"]}
        texts[name] = choice["message"]["content"]
    print({k: v[:24] for k, v in texts.items()})
    assert len(set(texts.values())) == 4  # every adapter writes something else, so switching is visible
    assert chat(server, "base")[1]["choices"][0]["message"]["content"] == texts["tinyllama"]
    assert chat(server, None)[1]["choices"][0]["message"]["content"] == texts["tinyllama"]
    assert chat(server, "b", temperature=0)[1]["choices"][0]["message"]["content"] == texts["b"]


def test_completions_endpoint(server, reference):
    for name in ["tinyllama", "b"]:
        status, body = completion(server, name)
        want = reference[name]["text"]
        assert status == 200 and body["object"] == "text_completion"
        assert body["choices"][0]["text"] == want["text"]
        assert body["usage"]["prompt_tokens"] == want["prompt_tokens"]
        assert body["usage"]["completion_tokens"] == want["completion_tokens"]


def test_streaming(server, reference):
    status, chunks = chat(server, "c", stream=True, stream_options={"include_usage": True})
    want = reference["c"]["chat"]
    assert status == 200
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "c" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1]) == want["text"]
    assert len(chunks) > 3  # it really streamed piece by piece
    assert chunks[-2]["choices"][0]["finish_reason"] == want["finish"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == want["completion_tokens"]
    status, chunks = completion(server, "a", stream=True)
    assert status == 200 and chunks[-1]["choices"][0]["finish_reason"] == reference["a"]["text"]["finish"]
    assert "".join(c["choices"][0]["text"] for c in chunks) == reference["a"]["text"]["text"]


def test_concurrent_requests_equal_sequential_ones(server, reference):
    jobs = [(name, kind, stream) for name in ["tinyllama", "a", "b", "c"] for kind, stream in [("chat", False), ("text", True)]]
    results, errors = {}, []
    start = threading.Barrier(len(jobs))

    def run(job):
        name, kind, stream = job
        try:
            start.wait()
            status, body = (chat if kind == "chat" else completion)(server, name, stream=stream)
            if stream:
                results[job] = "".join(c["choices"][0]["text"] for c in body)
            else:
                results[job] = body["choices"][0]["message"]["content"]
        except Exception as e:  # reported below, in the test's thread
            errors.append(repr(e))

    threads = [threading.Thread(target=run, args=(j,)) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    for (name, kind, _), text in results.items():
        assert text == reference[name][kind]["text"], (name, kind)
    assert len(results) == len(jobs)


def test_bad_requests_get_clear_errors_and_the_server_keeps_serving(server, reference):
    status, body = request(server, "/v1/completions", {"model": "a", "prompt": "x" * 30_000})
    assert status == 413 and "over the limit of 20000 bytes" in body["error"]["message"]
    status, body = request(server, "/v1/chat/completions", raw=b"{not json")
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    status, body = request(server, "/v1/chat/completions", raw=b"[1, 2]")
    assert status == 400 and "JSON object" in body["error"]["message"]
    status, body = request(server, "/v1/chat/completions", {"model": "a"})
    assert status == 400 and body["error"]["message"].startswith("messages:")
    status, body = chat(server, "a", max_tokens="ten")
    assert status == 400 and body["error"]["message"].startswith("max_tokens:")
    status, body = chat(server, "a", temperature=-1)
    assert status == 400 and "temperature must be >= 0" in body["error"]["message"]
    status, body = chat(server, "nope")
    assert status == 404 and body["error"]["message"] == "model 'nope' is not served here; available: tinyllama, a, b, c"
    status, body = request(server, "/v1/embeddings", {"input": "x"})
    assert status == 404 and "no route" in body["error"]["message"]
    status, body = chat(server, "a")
    assert status == 200 and body["choices"][0]["message"]["content"] == reference["a"]["chat"]["text"]


def test_client_leaving_mid_stream_does_not_block_the_server(server, reference):
    import http.client

    host, port = server[len("http://"):].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request("POST", "/v1/completions", json.dumps({"model": "b", "prompt": PROMPT, "max_tokens": 400,
                                                        "stream": True}), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.readline().startswith(b"data: {")
    conn.close()  # gone before the end of the generation
    status, body = chat(server, "c")
    assert status == 200 and body["choices"][0]["message"]["content"] == reference["c"]["chat"]["text"]


def test_stop_strings_and_seeded_sampling(server, reference):
    want = reference["b"]["chat"]["text"]
    stop = want[5:7]
    status, body = chat(server, "b", stop=[stop])
    assert status == 200 and body["choices"][0]["finish_reason"] == "stop"
    assert body["choices"][0]["message"]["content"] == want[:want.find(stop)]
    _, chunks = chat(server, "b", stop=stop, stream=True)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == want[:want.find(stop)]
    one = chat(server, "a", temperature=1.0, seed=7)[1]["choices"][0]["message"]["content"]
    assert chat(server, "a", temperature=1.0, seed=7)[1]["choices"][0]["message"]["content"] == one


def test_stop_text_holds_back_a_possible_stop():
    cut = StopText(("END",))
    assert cut.feed("abcE") == "abc" and cut.feed("N") == "" and cut.feed("x") == "ENx"
    assert cut.feed("yyEND zz") == "yy" and cut.hit


def test_cli_chat_switches_adapters_and_keeps_history(setup, reference):
    src, dirs = setup
    stdin = "Hello there\n/adapters\n/adapter b\nHello there\n/adapter none\n/adapter zz\n/clear\nHello there\n/quit\n"
    args = ["chat", "--model", str(src), "--adapter", f"a={dirs['a']}", "--adapter", f"b={dirs['b']}",
            "--max-tokens", str(MAX_TOKENS)]
    result = CliRunner().invoke(cli, args, input=stdin)
    assert result.exit_code == 0, result.output
    out = result.output
    first = reference["a"]["chat"]["text"]  # starts with the first --adapter
    second = direct(src, dirs["b"], None, CHAT + [{"role": "assistant", "content": first}] + CHAT)["text"]
    third = reference["tinyllama"]["chat"]["text"]  # after /clear, on the bare base
    assert f"[a]> {first}\n" in out
    assert "* a\n" in out and "  none (the bare base)" in out
    assert f"[b]> {second}\n" in out
    assert "no adapter 'zz'; loaded: a, b" in out
    assert f"[base]> {third}\n" in out
    assert out.rstrip().endswith("bye")


def test_cli_rejects_bad_adapter_specs(setup):
    src, dirs = setup
    for spec, msg in [(f"none={dirs['a']}", "reserved"), ("=x", "write name=DIR")]:
        result = CliRunner().invoke(cli, ["chat", "--model", str(src), "--adapter", spec], input="")
        assert result.exit_code == 1 and msg in result.output
    result = CliRunner().invoke(cli, ["serve", "--model", str(src), "--adapter", f"a={dirs['a']}",
                                      "--adapter", f"a={dirs['b']}"])
    assert result.exit_code == 1 and "given twice" in result.output


def test_cli_serve_answers_over_http(setup, reference):
    src, dirs = setup
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen([sys.executable, "-m", "mlxlora", "serve", "--model", str(src), "--adapter",
                             f"a={dirs['a']}", "--port", "0", "--quiet"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving tinyllama, a at http://127.0.0.1:"), line + proc.stderr.read()
        url = line.split(" at ")[1].split("/v1")[0]
        assert [m["id"] for m in request(url, "/v1/models")[1]["data"]] == ["tinyllama", "a"]
        assert chat(url, "a")[1]["choices"][0]["message"]["content"] == reference["a"]["chat"]["text"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
