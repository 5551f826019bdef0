"""The demo: QLoRA on the real SmolLM2-135M-Instruct (4-bit, from its GGUF) with The Devil's Dictionary.

Shows held-out perplexity and two greedy generations before and after training.
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .config import EvalConfig, GenerateConfig, LoraConfig, TrainConfig
from .errors import AdapterError, DataError
from .inference import eval_split, generate_text, load_with_adapter
from .models.demo import ensure_demo_model
from .train import train

# The demo's training recipe, sized for a laptop CPU: on the 2-core Linux machines this project is
# tested on, a step takes ~3 s when nothing else runs, so the 60 steps (240 samples) take ~3 minutes.
DEMO_LORA = LoraConfig(r=16, lora_alpha=32.0, target_modules="all-linear", lora_dropout=0.0)
DEMO_TRAIN = dict(iters=60, batch_size=4, lr=1e-3, warmup=5, schedule="cosine", max_seq_length=192,
                  val_every=30, save_every=30, report_every=5, seed=0)
DEMO_GENERATE = GenerateConfig(max_tokens=80, temp=0.0)


def demo_data_dir() -> Path:
    """examples/devil in the source checkout this package runs from."""
    here = Path(__file__).resolve().parent.parent / "examples" / "devil"
    if not (here / "train.jsonl").is_file():
        raise DataError(f"demo data not found at {here}; run the demo from a clone of the mlxlora repository")
    return here


def _prompts(data_dir: Path, n: int = 2) -> list[str]:
    rows = [json.loads(line) for line in (data_dir / "test.jsonl").read_text().splitlines() if line.strip()]
    return [r["prompt"] for r in rows[:n]]


def run_demo(out: str | None = None, iters: int | None = None, force: bool = True, console: Console | None = None):
    con = console or Console()
    data_dir = demo_data_dir()
    model_dir = ensure_demo_model()
    out_dir = Path(out or "runs/demo")
    if force and out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / "mlxlora.json").is_file():
        raise AdapterError(f"--out {out_dir} holds files that are not an earlier demo's adapter; the demo replaces "
                           "only its own runs: choose another --out")
    prompts = _prompts(data_dir)
    ecfg = EvalConfig(split="test", batch_size=8, max_seq_length=DEMO_TRAIN["max_seq_length"])

    con.rule("[bold]before: SmolLM2-135M-Instruct, 4-bit, no adapter")
    base = load_with_adapter(str(model_dir))
    before = eval_split(base, str(data_dir), ecfg)
    gens_before = [generate_text(base, p, DEMO_GENERATE) for p in prompts]
    con.print(f"test perplexity: {before['perplexity']:.2f}")

    con.rule("[bold]training (QLoRA, rank 16, all linear layers)")
    tcfg = TrainConfig(model=str(model_dir), data=str(data_dir), adapter_path=str(out_dir), lora=DEMO_LORA,
                       force=force, **dict(DEMO_TRAIN, **({"iters": iters} if iters else {})))
    base.model.train()
    train(tcfg, base=base, console=Console(stderr=True))

    con.rule("[bold]after")
    tuned = load_with_adapter(str(model_dir), str(out_dir))
    after = eval_split(tuned, str(data_dir), ecfg)
    gens_after = [generate_text(tuned, p, DEMO_GENERATE) for p in prompts]

    table = Table(title="held-out test set (The Devil's Dictionary)")
    for col in ("", "loss", "perplexity"):
        table.add_column(col)
    table.add_row("before", f"{before['loss']:.3f}", f"{before['perplexity']:.2f}")
    table.add_row("after", f"{after['loss']:.3f}", f"{after['perplexity']:.2f}")
    con.print(table)
    for p, b, a in zip(prompts, gens_before, gens_after):
        con.print(f"\n[bold]{p}[/bold]\n[red]before:[/red] {b.strip()}\n[green]after:[/green]  {a.strip()}")
    con.print(f"\nadapter: {out_dir}  (try: mlxlora generate --model {model_dir} --adapter {out_dir} "
              f"--prompt 'Define \"politics\" in the style of The Devil\\'s Dictionary.')")
    return {"before": before, "after": after, "generations": list(zip(prompts, gens_before, gens_after))}
