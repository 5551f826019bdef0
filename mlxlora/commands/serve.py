"""`mlxlora chat` (a terminal chat that switches adapters) and `mlxlora serve` (an OpenAI-compatible server).

Both load the base once and attach every `--adapter name=DIR`; switching costs no reload.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..config import GenerateConfig, ServeConfig
from ..errors import ConfigError
from .options import IGNORE_BASE, QUANTIZE, default, parse_adapter_specs, quantize_bits
CHAT_HELP = ("/adapter NAME  switch adapter (history is kept)   /adapter none  the bare base\n"
             "/adapters      list them   /clear  forget the conversation   /quit  leave")


def base_name_of(spec: str) -> str:
    """The name the base is served under: a folder's or file's name, or the hub id."""
    p = Path(spec).expanduser()
    if p.exists():
        return p.resolve().stem if p.suffix.lower() == ".gguf" else p.resolve().name
    return spec


def load_engine(model: str, adapters: dict[str, str], quantize: str | None = None,
                settings: ServeConfig | None = None, ignore_base_mismatch: bool = False):
    """Load the base once, attach the adapters, and return a serve.engine.Engine over them (close() it).
    An mlxlora adapter trained on another base is refused (AdapterError) unless ignore_base_mismatch."""
    from ..models import load_base
    from ..serve.engine import Engine
    from ..serve.multi import MultiAdapterModel

    base = load_base(model, quantize=quantize_bits(quantize))
    base.model.eval()
    multi = MultiAdapterModel.of_base(base, ignore_base_mismatch)
    for name, path in adapters.items():
        multi.load_adapter(path, name)
    return Engine(multi, base.tokenizer, base_name_of(model), settings, context_length(base))


def context_length(base) -> int | None:
    """The model's context length (config.json's max_position_embeddings, else the tokenizer's limit)."""
    for value in (base.config.get("max_position_embeddings"), base.config.get("max_sequence_length"),
                  getattr(getattr(base.tokenizer, "_tokenizer", None), "model_max_length", None)):
        if isinstance(value, int) and 0 < value < 10**8:
            return value
    return None


class ChatSession:
    """The chat REPL's state: history and the active adapter; `handle(line)` yields what to print."""

    def __init__(self, engine, cfg, adapter: str | None = None, system: str | None = None):
        self.engine, self.cfg, self.adapter, self.system = engine, cfg, adapter, system
        self.history: list[dict] = []
        self.done = False

    @property
    def prompt(self) -> str:
        return f"[{self.adapter or 'base'}]> "

    def handle(self, line: str):
        line = line.strip()
        if not line:
            return
        if line.startswith("/"):
            yield self._command(line) + "\n"
            return
        self.history.append({"role": "user", "content": line})
        system = [{"role": "system", "content": self.system}] if self.system else []
        reply = []
        for piece in self.engine.stream_chat(system + self.history, self.adapter, self.cfg):
            reply.append(piece.text)
            yield piece.text
        yield "\n"
        self.history.append({"role": "assistant", "content": "".join(reply)})

    def _command(self, line: str) -> str:
        cmd, _, arg = line.partition(" ")
        arg = arg.strip()
        names = self.engine.multi.adapters
        if cmd in ("/quit", "/exit"):
            self.done = True
            return "bye"
        if cmd == "/adapters":
            rows = [(None, "none (the bare base)")] + [(n, n) for n in names]
            return "\n".join(f"{'*' if n == self.adapter else ' '} {label}" for n, label in rows)
        if cmd == "/adapter":
            if arg.lower() in ("none", "base"):
                self.adapter = None
                return "adapter: none (the bare base)"
            if arg not in names:
                return f"no adapter {arg!r}; loaded: {', '.join(names) or 'none'} (or /adapter none)"
            self.adapter = arg
            return f"adapter: {arg}"
        if cmd == "/clear":
            self.history.clear()
            return "conversation cleared"
        return f"unknown command {cmd}\n{CHAT_HELP}"


def _gen_options(f):
    for o in reversed([
        click.option("--model", required=True, help="Model folder, .gguf file, or hub id."),
        click.option("--adapter", "adapters", multiple=True, metavar="NAME=DIR",
                     help="An adapter folder to attach under NAME; repeat for more."),
        click.option("--quantize", type=QUANTIZE, help="Quantize the base at load time."),
        IGNORE_BASE,
    ]):
        f = o(f)
    return f


@click.command()
@_gen_options
@click.option("--start", "start_adapter", help="Adapter to start with. [default: the first --adapter]")
@click.option("--system", help="A system message put before the conversation.")
@click.option("--max-tokens", type=int, help=f"Per reply. {default(GenerateConfig, 'max_tokens')}")
@click.option("--temp", type=float, help=f"Sampling temperature; 0 is greedy. {default(GenerateConfig, 'temp')}")
@click.option("--top-p", type=float, help=default(GenerateConfig, "top_p"))
@click.option("--seed", type=int, help=default(GenerateConfig, "seed"))
def chat(model, adapters, quantize, ignore_base_mismatch, start_adapter, system, **opts):
    """Chat in the terminal; switch adapters with /adapter NAME without reloading.

    Example: mlxlora chat --model ./smollm2 --adapter devil=runs/devil --adapter poet=runs/poet
    """
    from ..config import given

    cfg = GenerateConfig(**given(**opts))
    specs = parse_adapter_specs(adapters)
    if start_adapter is not None and start_adapter not in specs and start_adapter.lower() not in ("none", "base"):
        raise ConfigError(f"--start {start_adapter!r}: not one of the --adapter names ({', '.join(specs) or 'none given'})")
    engine = load_engine(model, specs, quantize, ignore_base_mismatch=ignore_base_mismatch)
    first = next(iter(specs), None) if start_adapter is None else start_adapter
    session = ChatSession(engine, cfg, None if first and first.lower() in ("none", "base") else first, system)
    click.echo(f"{engine.base_name} with adapters: {', '.join(specs) or 'none'}\n{CHAT_HELP}")
    try:
        while not session.done:
            click.echo(session.prompt, nl=False)
            line = sys.stdin.readline()
            if not line:  # end of input
                click.echo()
                break
            for text in session.handle(line):
                click.echo(text, nl=False)
                sys.stdout.flush()
    finally:
        engine.close()


@click.command()
@_gen_options
@click.option("--host", help=f"Address to listen on. {default(ServeConfig, 'host')}")
@click.option("--port", type=int, help=f"Port; 0 picks a free one. {default(ServeConfig, 'port')}")
@click.option("--max-request-bytes", type=int, help=f"Larger request bodies get 413. {default(ServeConfig, 'max_request_bytes')}")
@click.option("--max-tokens-limit", type=int,
              help=f"Most tokens one request may generate (larger max_tokens are capped). {default(ServeConfig, 'max_tokens_limit')}")
@click.option("--max-batch", type=int, help=f"Requests of one adapter decoded together. {default(ServeConfig, 'max_batch')}")
@click.option("--max-pending", type=int, help=f"Requests running or queued; more get 503. {default(ServeConfig, 'max_pending')}")
@click.option("--request-timeout", type=float, help=f"Seconds per request (then 504). {default(ServeConfig, 'request_timeout')}")
@click.option("--quiet", is_flag=True, help="Do not log requests.")
def serve(model, adapters, quantize, ignore_base_mismatch, quiet, **opts):
    """Serve the base and its adapters over an OpenAI-compatible HTTP API; `model` picks the adapter.

    Example: mlxlora serve --model ./smollm2 --adapter devil=runs/devil --port 8080
    """
    from ..config import given
    from ..serve.server import make_server, serve_forever

    settings = ServeConfig(**given(**opts))
    engine = load_engine(model, parse_adapter_specs(adapters), quantize, settings, ignore_base_mismatch)
    server = make_server(engine, settings, log=None if quiet else (lambda m: click.echo(m, err=True)))
    host, port = server.server_address[:2]
    click.echo(f"serving {', '.join(engine.model_names())} at http://{host}:{port}/v1 (Ctrl-C stops)")
    sys.stdout.flush()
    serve_forever(server)  # returns on Ctrl-C / SIGTERM after answering or refusing every request
    click.echo("stopped", err=True)
