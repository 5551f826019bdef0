"""`mlxlora eval --generate`: metric values against the peer libraries (rouge-score, sacrebleu, lm-eval's copy of
the SQuAD script), answers against mlx-lm's own generation of the same model, the report files, and the
one-line errors (a row without a reference, an unknown metric, a report already there)."""

import json
import sys

import pytest

import tiny
from mlxlora.config import GenerativeEvalConfig, LoraConfig
from mlxlora.errors import ConfigError, DataError
from mlxlora.evaluate import generative_eval
from mlxlora.evaluate.generative import generate_answers
from mlxlora.evaluate.metrics import METRICS, normalize_answer, resolve_metrics
from mlxlora.evaluate.rows import read_eval_rows
from mlxlora.models import load_base

PAIRS = [  # (prediction, reference)
    ("The cat sat on the mat.", "the cat sat on the mat"),
    ("the cat on the mat", "The cat sat on the mat"),
    ("Paris is the capital of France", "Paris"),
    ("  42 \n", "42"),
    ("running dogs ran quickly", "the dog runs quickly"),
    ("completely different words", "nothing alike here"),
    ("An apple a day, keeps the doctor away!", "apple day keeps doctor away"),
    ("", "something"),
]
ROWS = [
    {"prompt": "Say hi.", "completion": "hi there"},
    {"prompt": "What is two plus two? Answer in a word.", "completion": "four"},
    {"prompt": "Name a colour", "completion": "red"},
    {"prompt": "Spell cat backwards, then forwards, then backwards again please", "completion": "tac cat tac"},
    {"prompt": "x", "completion": "y"},
]


def test_metrics_match_the_peer_libraries():
    from rouge_score import rouge_scorer
    import sacrebleu
    from lm_eval.tasks.qasper.metrics import f1_abstractive, normalize_answer as squad_normalize

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    for pred, ref in PAIRS:
        assert METRICS["rougeL"].fn(pred, ref, {}) == scorer.score(ref, pred)["rougeL"].fmeasure
        assert METRICS["chrf"].fn(pred, ref, {}) == pytest.approx(sacrebleu.sentence_chrf(pred, [ref]).score / 100)
        assert normalize_answer(pred) == squad_normalize(pred)
        if normalize_answer(pred) and normalize_answer(ref):  # lm-eval's copy divides by zero on empty answers
            assert METRICS["token_f1"].fn(pred, ref, {}) == pytest.approx(f1_abstractive([pred], [ref]))
        assert METRICS["normalized_exact"].fn(pred, ref, {}) == float(squad_normalize(pred) == squad_normalize(ref))
    # values worked out by hand
    assert METRICS["rougeL"].fn("the cat on the mat", "the cat sat on the mat", {}) == pytest.approx(2 * 5 / 6 / (1 + 5 / 6))
    assert METRICS["token_f1"].fn("Paris is the capital of France", "Paris", {}) == pytest.approx(2 * 0.2 / 1.2)
    assert [METRICS["exact"].fn(p, r, {}) for p, r in PAIRS] == [0, 0, 0, 1, 0, 0, 0, 0]
    assert [METRICS["normalized_exact"].fn(p, r, {}) for p, r in PAIRS] == [1, 0, 0, 1, 0, 0, 1, 0]
    assert [METRICS["contains"].fn(p, r, {}) for p, r in PAIRS] == [1, 0, 1, 1, 0, 0, 1, 0]
    assert METRICS["contains"].fn("Parisian food", "Paris", {}) == 0.0  # whole words only


def test_unknown_and_user_metrics(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="'bleu' is not a metric; use one of exact"):
        resolve_metrics(["bleu"])
    with pytest.raises(ConfigError, match="cannot import 'nomodule'"):
        resolve_metrics(["nomodule:f"])
    (tmp_path / "mymetrics.py").write_text(
        "def length_ratio(prediction, reference, row):\n    return len(prediction) / len(reference)\n"
        "def bad(prediction, reference, row):\n    return 'high'\n")
    monkeypatch.chdir(tmp_path)
    (m,) = resolve_metrics(["mymetrics:length_ratio"])
    assert m.fn("abcd", "ab", {}) == 2.0
    with pytest.raises(ConfigError, match="has no function 'nothing'"):
        resolve_metrics(["mymetrics:nothing"])


@pytest.fixture(scope="module")
def setup(tiny_dirs, tmp_path_factory):
    """The tiny llama, an adapter that changes its greedy text, and a data folder with test.jsonl."""
    root = tmp_path_factory.mktemp("evaluate")
    src = tiny_dirs["llama"]
    adapter = tiny.make_adapter(src, root / "qv", LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), seed=3,
                                size=0.3)
    data = root / "data"
    data.mkdir()
    (data / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return src, adapter, data


def _mlx_lm_answer(model, tokenizer, ids, max_tokens):
    from mlx_lm import generate

    return generate(model, tokenizer, ids, max_tokens=max_tokens)


def test_answers_are_mlx_lm_greedy_answers_batched_or_not(setup):
    src, adapter, data = setup
    base = load_base(str(src))
    rows = read_eval_rows(data / "test.jsonl", base.tokenizer)
    # prompt/completion rows ask the prompt as a user turn (the tiny tokenizer has a chat template)
    assert rows[0].ids == list(base.tokenizer.apply_chat_template([{"role": "user", "content": "Say hi."}],
                                                                  add_generation_prompt=True))
    expected = [_mlx_lm_answer(base.model, base.tokenizer, r.ids, 12) for r in rows]
    assert generate_answers(base.model, base.tokenizer, rows, 12, batch_size=1) == expected
    assert generate_answers(base.model, base.tokenizer, rows, 12, batch_size=5) == expected
    assert len(set(expected)) > 1 and all(expected)


def test_generative_eval_scores_base_and_adapter(setup):
    from mlxlora.inference import load_with_adapter

    src, adapter, data = setup
    cfg = GenerativeEvalConfig(max_tokens=12, batch_size=3)
    report = generative_eval(load_base(str(src)), {"qv": str(adapter)}, str(data), cfg)
    assert report["models"] == ["base", "qv"] and report["rows"] == len(ROWS) and report["primary"] == "token_f1"
    tuned = load_with_adapter(str(src), str(adapter))  # the adapter on its own, as `generate` would load it
    rows = read_eval_rows(data / "test.jsonl", tuned.tokenizer)
    alone = [_mlx_lm_answer(tuned.model, tuned.tokenizer, r.ids, 12) for r in rows]
    assert [it["answers"]["qv"] for it in report["items"]] == alone
    assert [it["answers"]["qv"] for it in report["items"]] != [it["answers"]["base"] for it in report["items"]]
    import sacrebleu

    for name in ("base", "qv"):
        for it in report["items"]:
            assert it["scores"][name]["chrf"] == pytest.approx(
                sacrebleu.sentence_chrf(it["answers"][name], [it["reference"]]).score / 100)
        for m in report["metrics"]:
            assert report["means"][name][m] == pytest.approx(
                sum(it["scores"][name][m] for it in report["items"]) / len(ROWS))
    ch = report["changes"]["qv"]
    for i, it in enumerate(report["items"]):
        a, b = it["scores"]["qv"]["token_f1"], it["scores"]["base"]["token_f1"]
        assert (i in ch["fixed"], i in ch["broke"]) == (a > b, a < b)


def test_rows_without_a_reference_are_refused(setup, tmp_path):
    src, _, _ = setup
    tok = load_base(str(src)).tokenizer
    bad = tmp_path / "test.jsonl"
    bad.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps({"text": "just text"}) + "\n")
    with pytest.raises(DataError, match=r"test.jsonl:2: a 'text' row has no reference"):
        read_eval_rows(bad, tok)
    bad.write_text(json.dumps({"prompt": "p", "completion": "  "}) + "\n")
    with pytest.raises(DataError, match=r"test.jsonl:1: the completion is empty"):
        read_eval_rows(bad, tok)
    chat = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "colour?"},
                         {"role": "assistant", "content": "red"}, {"role": "user", "content": "thanks"}]}
    bad.write_text(json.dumps(chat) + "\n")
    (row,) = read_eval_rows(bad, tok)  # the reference is the last assistant turn; the prompt what came before it
    assert row.reference == "red" and row.prompt == "colour?"
    assert row.ids == list(tok.apply_chat_template(chat["messages"][:2], add_generation_prompt=True))


def test_eval_generate_cli_writes_the_report_once(setup, tmp_path, monkeypatch, cli):
    src, adapter, data = setup
    out = tmp_path / "report"
    args = ["eval", "--generate", "--model", src, "--adapter", f"qv={adapter}", "--data", data, "--max-tokens", 6,
            "--metric", "exact,token_f1", "--out", out]
    res = cli(*args)
    assert res.exit_code == 0, res.output
    assert f"report: {out / 'eval_report.json'}" in res.output and f"report: {out / 'eval_report.html'}" in res.output
    report = json.loads((out / "eval_report.json").read_text())
    assert report["metrics"] == ["exact", "token_f1"] and report["model"] == str(src)
    assert "qv fixed" in res.output and "metric" in res.output
    html = (out / "eval_report.html").read_text()
    assert 'id="means"' in html and 'id="search"' in html and "<link" not in html and "src=" not in html
    before = (out / "eval_report.json").read_bytes()
    tiny.one_line_error(cli(*args), "eval_report.json already exists", "--force")
    assert (out / "eval_report.json").read_bytes() == before
    assert cli(*args, "--force").exit_code == 0
    # the current folder when --out is not given
    monkeypatch.chdir(tmp_path)
    res = cli("eval", "--generate", "--model", src, "--data", data, "--max-tokens", 4)
    assert res.exit_code == 0 and (tmp_path / "eval_report.html").is_file(), res.output


def test_eval_generate_cli_errors(setup, tmp_path, cli):
    src, adapter, data = setup
    base = ["eval", "--generate", "--model", src, "--data", data]
    tiny.one_line_error(cli(*base, "--metric", "bleu"), "--metric 'bleu' is not a metric")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "no answer here"}) + "\n")
    tiny.one_line_error(cli("eval", "--generate", "--model", src, "--data", bad, "--out", tmp_path),
                        "bad.jsonl:1: a 'text' row has no reference")
    assert not (tmp_path / "eval_report.json").exists()
    tiny.one_line_error(cli("eval", "--model", src, "--data", data, "--metric", "exact"),
                        "--metric is only read with --generate")
    tiny.one_line_error(cli(*base, "--tasks", "x"), "--generate and --tasks")


def test_missing_libraries_are_one_line_naming_the_pip_install(monkeypatch, tmp_path):
    from mlxlora.data.sources import prepare_data
    from mlxlora.evaluate import metrics
    from mlxlora.evaluate.harness import check_tasks
    from mlxlora.config import BenchmarkConfig

    metrics._rouge_scorer.cache_clear()
    monkeypatch.setitem(sys.modules, "rouge_score", None)
    monkeypatch.setitem(sys.modules, "sacrebleu", None)
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    monkeypatch.setitem(sys.modules, "datasets", None)
    try:
        with pytest.raises(ConfigError, match="--metric rougeL needs the rouge_score library .*; pip install rouge-score"):
            resolve_metrics(["exact", "rougeL"])
        with pytest.raises(ConfigError, match="pip install sacrebleu"):
            resolve_metrics(["chrf"])
    finally:
        metrics._rouge_scorer.cache_clear()
    with pytest.raises(ConfigError, match=r"--tasks needs lm-evaluation-harness; pip install 'mlxlora\[eval\]'"):
        check_tasks(BenchmarkConfig(tasks=["arc_easy"]))
    with pytest.raises(ConfigError, match="needs the datasets library; pip install datasets"):
        prepare_data("org/name", root=tmp_path)
