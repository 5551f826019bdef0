"""Generation and the OpenAI request/response format behind `mlxlora serve` (no HTTP here; see mlxlora.server).

An Engine runs one generation at a time under a lock over a MultiAdapterModel, so many threads can share
one model and get exactly what they would get one after another. `parse_request` checks a request body
(raising HTTPError with the status and a message naming the field); `completion_body` / `chunk_body`
build the JSON answers.
"""

from __future__ import annotations

import json
import threading
from contextlib import closing
from dataclasses import dataclass
from typing import Iterator

import mlx.core as mx

from ..config import GenerateConfig
from ..data.chat import render_fallback_template
from ..errors import ConfigError, HTTPError, UnknownModel
from .multi import MultiAdapterModel

BASE_ALIAS = "base"


@dataclass
class Piece:
    """A piece of generated text; the last one has finish_reason "stop" or "length"."""

    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


# ---------------------------------------------------------------- generation

class Engine:
    """Generation over a MultiAdapterModel, one request at a time (a lock), so many threads can share it."""

    def __init__(self, multi: MultiAdapterModel, tokenizer, base_name: str):
        self.multi, self.tokenizer, self.base_name = multi, tokenizer, base_name
        self.lock = threading.RLock()  # tokenizer and model are used by one thread at a time
        if base_name in multi.adapters or BASE_ALIAS in multi.adapters:
            raise ConfigError(f"adapter names must differ from the base name {base_name!r} and {BASE_ALIAS!r}")

    def model_names(self) -> list[str]:
        return [self.base_name, *self.multi.adapters]

    def resolve(self, name) -> str | None:
        """The adapter a request's `model` field names (None: the base). Raises UnknownModel listing the choices."""
        if name in (None, "", self.base_name, BASE_ALIAS):
            return None
        if name in self.multi.adapters:
            return name
        raise UnknownModel(f"model {name!r} is not served here; available: {', '.join(self.model_names())}")

    def render(self, messages: list[dict]):
        """A conversation as the prompt to continue: the chat template (or mlxlora's fallback) plus the reply header.

        Raises ConfigError when the template refuses the conversation (e.g. roles out of order).
        """
        try:
            if getattr(self.tokenizer, "chat_template", None) is not None:
                return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            return render_fallback_template(messages, add_generation_prompt=True)
        except Exception as e:  # jinja's TemplateError or whatever the template raises
            raise ConfigError(f"messages: the chat template cannot render this conversation ({e})") from None

    def stream_chat(self, messages: list[dict], adapter: str | None, cfg: GenerateConfig,
                    stop: tuple[str, ...] = ()) -> Iterator[Piece]:
        """stream() for a conversation, rendered under the same lock (tokenizers are not thread-safe)."""
        with self.lock:
            yield from self.stream(self.render(messages), adapter, cfg, stop)

    def stream(self, prompt, adapter: str | None, cfg: GenerateConfig, stop: tuple[str, ...] = ()) -> Iterator[Piece]:
        """Generate from `prompt` (text or token ids) with `adapter`; holds the lock until exhausted or closed."""
        from mlx_lm import stream_generate
        from mlx_lm.sample_utils import make_sampler

        with self.lock, self.multi.set_adapter(adapter):
            mx.random.seed(cfg.seed)
            sampler = make_sampler(temp=cfg.temp, top_p=cfg.top_p)
            cut = StopText(stop)
            gen = stream_generate(self.multi.model, self.tokenizer, prompt, max_tokens=cfg.max_tokens, sampler=sampler)
            with closing(gen):
                for resp in gen:
                    text = cut.feed(resp.text)
                    if cut.hit:
                        yield Piece(text, "stop", resp.prompt_tokens, resp.generation_tokens)
                        return
                    if resp.finish_reason is not None:
                        # mlx-lm counts the end-of-sequence token; the text never holds it
                        n = resp.generation_tokens - (resp.finish_reason == "stop")
                        yield Piece(text + cut.flush(), resp.finish_reason, resp.prompt_tokens, n)
                        return
                    yield Piece(text, None, resp.prompt_tokens, resp.generation_tokens)

    @staticmethod
    def join(pieces: Iterator[Piece]) -> Piece:
        """A whole generation as one Piece."""
        texts, last = [], None
        for last in pieces:
            texts.append(last.text)
        return Piece("".join(texts), last.finish_reason, last.prompt_tokens, last.completion_tokens)


class StopText:
    """Cuts generated text at the first stop string, holding back a tail that might begin one."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = [s for s in stops if s]
        self.pending, self.hit = "", False

    def feed(self, text: str) -> str:
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending, self.hit = self.pending[:min(hits)], "", True
            return out
        keep = max([k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])], default=0)
        out = self.pending[:len(self.pending) - keep]
        self.pending = self.pending[len(out):]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


# ---------------------------------------------------------------- requests

@dataclass
class Request:
    """A parsed completion request."""

    kind: str  # "chat" or "text"
    model: str
    adapter: str | None
    prompt: str | list  # the text to continue, or the chat messages
    cfg: GenerateConfig
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool


def parse_request(engine: Engine, body: dict, kind: str) -> Request:
    """Check a request body and resolve its model; raises HTTPError 400 (naming the field) or 404."""
    try:
        adapter = engine.resolve(body.get("model"))
    except UnknownModel as e:
        raise HTTPError(404, str(e)) from None
    if kind == "chat":
        prompt = _messages(body.get("messages"))
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise HTTPError(400, "prompt: give a non-empty string")
    opts = {}
    for field, key, kinds in (("max_tokens", "max_tokens", int), ("temperature", "temp", (int, float)),
                              ("top_p", "top_p", (int, float)), ("seed", "seed", int)):
        value = body.get(field)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, kinds):
            raise HTTPError(400, f"{field}: expected a number, got {json.dumps(value)}")
        if field == "seed" and not 0 <= value < 2**64:
            raise HTTPError(400, f"seed: expected an integer in [0, 2**64), got {value}")
        opts[key] = value
    if body.get("max_completion_tokens") is not None and "max_tokens" not in opts:
        opts["max_tokens"] = body["max_completion_tokens"]
    try:
        cfg = GenerateConfig(**opts)
    except ConfigError as e:
        raise HTTPError(400, str(e).replace("--max-tokens", "max_tokens").replace("--temp", "temperature")
                        .replace("--top-p", "top_p")) from None
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise HTTPError(400, "stream: expected true or false")
    options = body.get("stream_options") or {}
    return Request(kind, body.get("model") or engine.base_name, adapter, prompt, cfg, _stops(body.get("stop")),
                   stream, bool(isinstance(options, dict) and options.get("include_usage")))


def _messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise HTTPError(400, "messages: give a non-empty list of {\"role\", \"content\"} objects")
    out = []
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):  # OpenAI's content parts: keep the text ones
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(content, str):
            raise HTTPError(400, f"messages[{i}]: expected {{\"role\": str, \"content\": str}}")
        out.append({"role": m["role"], "content": content})
    return out


def _stops(stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops) or len(stops) > 4:
        raise HTTPError(400, "stop: give a string or a list of up to 4 strings")
    return tuple(stops)


# ---------------------------------------------------------------- responses

def usage_body(p: Piece) -> dict:
    return {"prompt_tokens": p.prompt_tokens, "completion_tokens": p.completion_tokens,
            "total_tokens": p.prompt_tokens + p.completion_tokens}


def completion_body(req: Request, rid: str, created: int, p: Piece) -> dict:
    if req.kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": p.text}, "finish_reason": p.finish_reason}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": p.text, "logprobs": None, "finish_reason": p.finish_reason}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": req.model, "choices": [choice], "usage": usage_body(p)}


def chunk_body(req: Request, rid: str, created: int, text: str | None, finish: str | None, first: bool) -> dict:
    if req.kind == "chat":
        delta = {} if text is None else {"content": text}
        if first:
            delta["role"] = "assistant"
        choice, obj = {"index": 0, "delta": delta, "finish_reason": finish}, "chat.completion.chunk"
    else:
        choice, obj = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}, "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": req.model, "choices": [choice]}



__all__ = ["BASE_ALIAS", "Engine", "Piece", "StopText", "UnknownModel", "HTTPError", "Request", "parse_request",
           "usage_body", "completion_body", "chunk_body"]
