"""An OpenAI-compatible HTTP server over one base model and many adapters (standard library only).

    GET  /v1/models             the base and every adapter, as models
    POST /v1/chat/completions   {"model", "messages", "max_tokens", "temperature", "top_p", "seed", "stop", "stream"}
    POST /v1/completions        {"model", "prompt", ...the same}

The request's `model` picks the adapter: an adapter name, or the base name (or "base", or nothing) for the
bare base. `stream: true` answers with server-sent events (`data: {...}` chunks, then `data: [DONE]`).
One model serves every thread: an Engine runs one generation at a time under a lock, so concurrent
requests give exactly what they would give one after another. Temperature 0 (the default) is greedy.
This module is the HTTP transport; generation and the request/response format live in serve/engine.py
(re-exported here, with ServeConfig from mlxlora.config).
"""

from __future__ import annotations

import json
import time
import traceback
import uuid
from contextlib import closing
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Iterator

from ..config import ServeConfig
from ..errors import HTTPError, MlxloraError, UnknownModel
from .engine import BASE_ALIAS, Engine, Piece, Request, StopText, chunk_body, completion_body, parse_request, usage_body


class _Handler(BaseHTTPRequestHandler):
    server_version = "mlxlora"
    engine: Engine
    settings: ServeConfig
    log: Callable[[str], None] | None = None

    def do_GET(self):
        path = self.path.split("?")[0].rstrip("/")
        if path == "/v1/models":
            created = int(time.time())
            data = [{"id": n, "object": "model", "created": created, "owned_by": "mlxlora",
                     "parent": None if i == 0 else self.engine.base_name}
                    for i, n in enumerate(self.engine.model_names())]
            self._json(200, {"object": "list", "data": data})
        elif path == "/health":
            self._json(200, {"status": "ok"})
        else:
            self._error(404, f"no route GET {path}; try GET /v1/models")

    def do_POST(self):
        path = self.path.split("?")[0].rstrip("/")
        kind = {"/v1/chat/completions": "chat", "/v1/completions": "text"}.get(path)
        self.streaming = False
        try:
            if kind is None:
                raise HTTPError(404, f"no route POST {path}; try /v1/chat/completions or /v1/completions")
            req = parse_request(self.engine, self._read_json(), kind)
            (self._stream if req.stream else self._complete)(req)
        except HTTPError as e:
            self._fail(e.status, e.message)
        except MlxloraError as e:
            self._fail(400, str(e))
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away; the lock was released when the generation was closed
        except Exception as e:  # a bug or a backend failure: answer 500 and keep serving
            if self.log is not None:
                self.log(traceback.format_exc())
            self._fail(500, f"{type(e).__name__}: {e}")

    def _fail(self, status: int, message: str) -> None:
        if self.streaming:  # the status line is gone: end the event stream with an error event
            self._event({"error": {"message": message, "type": "server_error", "param": None, "code": status}})
        else:
            self._error(status, message)

    def _read_json(self) -> dict:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise HTTPError(411, "send the body with a Content-Length (chunked bodies are not accepted)")
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise HTTPError(411, "Content-Length header missing or not a number") from None
        limit = self.settings.max_request_bytes
        if length > limit:
            self._drain(length)
            raise HTTPError(413, f"request body of {length} bytes is over the limit of {limit} bytes (--max-request-bytes)")
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise HTTPError(400, f"body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise HTTPError(400, f"body must be a JSON object, got {type(body).__name__}")
        return body

    def _drain(self, length: int) -> None:
        # Reading what the client sends lets it see the 413 instead of a reset; past 16x the limit just close.
        while 0 < length <= 16 * self.settings.max_request_bytes:
            chunk = self.rfile.read(min(length, 1 << 16))
            if not chunk:
                break
            length -= len(chunk)
        self.close_connection = True

    def _complete(self, req: Request) -> None:
        rid, created = _new_id(req), int(time.time())
        piece = Engine.join(self._pieces(req))
        self._json(200, completion_body(req, rid, created, piece))

    def _pieces(self, req: Request) -> Iterator[Piece]:
        run = self.engine.stream_chat if req.kind == "chat" else self.engine.stream
        return run(req.prompt, req.adapter, req.cfg, req.stop)

    def _stream(self, req: Request) -> None:
        rid, created = _new_id(req), int(time.time())
        pieces = self._pieces(req)
        with closing(pieces):
            first = next(pieces)  # errors before any output still get a proper status
            self.streaming = True
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.end_headers()
            p, is_first = first, True
            while True:
                if p.text or is_first:  # a token may complete no character yet: nothing to send
                    self._event(chunk_body(req, rid, created, p.text, None, is_first))
                is_first = False
                if p.finish_reason is not None:
                    break
                p = next(pieces)
        self._event(chunk_body(req, rid, created, None, p.finish_reason, False))
        if req.include_usage:
            self._event({"id": rid, "object": chunk_body(req, rid, created, None, None, False)["object"],
                         "created": created, "model": req.model, "choices": [], "usage": usage_body(p)})
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()

    def _event(self, obj: dict) -> None:
        self.wfile.write(b"data: " + json.dumps(obj).encode() + b"\n\n")
        self.wfile.flush()

    def _json(self, status: int, obj: dict) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str) -> None:
        kinds = {400: "invalid_request_error", 404: "not_found_error", 411: "invalid_request_error",
                 413: "request_too_large"}
        self._json(status, {"error": {"message": message, "type": kinds.get(status, "server_error"),
                                      "param": None, "code": status}})

    def log_message(self, fmt, *args):
        if self.log is not None:
            self.log(f"{self.address_string()} {fmt % args}")


def _new_id(req: Request) -> str:
    return f"{'chatcmpl' if req.kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"


def make_server(engine: Engine, settings: ServeConfig | None = None,
                log: Callable[[str], None] | None = None) -> ThreadingHTTPServer:
    """A bound (not yet serving) HTTP server; port 0 picks a free port (see `server.server_address`)."""
    settings = settings or ServeConfig()
    handler = type("Handler", (_Handler,), {"engine": engine, "settings": settings, "log": staticmethod(log) if log else None})
    server = ThreadingHTTPServer((settings.host, settings.port), handler)
    server.daemon_threads = True
    return server


def serve_forever(server: ThreadingHTTPServer) -> None:
    """Serve until `server.shutdown()` (from another thread) or Ctrl-C; then close the socket."""
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()



__all__ = ["Engine", "ServeConfig", "Piece", "StopText", "UnknownModel", "make_server", "serve_forever",
           "parse_request", "BASE_ALIAS", "HTTPError", "Request"]
