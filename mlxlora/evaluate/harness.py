"""`mlxlora eval --tasks`: lm-evaluation-harness benchmarks on the base and on unfused adapters.

`MlxLM` is an lm-eval model class (a `TemplateLM`, so lm-eval itself turns requests into tokens exactly as
for its `hf` model: trailing context spaces moved into the continuation, the prefix token for an empty
context, rolling windows) whose scores come from mlxlora's loaded base with whichever adapter is switched
on. lm-eval runs the tasks and computes every metric; the numbers are lm-eval's. The base is loaded once
and each adapter switched on in turn (mlxlora.serve.multi), as `eval --generate` does.

lm-eval is optional: `pip install 'mlxlora[eval]'`.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx

from ..config import BenchmarkConfig
from ..data import FALLBACK_CHAT_TEMPLATE, TokenizerInfo, render_fallback_template
from ..errors import ConfigError
from ..serve.multi import MultiAdapterModel
from .generative import BASE

INSTALL = "pip install 'mlxlora[eval]' (or pip install lm-eval)"


def _lm_eval():
    try:
        import lm_eval  # noqa: F401
        from lm_eval.api.model import TemplateLM
    except ImportError:
        raise ConfigError(f"--tasks needs lm-evaluation-harness; {INSTALL}") from None
    return TemplateLM


def make_lm(base, batch_size: int = 8, max_gen_toks: int = 256):
    """An lm-eval LM over `base` (a mlxlora.models.Base) as it is at each call: bare, with one adapter, or
    with the adapter a MultiAdapterModel has switched on. The class is built on first use (lm-eval is optional)."""
    cls = _lm_class()
    return cls(base, batch_size=batch_size, max_gen_toks=max_gen_toks)


_CLASS = None


def _lm_class():
    global _CLASS
    if _CLASS is None:
        _CLASS = _build_class(_lm_eval())
    return _CLASS


def _build_class(TemplateLM):  # noqa: C901 - the class body reads best in one place
    from lm_eval.models.utils import (handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text,
                                      resolve_max_length)
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    class MlxLM(TemplateLM):
        """lm-eval's model interface over an mlx-lm model (the base with the adapter switched on).

        loglikelihood (lm-eval's tokenisation; the scoring here), loglikelihood_rolling (lm-eval's windows
        of max_length tokens) and generate_until (greedy, or sampled at the task's temperature; cut at the
        task's stop strings as lm-eval cuts them).
        """

        def __init__(self, base, batch_size: int = 8, max_gen_toks: int = 256):
            super().__init__()
            self.base, self.model, self.tokenizer = base, base.model, base.tokenizer
            self.batch_size, self.max_gen_toks = batch_size, max_gen_toks
            self.max_length = resolve_max_length(SimpleNamespace(**base.config), self.tokenizer)
            self.add_bos_token = None
            self._info = TokenizerInfo.from_tokenizer(self.tokenizer)

        @property
        def eot_token_id(self) -> int:
            return self.tokenizer.eos_token_id

        @property
        def prefix_token_id(self) -> int:
            bos = getattr(self.tokenizer, "bos_token_id", None)
            return bos if bos is not None else self.eot_token_id

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
            # As lm-eval's hf model: the tokenizer's own special tokens unless told, none if BOS is written out.
            kw = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
            bos = getattr(self.tokenizer, "bos_token", None)
            if add_special_tokens is None and bos and string.startswith(bos):
                kw["add_special_tokens"] = False
            return list(self.tokenizer.encode(string, **kw))

        @property
        def tokenizer_name(self) -> str:  # fingerprints lm-eval's request cache when chat templates are on
            hf = getattr(self.tokenizer, "_tokenizer", self.tokenizer)
            return str(getattr(hf, "name_or_path", "") or "mlxlora").replace("/", "__")

        def chat_template(self, chat_template: bool | str = False) -> str | None:
            """The Jinja text lm-eval records in its results (the fallback's when the tokenizer has none)."""
            if not chat_template:
                return None
            return self._info.hf.chat_template if self._info.has_template else FALLBACK_CHAT_TEMPLATE

        def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
            """The requests as a chat, rendered as training renders chat and completion rows (data/chat.py).
            add_generation_prompt False: lm-eval prefills the last (assistant) message, left open."""
            if self._info.has_template:
                return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                          add_generation_prompt=add_generation_prompt,
                                                          continue_final_message=not add_generation_prompt)
            if add_generation_prompt:
                return render_fallback_template(chat_history, self._info.eos_token, True)
            *head, last = chat_history
            return render_fallback_template(head, self._info.eos_token, True) + last["content"]

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
            """(sum of log p(continuation | context), whether the continuation is the greedy one) per request."""
            out = []
            for start in range(0, len(requests), self.batch_size):
                chunk = requests[start:start + self.batch_size]
                # inputs: the last max_length + 1 tokens minus the last one (as lm-eval's hf model cuts them)
                inputs = [(ctx + cont)[-(self.max_length + 1):][:-1] for _, ctx, cont in chunk]
                width = max(len(i) for i in inputs)
                batch = mx.array([i + [0] * (width - len(i)) for i in inputs])  # right padding: causal, unread
                logprobs = self.model(batch).astype(mx.float32)  # (B, L, V)
                logprobs = logprobs - mx.logsumexp(logprobs, axis=-1, keepdims=True)
                for row, (inp, (_, _, cont)) in enumerate(zip(inputs, chunk)):
                    n = len(cont)
                    lp = logprobs[row, len(inp) - n:len(inp)]  # (n, V): the positions that predict `cont`
                    target = mx.array(cont)
                    picked = mx.take_along_axis(lp, target[:, None], axis=-1)[:, 0]
                    greedy = mx.all(mx.argmax(lp, axis=-1) == target)
                    mx.eval(picked, greedy)
                    out.append((float(picked.sum().item()), bool(greedy.item())))
            return out

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            out = []
            for (string,) in [r.args for r in requests]:
                windows = [(None, *make_disjoint_window(w)) for w in get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)]
                out.append(sum(lp for lp, _ in self._loglikelihood_tokens(windows)))
            return out

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            from mlx_lm.generate import batch_generate
            from mlx_lm.sample_utils import make_sampler

            eos = self.tokenizer.decode([self.eot_token_id])
            out = []
            for req in requests:
                context, gen_kwargs = req.args
                kw = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
                until = handle_stop_sequences(kw.pop("until", None), eos=eos)
                max_gen = kw.pop("max_gen_toks")
                ids = self.tok_encode(context)[-(self.max_length - max_gen):]
                temp = float(kw.get("temperature") or 0.0) if kw.get("do_sample") else 0.0
                sampler = make_sampler(temp=temp, top_p=float(kw.get("top_p") or 1.0)) if temp > 0 else None
                res = batch_generate(self.model, self.tokenizer, [ids], max_tokens=max_gen, return_token_ids=True,
                                     **({"sampler": sampler} if sampler else {}))
                text = self.tokenizer.decode(res.token_ids[0], skip_special_tokens=True)
                out.append(postprocess_generated_text(generation=text, stop=until, think_end_token=None))
            return out

    return MlxLM


# ---------------------------------------------------------------- tasks

def task_manager(cfg: BenchmarkConfig):
    """lm-eval's TaskManager: its own tasks plus cfg.include_path's (indexed once per process: ~20 s)."""
    _lm_eval()
    return _manager(str(Path(cfg.include_path).resolve()) if cfg.include_path else None)


@lru_cache(maxsize=4)
def _manager(include_path: str | None):
    from lm_eval.tasks import TaskManager

    if include_path is not None and not Path(include_path).is_dir():
        raise ConfigError(f"--include-path {include_path} is not a folder; give the folder holding your task YAMLs")
    return TaskManager(include_path=include_path) if include_path else TaskManager()


def check_tasks(cfg: BenchmarkConfig, manager=None) -> None:
    """ConfigError (one line) naming every task lm-eval does not know, before any model is loaded."""
    manager = manager or task_manager(cfg)
    unknown = [t for t in cfg.tasks if t not in manager.all_tasks]
    if unknown:
        where = f" (nor in --include-path {cfg.include_path})" if cfg.include_path else ""
        raise ConfigError(f"--tasks: lm-eval has no task {', '.join(map(repr, unknown))}{where}; "
                          "`lm-eval ls tasks` lists them, or give --include-path DIR with your task YAML")


def evaluate_lm(lm, cfg: BenchmarkConfig, manager=None) -> dict:
    """lm_eval.simple_evaluate of `lm` on cfg.tasks; lm-eval's results dict (with per-sample logs)."""
    from lm_eval import simple_evaluate

    return simple_evaluate(model=lm, tasks=list(cfg.tasks), num_fewshot=cfg.num_fewshot, limit=cfg.limit,
                           task_manager=manager or task_manager(cfg), log_samples=True, bootstrap_iters=0,
                           apply_chat_template=cfg.apply_chat_template,
                           random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)


def run_tasks(base, adapters: dict[str, str], cfg: BenchmarkConfig, ignore_base_mismatch: bool = False) -> list[dict]:
    """Every task's metrics for the bare base and each adapter: rows of task, metric, then one value per model."""
    return task_rows({name: res["results"] for name, res in
                      evaluate_models(base, adapters, cfg, ignore_base_mismatch).items()})


def evaluate_models(base, adapters: dict[str, str], cfg: BenchmarkConfig,
                    ignore_base_mismatch: bool = False) -> dict[str, dict]:
    """lm-eval's results dict (per-sample logs included) for the bare base and for each adapter, by name.

    base: a bare mlxlora.models.Base (left bare). adapters: name -> folder. Raises ConfigError for an
    unknown task, AdapterError for an adapter that does not fit."""
    manager = task_manager(cfg)
    check_tasks(cfg, manager)
    multi = MultiAdapterModel.of_base(base, ignore_base_mismatch)
    results = {}
    try:
        for name, folder in adapters.items():
            multi.load_adapter(folder, name)
        lm = make_lm(base, cfg.batch_size, cfg.max_tokens)
        for name in [None, *adapters]:
            with multi.set_adapter(name):
                results[name or BASE] = evaluate_lm(lm, cfg, manager)
    finally:
        for name in multi.adapters:
            multi.delete_adapter(name)
    return results


# lm-eval's result keys kept in eval_tasks.json (per-sample logs and task configs stay out: large, and the
# configs hold functions)
KEPT = ("results", "n-shot", "versions", "higher_is_better", "n-samples")


def tasks_report(model: str, adapters: dict[str, str], cfg: BenchmarkConfig, results: dict[str, dict]) -> dict:
    """What eval_tasks.json holds: the run's settings, the table's rows and lm-eval's results per model."""
    return {"model": model, "adapters": adapters, "tasks": list(cfg.tasks), "include_path": cfg.include_path,
            "limit": cfg.limit, "num_fewshot": cfg.num_fewshot, "apply_chat_template": cfg.apply_chat_template,
            "rows": task_rows({n: r["results"] for n, r in results.items()}),
            "lm_eval": {n: {k: r[k] for k in KEPT if k in r} for n, r in results.items()}}


def task_rows(results: dict[str, dict]) -> list[dict]:
    """{model: lm-eval results} -> [{"task", "metric", "values": {model: value}}] (stderr entries left out)."""
    models = list(results)
    first = results[models[0]]
    rows = []
    for task, metrics in first.items():
        for key, value in metrics.items():
            if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
                continue  # lm-eval names metrics "metric,filter"; alias, sample_len and stderrs are not scores
            metric = key.split(",")[0]  # lm-eval writes "acc,none": metric, filter
            rows.append({"task": task, "metric": metric,
                         "values": {m: results[m].get(task, {}).get(key) for m in models}})
    return rows


def format_task_table(rows: list[dict]) -> str:
    """task_rows as an aligned table, base first, one column per model."""
    if not rows:
        return "no metrics"
    models = list(rows[0]["values"])
    tw = max(len("task"), *(len(r["task"]) for r in rows))
    mw = max(len("metric"), *(len(r["metric"]) for r in rows))
    cols = [max(8, len(m)) for m in models]
    lines = [f"{'task':<{tw}}  {'metric':<{mw}}  " + "  ".join(f"{m:>{w}}" for m, w in zip(models, cols))]
    for r in rows:
        vals = ["-" if r["values"][m] is None else f"{r['values'][m]:.4f}" for m in models]
        lines.append(f"{r['task']:<{tw}}  {r['metric']:<{mw}}  " + "  ".join(f"{v:>{w}}" for v, w in zip(vals, cols)))
    return "\n".join(lines)


__all__ = ["INSTALL", "make_lm", "task_manager", "check_tasks", "evaluate_lm", "run_tasks", "evaluate_models",
           "tasks_report", "task_rows", "format_task_table"]
