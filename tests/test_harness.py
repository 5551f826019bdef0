"""`mlxlora eval --tasks`: the lm-eval model class over mlxlora's base (and unfused adapters) against lm-eval's own
`hf` model on the same tiny transformers model, on three local tasks (tests/data/lmeval: multiple choice,
rolling log-likelihood, generate_until): equal accuracy and answers, log-likelihoods within 1e-4."""

from pathlib import Path

import pytest

import tiny
from mlxlora.config import BenchmarkConfig, LoraConfig
from mlxlora.errors import ConfigError
from mlxlora.evaluate.harness import check_tasks, evaluate_lm, make_lm, run_tasks, task_manager
from mlxlora.models import load_base

pytestmark = pytest.mark.peer
TASKS = Path(__file__).parent / "data" / "lmeval"
NAMES = ["mlxlora_tiny_mc", "mlxlora_tiny_text", "mlxlora_tiny_qa"]
TOL = 1e-4


@pytest.fixture
def in_tasks(monkeypatch):
    monkeypatch.chdir(TASKS)  # the task YAMLs name their data files relative to the folder lm-eval runs in
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _loglikelihoods(results):
    """{task: [per-request response values]} from lm-eval's per-sample logs."""
    out = {}
    for task, samples in results["samples"].items():
        out[task] = [r for s in sorted(samples, key=lambda s: s["doc_id"]) for r in s["resps"]]
    return out


@pytest.fixture(scope="module")
def hf_results(tiny_dirs, tmp_path_factory):
    """lm-eval's own hf model on the tiny llama (float32, CPU) over the three tasks."""
    import os

    from lm_eval.models.huggingface import HFLM

    here = os.getcwd()
    os.chdir(TASKS)
    try:
        cfg = BenchmarkConfig(tasks=NAMES, include_path=str(TASKS))
        hf = HFLM(pretrained=str(tiny_dirs["llama"]), device="cpu", dtype="float32", batch_size=4)
        return evaluate_lm(hf, cfg)
    finally:
        os.chdir(here)


def _assert_same(ours, theirs, names):
    """lm-eval's aggregate metrics equal (accuracies exactly) and every request's answer within TOL; the count."""
    for task in names:
        mine, hf = ours["results"][task], theirs["results"][task]
        for key, value in hf.items():
            if isinstance(value, float) and "stderr" not in key:
                tol = 0 if key.startswith(("acc", "exact_match")) else 1e-4 * max(1.0, abs(value))
                assert mine[key] == pytest.approx(value, abs=tol), (task, key)
    a, b = _loglikelihoods(ours), _loglikelihoods(theirs)
    n = 0
    for task in names:
        assert len(a[task]) == len(b[task]) > 0
        for x, y in zip(a[task], b[task]):
            x, y = x[0], y[0]
            if isinstance(y, str):  # generate_until: the same greedy answer
                assert x == y, task
            elif isinstance(y, (list, tuple)):  # loglikelihood: (log p, is greedy)
                assert x[0] == pytest.approx(y[0], abs=TOL) and bool(x[1]) == bool(y[1]), task
            else:  # loglikelihood_rolling: one log p per document
                assert x == pytest.approx(y, abs=TOL), task
            n += 1
    return n


def test_mlx_lm_matches_lm_evals_hf_model(tiny_dirs, hf_results, in_tasks):
    cfg = BenchmarkConfig(tasks=NAMES, include_path=str(TASKS))
    ours = evaluate_lm(make_lm(load_base(str(tiny_dirs["llama"])), batch_size=3), cfg)
    n = _assert_same(ours, hf_results, NAMES)
    print(f"{n} requests: mlxlora's lm-eval model == lm-eval's hf model (log-likelihoods within {TOL})")


def test_chat_template_matches_lm_evals_hf_model(tiny_dirs, hf_results, in_tasks):
    """--apply-chat-template: the same prompts as lm-eval's hf model with its apply_chat_template (ChatML here),
    one few-shot example as turns; the log-likelihoods really moved from the plain run."""
    from lm_eval.models.huggingface import HFLM

    names = ["mlxlora_tiny_mc", "mlxlora_tiny_qa"]
    cfg = BenchmarkConfig(tasks=names, include_path=str(TASKS), apply_chat_template=True, num_fewshot=1)
    hf = evaluate_lm(HFLM(pretrained=str(tiny_dirs["llama"]), device="cpu", dtype="float32", batch_size=4), cfg)
    ours = evaluate_lm(make_lm(load_base(str(tiny_dirs["llama"])), batch_size=3), cfg)
    n = _assert_same(ours, hf, names)
    prompt = ours["samples"]["mlxlora_tiny_mc"][0]["arguments"][0][0]  # the first choice's (context, continuation)
    assert prompt.count("<|im_start|>user") == 2 and prompt.endswith("<|im_start|>assistant\n"), prompt
    chat, plain = _loglikelihoods(ours)["mlxlora_tiny_mc"], _loglikelihoods(hf_results)["mlxlora_tiny_mc"]
    assert all(c[0][0] != pytest.approx(p[0][0], abs=1e-3) for c, p in zip(chat, plain))
    print(f"{n} chat-templated requests: mlxlora == lm-eval's hf model")


def test_chat_template_fallback_is_trainings(tiny_dirs, tmp_path, in_tasks, cli):
    """A tokenizer without a chat template: requests rendered with the fallback template, as training rendered a
    prompt/completion row (the training text starts with the prefilled request)."""
    import json
    import shutil

    from mlxlora.data import TokenizerInfo, render_fallback_template

    src = tmp_path / "plain"
    shutil.copytree(tiny_dirs["llama"], src)
    tok_cfg = json.loads((src / "tokenizer_config.json").read_text())
    del tok_cfg["chat_template"]
    (src / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    lm = make_lm(load_base(str(src)))
    info = TokenizerInfo.from_tokenizer(lm.tokenizer)
    assert not info.has_template
    turn = [{"role": "user", "content": "What is 2+2?"}]
    trained = render_fallback_template([*turn, {"role": "assistant", "content": "4"}], info.eos_token)
    assert lm.apply_chat_template(turn) == "### User:\nWhat is 2+2?\n\n### Assistant:\n"
    prefilled = lm.apply_chat_template([*turn, {"role": "assistant", "content": "4"}], add_generation_prompt=False)
    assert trained.startswith(prefilled) and prefilled.endswith("Assistant:\n4")
    assert lm.chat_template(True).startswith("{% for message in messages %}")
    res = cli("eval", "--tasks", "mlxlora_tiny_mc", "--include-path", TASKS, "--model", src, "--limit", 2,
              "--apply-chat-template")
    assert res.exit_code == 0, res.output
    assert "has no chat template" in res.output and "fallback format" in res.output


def test_adapters_in_one_table_and_unfused(tiny_dirs, tmp_path, in_tasks):
    src = tiny_dirs["llama"]
    adapter = tiny.make_adapter(src, tmp_path / "qv", LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), seed=3,
                                size=0.3)
    cfg = BenchmarkConfig(tasks=["mlxlora_tiny_mc", "mlxlora_tiny_text"], include_path=str(TASKS))
    rows = run_tasks(load_base(str(src)), {"qv": str(adapter)}, cfg)
    from mlxlora.inference import load_with_adapter

    alone = evaluate_lm(make_lm(load_with_adapter(str(src), str(adapter))), cfg)["results"]
    bare = evaluate_lm(make_lm(load_base(str(src))), cfg)["results"]
    by = {(r["task"], r["metric"]): r["values"] for r in rows}
    assert by[("mlxlora_tiny_mc", "acc")]["qv"] == alone["mlxlora_tiny_mc"]["acc,none"]
    assert by[("mlxlora_tiny_mc", "acc")]["base"] == bare["mlxlora_tiny_mc"]["acc,none"]
    ppl = by[("mlxlora_tiny_text", "word_perplexity")]
    assert ppl["qv"] == pytest.approx(alone["mlxlora_tiny_text"]["word_perplexity,none"], rel=1e-5)
    assert ppl["base"] == pytest.approx(bare["mlxlora_tiny_text"]["word_perplexity,none"], rel=1e-5)
    assert ppl["qv"] != pytest.approx(ppl["base"], rel=1e-3)  # the adapter is really on


def test_eval_tasks_cli(tiny_dirs, in_tasks, cli):
    src = tiny_dirs["llama"]
    res = cli("eval", "--tasks", "mlxlora_tiny_mc", "--include-path", TASKS, "--model", src, "--limit", 4)
    assert res.exit_code == 0, res.output
    assert "mlxlora_tiny_mc" in res.output and "acc_norm" in res.output and "base" in res.output
    tiny.one_line_error(cli("eval", "--tasks", "no_such_task", "--include-path", TASKS, "--model", src),
                        "lm-eval has no task 'no_such_task'", "--include-path")
    tiny.one_line_error(cli("eval", "--tasks", "mlxlora_tiny_mc", "--model", src, "--data", TASKS),
                        "--data is not read with --tasks")
    tiny.one_line_error(cli("eval", "--apply-chat-template", "--model", src, "--data", TASKS),
                        "--apply-chat-template is only read with --tasks")


def test_eval_tasks_out_writes_lm_evals_results_and_keeps_an_old_one(tiny_dirs, in_tasks, cli, tmp_path):
    import json

    src, out = tiny_dirs["llama"], tmp_path / "bench"
    args = ["eval", "--tasks", "mlxlora_tiny_mc", "--include-path", TASKS, "--model", src, "--limit", 4, "--out", out]
    res = cli(*args)
    assert res.exit_code == 0, res.output
    report = json.loads((out / "eval_tasks.json").read_text())
    assert f"report: {out / 'eval_tasks.json'}" in res.output
    lm = report["lm_eval"]["base"]
    row = next(r for r in report["rows"] if r["metric"] == "acc")
    assert row["values"]["base"] == lm["results"]["mlxlora_tiny_mc"]["acc,none"]  # the table is lm-eval's number
    assert report["limit"] == 4 and report["tasks"] == ["mlxlora_tiny_mc"] and "mlxlora_tiny_mc" in lm["n-shot"]
    before = (out / "eval_tasks.json").read_bytes()
    tiny.one_line_error(cli(*args), "eval_tasks.json", "--force")  # refused before any task runs
    assert (out / "eval_tasks.json").read_bytes() == before
    assert cli(*args, "--force").exit_code == 0
    tiny.one_line_error(cli("eval", "--tasks", "mlxlora_tiny_mc", "--include-path", TASKS, "--model", src, "--force"),
                        "--force with --tasks", "--out")
    tiny.one_line_error(cli("eval", "--model", src, "--data", TASKS, "--out", out), "--out is only read with")


def test_unknown_task_is_named_before_loading(in_tasks):
    cfg = BenchmarkConfig(tasks=["mlxlora_tiny_mc", "nope"], include_path=str(TASKS))
    with pytest.raises(ConfigError, match="no task 'nope'"):
        check_tasks(cfg, task_manager(cfg))
