"""The OpenAI request and response format behind `mlxlora serve`: checking a request body (HTTPError with the
status and a message naming the field) and building the JSON answers. No HTTP and no generation here."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from ..config import GenerateConfig
from ..data.rows import ROLES
from ..errors import ConfigError, HTTPError, UnknownModel
from .engine import Engine, Piece

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
        if isinstance(value, float) and not math.isfinite(value):
            raise HTTPError(400, f"{field}: expected a finite number, got {value}")
        if field == "seed" and not 0 <= value < 2**64:
            raise HTTPError(400, f"seed: expected an integer in [0, 2**64), got {value}")
        opts[key] = value
    if body.get("max_completion_tokens") is not None and "max_tokens" not in opts:
        value = body["max_completion_tokens"]
        if isinstance(value, bool) or not isinstance(value, int):
            raise HTTPError(400, f"max_completion_tokens: expected an integer, got {json.dumps(value)}")
        opts["max_tokens"] = value
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
        if m["role"] not in ROLES:
            raise HTTPError(400, f"messages[{i}].role: unknown role {m['role']!r}; use one of {', '.join(ROLES)}")
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



__all__ = ["Request", "parse_request", "usage_body", "completion_body", "chunk_body"]
