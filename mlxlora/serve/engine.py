"""Generation for `mlxlora serve` and `mlxlora chat`: one scheduler thread, continuous batching per adapter.

One thread owns the model. Every running request is a row of a continuous batch (mlx-lm's
BatchGenerator: rows join when their prompt is read and leave when they finish) of the adapter it asked
for; the batches of different adapters take turns, one decoding step each, so a short request never
waits for a long one to end and every adapter's requests advance. Requests are handed over as token
ids and come back as `Piece`s on their own queue; a request whose caller is gone (`cancel`, a closed
generator, a client that disconnected) or whose time is up leaves its batch at the next step.

Each request samples with its own random key (from its seed), so a seeded request gives the same text
whatever else runs beside it. `max_tokens` is capped by the server limit and by the context length.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Iterator

import mlx.core as mx

from ..config import GenerateConfig, ServeConfig
from ..data.chat import render_fallback_template, render_template
from ..errors import ConfigError, HTTPError, UnknownModel
from .multi import MultiAdapterModel

BASE_ALIAS = "base"
POLL_S = 0.1  # how often a waiting caller checks that its client is still there


@dataclass
class Piece:
    """A piece of generated text; the last one has finish_reason "stop" or "length"."""

    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


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


def greedy(logprobs: mx.array) -> mx.array:
    """One shared sampler for every greedy row, so a batch of them is sampled in one call."""
    return mx.argmax(logprobs, axis=-1)


class KeyedSampler:
    """Temperature / top-p sampling from a request's own random key (independent of the other rows)."""

    def __init__(self, temp: float, top_p: float, seed: int):
        self.temp, self.top_p, self.key = temp, top_p, mx.random.key(seed)

    def __call__(self, logprobs: mx.array) -> mx.array:
        from mlx_lm.sample_utils import apply_top_p

        self.key, sub = mx.random.split(self.key)
        if 0 < self.top_p < 1:
            logprobs = apply_top_p(logprobs, self.top_p)
        return mx.random.categorical(logprobs * (1.0 / self.temp), key=sub)


@dataclass
class Job:
    """One request inside the engine: its ids, limits and the queue its pieces arrive on."""

    ids: list[int]
    adapter: str | None
    max_tokens: int
    sampler: Callable
    stop: StopText
    deadline: float
    out: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    generated: int = 0
    detok: object = None
    uid: int | None = None

    def cancel(self) -> None:
        self.cancelled.set()


class Engine:
    """Generation over a MultiAdapterModel from one scheduler thread (see the module docstring).

    settings: the limits (ServeConfig: max_tokens_limit, max_batch, max_pending, request_timeout).
    context_length: the model's context; prompt + max_tokens never pass it. `close()` stops the thread.
    """

    def __init__(self, multi: MultiAdapterModel, tokenizer, base_name: str, settings: ServeConfig | None = None,
                 context_length: int | None = None):
        self.multi, self.tokenizer, self.base_name = multi, tokenizer, base_name
        self.settings = settings or ServeConfig()
        self.context_length = context_length
        if base_name in multi.adapters or BASE_ALIAS in multi.adapters:
            raise ConfigError(f"adapter names must differ from the base name {base_name!r} and {BASE_ALIAS!r}")
        self.lock = threading.RLock()  # the tokenizer: rendering and encoding in callers' threads
        self._inbox: queue.Queue = queue.Queue()
        self._pending = 0  # requests submitted and not yet finished
        self._count_lock = threading.Lock()
        self._stopping = threading.Event()
        # counts since start: finished / cancelled (caller gone) / timed_out requests, generated tokens
        self.stats = {"finished": 0, "cancelled": 0, "timed_out": 0, "tokens": 0}
        self._thread = threading.Thread(target=self._run, name="mlxlora-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ names and prompts
    def model_names(self) -> list[str]:
        return [self.base_name, *self.multi.adapters]

    def resolve(self, name) -> str | None:
        """The adapter a request's `model` field names (None: the base). Raises UnknownModel listing the choices."""
        if name in (None, "", self.base_name, BASE_ALIAS):
            return None
        if name in self.multi.adapters:
            return name
        raise UnknownModel(f"model {name!r} is not served here; available: {', '.join(self.model_names())}")

    def render(self, messages: list[dict], adapter: str | None = None):
        """A conversation as the prompt to continue: the tokenizer's chat template, else the template the
        adapter was trained with (its record), else mlxlora's fallback; plus the reply header.

        Raises ConfigError when the template refuses the conversation (e.g. roles out of order).
        """
        try:
            if getattr(self.tokenizer, "chat_template", None) is not None:
                return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            recorded = ((self.multi.get_adapter(adapter).meta.get("chat_template") or {}) if adapter else {}).get("template")
            if recorded:
                return render_template(recorded, messages, eos_token=getattr(self.tokenizer, "eos_token", "") or "")
            return render_fallback_template(messages, add_generation_prompt=True)
        except Exception as e:  # jinja's TemplateError or whatever the template raises
            raise ConfigError(f"messages: the chat template cannot render this conversation ({e})") from None

    def encode(self, prompt) -> list[int]:
        """Token ids of a prompt (text, as mlx-lm's stream_generate encodes it, or ids already)."""
        if isinstance(prompt, str):
            with self.lock:
                bos = getattr(self.tokenizer, "bos_token", None)
                return list(self.tokenizer.encode(prompt, add_special_tokens=bos is None or not prompt.startswith(bos)))
        if hasattr(prompt, "input_ids"):  # a BatchEncoding from apply_chat_template
            prompt = prompt["input_ids"]
        return [int(t) for t in prompt]

    # ------------------------------------------------------------ requests
    def submit(self, prompt, adapter: str | None, cfg: GenerateConfig, stop: tuple[str, ...] = ()) -> Job:
        """Queue a generation; returns its Job (pieces arrive on job.out). Raises HTTPError 400 for a prompt
        that fills the context, 503 when the server is full or stopping."""
        ids = self.encode(prompt)
        if not ids:
            raise HTTPError(400, "the prompt encodes to no tokens")
        limit = self.settings.max_tokens_limit
        if self.context_length:
            room = self.context_length - len(ids)
            if room < 1:
                raise HTTPError(400, f"the prompt has {len(ids)} tokens; the context length is "
                                     f"{self.context_length}: shorten it")
            limit = min(limit, room)
        if cfg.temp == 0:
            sampler = greedy
        else:
            sampler = KeyedSampler(cfg.temp, cfg.top_p, cfg.seed)
        job = Job(ids, adapter, min(cfg.max_tokens, limit), sampler, StopText(stop),
                  time.monotonic() + self.settings.request_timeout)
        job.detok = self.tokenizer.detokenizer
        with self._count_lock:
            if self._stopping.is_set():
                raise HTTPError(503, "the server is shutting down")
            if self._pending >= self.settings.max_pending:
                raise HTTPError(503, f"the server is busy ({self._pending} requests running or queued, "
                                     f"--max-pending {self.settings.max_pending}); retry later")
            self._pending += 1
        self._inbox.put(job)
        return job

    def pieces(self, job: Job, alive: Callable[[], bool] | None = None) -> Iterator[Piece]:
        """The pieces of `job` as they come; closing the iterator (or `alive()` turning False) cancels it.

        Raises HTTPError 504 when the request timed out, 503 when the server stopped.
        """
        try:
            while True:
                try:
                    item = job.out.get(timeout=POLL_S)
                except queue.Empty:
                    if alive is not None and not alive():
                        job.cancel()
                        return
                    if not self._thread.is_alive() and job.out.empty():
                        raise HTTPError(503, "the server is shutting down")
                    continue
                if isinstance(item, Exception):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            job.cancel()  # a no-op when it finished; frees its row when the caller left early

    def stream(self, prompt, adapter: str | None, cfg: GenerateConfig, stop: tuple[str, ...] = (),
               alive: Callable[[], bool] | None = None) -> Iterator[Piece]:
        """Generate from `prompt` (text or token ids) with `adapter`, piece by piece."""
        job = self.submit(prompt, adapter, cfg, stop)
        yield from self.pieces(job, alive)

    def stream_chat(self, messages: list[dict], adapter: str | None, cfg: GenerateConfig,
                    stop: tuple[str, ...] = (), alive: Callable[[], bool] | None = None) -> Iterator[Piece]:
        """stream() for a conversation."""
        with self.lock:
            prompt = self.render(messages, adapter)
        yield from self.stream(prompt, adapter, cfg, stop, alive)

    @staticmethod
    def join(pieces: Iterator[Piece]) -> Piece:
        """A whole generation as one Piece."""
        texts, last = [], None
        for last in pieces:
            texts.append(last.text)
        return Piece("".join(texts), last.finish_reason, last.prompt_tokens, last.completion_tokens)

    @property
    def pending(self) -> int:
        return self._pending

    def close(self, timeout: float = 30.0) -> None:
        """Stop: every waiting or running request gets 503, the scheduler thread ends (no generation is left
        running inside mlx when the process exits)."""
        self._stopping.set()
        self._thread.join(timeout)

    # ------------------------------------------------------------ the scheduler thread
    def _run(self) -> None:
        from mlx_lm.generate import BatchGenerator

        stops = [[t] for t in sorted(getattr(self.tokenizer, "eos_token_ids", None) or [])]
        batches: OrderedDict[str | None, tuple] = OrderedDict()  # adapter -> (BatchGenerator, {uid: job})
        try:
            while not self._stopping.is_set():
                self._admit(batches, BatchGenerator, stops, block=not batches)
                for adapter in list(batches):
                    gen, jobs = batches[adapter]
                    self._drop_cancelled(gen, jobs)
                    if not jobs:
                        gen.close()
                        del batches[adapter]
                        continue
                    with self.multi.set_adapter(adapter):
                        _, responses = gen.next()
                    for r in responses:
                        job = jobs.get(r.uid)
                        if job is not None and self._emit(job, r.token, r.finish_reason):
                            if r.finish_reason is None:  # a stop string or a cancel: the row is still there
                                gen.remove([r.uid])
                            self.stats["finished" if not job.cancelled.is_set() else "cancelled"] += 1
                            self._done(jobs.pop(r.uid))
        except Exception as e:  # a backend failure: every caller gets it instead of waiting forever
            self._fail_all(batches, HTTPError(500, f"generation failed: {type(e).__name__}: {e}"))
            raise
        self._fail_all(batches, HTTPError(503, "the server is shutting down"))

    def _admit(self, batches, BatchGenerator, stops, block: bool) -> None:
        while True:
            try:
                job = self._inbox.get(timeout=POLL_S) if block else self._inbox.get_nowait()
            except queue.Empty:
                return
            block = False
            if job.cancelled.is_set():
                self.stats["cancelled"] += 1
                self._done(job)
                continue
            if job.adapter not in batches:
                gen = BatchGenerator(self.multi.model, stop_tokens=stops,
                                     completion_batch_size=self.settings.max_batch,
                                     prefill_batch_size=min(8, self.settings.max_batch))
                batches[job.adapter] = (gen, {})
            gen, jobs = batches[job.adapter]
            (job.uid,) = gen.insert([job.ids], max_tokens=[job.max_tokens], samplers=[job.sampler])
            jobs[job.uid] = job

    def _drop_cancelled(self, gen, jobs: dict) -> None:
        now = time.monotonic()
        gone = []
        for uid, job in jobs.items():
            if now > job.deadline and not job.cancelled.is_set():
                job.out.put(HTTPError(504, f"the request ran past --request-timeout "
                                           f"{self.settings.request_timeout:g} s; ask for fewer max_tokens"))
                job.cancel()
                self.stats["timed_out"] += 1
            elif job.cancelled.is_set():
                self.stats["cancelled"] += 1
            if job.cancelled.is_set():
                gone.append(uid)
        if gone:
            gen.remove(gone)
            for uid in gone:
                self._done(jobs.pop(uid))

    def _emit(self, job: Job, token: int, finish: str | None) -> bool:
        """Turn one generated token into a Piece on the job's queue; True when the job is over."""
        if job.cancelled.is_set():
            return True
        if finish == "stop":  # the end-of-sequence token: never part of the text, nor of the count
            job.detok.finalize()
            text = job.stop.feed(job.detok.last_segment)
            job.out.put(Piece(text + job.stop.flush(), "stop", len(job.ids), job.generated))
            return True
        job.generated += 1
        self.stats["tokens"] += 1
        job.detok.add_token(token)
        if finish is not None:
            job.detok.finalize()
        text = job.stop.feed(job.detok.last_segment)
        if job.stop.hit:
            job.out.put(Piece(text, "stop", len(job.ids), job.generated))
            return True
        if finish is not None:
            job.out.put(Piece(text + job.stop.flush(), finish, len(job.ids), job.generated))
            return True
        job.out.put(Piece(text, None, len(job.ids), job.generated))
        return False

    def _done(self, job: Job) -> None:
        job.cancel()
        with self._count_lock:
            self._pending -= 1

    def _fail_all(self, batches, error: Exception) -> None:
        for gen, jobs in batches.values():
            for job in jobs.values():
                job.out.put(error)
                self._done(job)
            gen.close()
        batches.clear()
        while True:
            try:
                job = self._inbox.get_nowait()
            except queue.Empty:
                break
            job.out.put(error)
            self._done(job)


__all__ = ["BASE_ALIAS", "Engine", "Job", "Piece", "StopText", "KeyedSampler", "UnknownModel", "HTTPError"]
