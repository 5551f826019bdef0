"""An OpenAI-compatible HTTP server over one base model and many adapters (standard library only).

    GET  /v1/models             the base and every adapter, as models
    POST /v1/chat/completions   {"model", "messages", "max_tokens", "temperature", "top_p", "seed", "stop", "stream"}
    POST /v1/completions        {"model", "prompt", ...the same}

The request's `model` picks the adapter: an adapter name, or the base name (or "base", or nothing) for the
bare base. `stream: true` answers with server-sent events (`data: {...}` chunks, then `data: [DONE]`).
Temperature 0 (the default) is greedy.

Under load: a fixed pool of worker threads handles connections (none is created per request), the
listen backlog holds ServeConfig.backlog more, and beyond that a client gets 503 at once. Generation runs
in the Engine's one scheduler thread with continuous batching (serve/engine.py); a worker waits for its
request's pieces and cancels the request when its client disconnects. A request body that is too large,
has a bad Content-Length or is nested too deeply gets 4xx, never a 500 with a traceback. Stopping (Ctrl-C,
SIGTERM) closes the socket, answers what is still waiting with 503 and ends the generation thread before
the process exits.
"""

from __future__ import annotations

import json
import select
import socket
import threading
import time
import traceback
import uuid
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Callable, Iterator

from ..config import ServeConfig
from ..errors import HTTPError, MlxloraError, UnknownModel
from .engine import BASE_ALIAS, Engine, Piece, StopText
from .openai import Request, chunk_body, completion_body, parse_request, usage_body

MAX_JSON_DEPTH = 64  # deeper bodies are refused before parsing (Python's parser would recurse)
KINDS = {400: "invalid_request_error", 404: "not_found_error", 411: "invalid_request_error",
         413: "request_too_large", 503: "server_busy", 504: "timeout"}


class _Handler(BaseHTTPRequestHandler):
    server_version = "mlxlora"
    engine: Engine
    settings: ServeConfig
    log: Callable[[str], None] | None = None

    def setup(self):
        self.timeout = self.settings.read_timeout  # a slow or silent client cannot hold a worker forever
        super().setup()

    def do_GET(self):
        path = self.path.split("?")[0].rstrip("/")
        if path == "/v1/models":
            created = int(time.time())
            data = [{"id": n, "object": "model", "created": created, "owned_by": "mlxlora",
                     "parent": None if i == 0 else self.engine.base_name}
                    for i, n in enumerate(self.engine.model_names())]
            self._json(200, {"object": "list", "data": data})
        elif path == "/health":
            self._json(200, {"status": "ok", "pending": self.engine.pending})
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
        except (BrokenPipeError, ConnectionResetError, socket.timeout):
            self.close_connection = True  # the client went away; its request was cancelled
        except Exception as e:  # a bug or a backend failure: answer 500 and keep serving
            if self.log is not None:
                self.log(traceback.format_exc())
            self._fail(500, f"{type(e).__name__}: {e}")

    def _fail(self, status: int, message: str) -> None:
        try:
            if self.streaming:  # the status line is gone: end the event stream with an error event
                self._event({"error": {"message": message, "type": KINDS.get(status, "server_error"),
                                       "param": None, "code": status}})
            else:
                self._error(status, message)
        except OSError:
            pass  # the client is gone too

    def _read_json(self) -> dict:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise HTTPError(411, "send the body with a Content-Length (chunked bodies are not accepted)")
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise HTTPError(411, "Content-Length header missing or not a number") from None
        if length < 0:
            self.close_connection = True
            raise HTTPError(400, f"Content-Length {length} is negative; send the body's size in bytes")
        limit = self.settings.max_request_bytes
        if length > limit:
            self._drain(length)
            raise HTTPError(413, f"request body of {length} bytes is over the limit of {limit} bytes (--max-request-bytes)")
        raw = self.rfile.read(length)
        if len(raw) < length:
            self.close_connection = True
            raise HTTPError(400, f"the body ended after {len(raw)} of {length} bytes (Content-Length)")
        depth = _depth(raw)
        if depth > MAX_JSON_DEPTH:
            raise HTTPError(400, f"body is nested {depth} levels deep; at most {MAX_JSON_DEPTH} are accepted")
        try:
            body = json.loads(raw, parse_constant=_no_constant)
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
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

    def _alive(self) -> bool:
        """False once the client closed its end (it sent its whole request, so readable means EOF)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return not readable or self.connection.recv(1, socket.MSG_PEEK) != b""
        except (OSError, ValueError):
            return False

    def _pieces(self, req: Request) -> Iterator[Piece]:
        run = self.engine.stream_chat if req.kind == "chat" else self.engine.stream
        return run(req.prompt, req.adapter, req.cfg, req.stop, alive=self._alive)

    def _complete(self, req: Request) -> None:
        rid, created = _new_id(req), int(time.time())
        pieces = self._pieces(req)
        texts, last = [], None
        for last in pieces:
            texts.append(last.text)
        if last is None or last.finish_reason is None:  # the client left; nobody to answer
            self.close_connection = True
            return
        self._json(200, completion_body(req, rid, created, Piece("".join(texts), last.finish_reason,
                                                                 last.prompt_tokens, last.completion_tokens)))

    def _stream(self, req: Request) -> None:
        rid, created = _new_id(req), int(time.time())
        pieces = self._pieces(req)
        try:
            first = next(pieces, None)  # errors before any output still get a proper status
            if first is None:
                self.close_connection = True
                return
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
                p = next(pieces, None)
                if p is None:
                    return
        finally:
            pieces.close()  # cancels the request when the client left mid-stream
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
        if status == 503:
            self.send_header("Retry-After", "1")
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"error": {"message": message, "type": KINDS.get(status, "server_error"),
                                      "param": None, "code": status}})

    def log_message(self, fmt, *args):
        if self.log is not None:
            self.log(f"{self.address_string()} {fmt % args}")


def _depth(raw: bytes) -> int:
    """How deeply a JSON text nests arrays/objects (brackets inside strings not counted)."""
    depth = top = 0
    in_str = esc = False
    for ch in raw:
        if in_str:
            if esc:
                esc = False
            elif ch == 0x5C:  # backslash
                esc = True
            elif ch == 0x22:
                in_str = False
        elif ch == 0x22:
            in_str = True
        elif ch in (0x5B, 0x7B):
            depth += 1
            top = max(top, depth)
            if top > MAX_JSON_DEPTH:
                return top
        elif ch in (0x5D, 0x7D):
            depth -= 1
    return top


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _new_id(req: Request) -> str:
    return f"{'chatcmpl' if req.kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"


class PooledHTTPServer(HTTPServer):
    """An HTTPServer whose connections run on a fixed pool of threads; more than the pool and its queue
    can take get 503 from the accepting thread at once."""

    daemon_threads = True

    def __init__(self, address, handler, settings: ServeConfig, engine: Engine):
        self.request_queue_size = settings.backlog  # read by server_activate's listen()
        self.settings, self.engine = settings, engine
        self.pool = ThreadPoolExecutor(settings.workers, thread_name_prefix="mlxlora-http")
        self.busy = 0
        self.busy_lock = threading.Lock()
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        with self.busy_lock:
            full = self.busy >= self.settings.workers + self.settings.backlog
            if not full:
                self.busy += 1
        if full:
            _refuse(request)
            self.shutdown_request(request)
            return
        self.pool.submit(self._work, request, client_address)

    def _work(self, request, client_address):
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            with self.busy_lock:
                self.busy -= 1

    def handle_error(self, request, client_address):
        pass  # a client that misbehaved at the socket level: nothing to print, nothing to keep

    def server_close(self):
        super().server_close()
        self.engine.close()  # waiting requests get 503; the generation thread ends
        self.pool.shutdown(wait=True, cancel_futures=True)


def _refuse(sock) -> None:
    body = json.dumps({"error": {"message": "the server is busy; retry later", "type": "server_busy",
                                 "param": None, "code": 503}}).encode()
    try:
        sock.settimeout(1.0)
        sock.sendall(b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    except OSError:
        pass


def make_server(engine: Engine, settings: ServeConfig | None = None,
                log: Callable[[str], None] | None = None) -> PooledHTTPServer:
    """A bound (not yet serving) HTTP server; port 0 picks a free port (see `server.server_address`)."""
    settings = settings or ServeConfig()
    handler = type("Handler", (_Handler,), {"engine": engine, "settings": settings, "log": staticmethod(log) if log else None})
    return PooledHTTPServer((settings.host, settings.port), handler, settings, engine)


def serve_forever(server: PooledHTTPServer) -> None:
    """Serve until `server.shutdown()` (from another thread) or Ctrl-C / SIGTERM; then close the socket, answer
    what is still waiting and stop the generation thread (nothing is left running inside mlx)."""
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


__all__ = ["Engine", "ServeConfig", "Piece", "StopText", "UnknownModel", "make_server", "serve_forever",
           "parse_request", "BASE_ALIAS", "HTTPError", "Request", "PooledHTTPServer", "MAX_JSON_DEPTH"]
