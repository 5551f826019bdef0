"""GRPO rewards (built-ins, user code, weights, bad specs) and prompt rows (formats, one-line errors)."""

import json
import re

import numpy as np
import pytest

from mlxlora.config.grpo import GRPOConfig
from mlxlora.errors import ConfigError, DataError
from mlxlora.train.rewards import final_answer, parse_rewards, same_answer, score


@pytest.mark.parametrize("text, expected", [
    ("so the answer is \\boxed{42}.", "42"),
    ("first \\boxed{1} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("Natalia sold 48 clips... #### 72\nthanks", "72"),
    ("3 apples and 4 pears make 7", "7"),
    ("total: 1,000 dollars", "1,000"),
    ("it is -2.5 degrees", "-2.5"),
    ("no digits here\n\n  Paris  \n", "Paris"),
    ("", None),
    ("\\boxed{unclosed 5", "5"),
])
def test_final_answer_rules(text, expected):
    assert final_answer(text) == expected


@pytest.mark.parametrize("pred, answer, same", [
    ("1,000", "1000", True), ("72.0", "72", True), ("72", "#### 72", True), ("$5$", "5", True),
    ("Paris.", "paris", True), ("7", "8", False), (None, "1", False), ("3", "\\boxed{3}", True),
    ("1e3", "1000", False),  # not a number by the rule above: compared as text
])
def test_same_answer(pred, answer, same):
    assert same_answer(pred, answer) is same


def _score(cfg, completions, ids, answers):
    return score(parse_rewards(cfg), ["p"] * len(completions), completions, ids, {"answer": answers})


def test_builtins_score_each_completion():
    cfg = GRPOConfig(rewards=("exact", "format:0.5", "length"), max_completion_length=10)
    r = _score(cfg, ["so \\boxed{4}", "it is 5", "4"], [[1, 2, 3], [1] * 10, [1]], ["4", "4", "4"])
    np.testing.assert_array_equal(r, [[1.0, 1.0, -0.3], [0.0, 0.0, -1.0], [1.0, 0.0, -0.1]])
    assert [x.weight for x in parse_rewards(cfg)] == [1.0, 0.5, 1.0]


def test_user_rewards_from_a_file_and_a_module(tmp_path, monkeypatch):
    f = tmp_path / "my_rewards.py"
    f.write_text("def starts_with_a(prompts, completions, **kw):\n"
                 "    return [1.0 if c.startswith('a') else None for c in completions]\n"
                 "def uses_answer(prompts, completions, answer, level, **kw):\n"
                 "    return [float(len(c) == int(a)) * lv for c, a, lv in zip(completions, answer, level)]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = GRPOConfig(rewards=(f"{f}:starts_with_a:2", "my_rewards:uses_answer"))
    rs = parse_rewards(cfg)
    assert [(r.name, r.weight, r.spec) for r in rs] == [("starts_with_a", 2.0, f"{f}:starts_with_a:2"),
                                                        ("uses_answer", 1.0, "my_rewards:uses_answer")]
    out = score(rs, ["p", "p"], ["ab", "xyz"], [[1], [2]], {"answer": ["2", "3"], "level": [0.5, 3.0]})
    assert np.isnan(out[1, 0]) and out[0, 0] == 1.0
    np.testing.assert_array_equal(out[:, 1], [0.5, 3.0])


@pytest.mark.parametrize("spec, needle", [
    ("exatc", "unknown reward 'exatc'"),
    ("no_such_module_xyz:fn", "cannot import 'no_such_module_xyz'"),
    ("json:no_such_fn", "'no_such_fn' is not defined there"),
    ("json:__doc__", "'__doc__' is not callable"),
    ("missing/file.py:fn", "missing/file.py is not a file"),
    ("exact:inf", "the weight must be a finite number"),
])
def test_bad_reward_specs_are_one_line_errors(spec, needle):
    with pytest.raises(ConfigError, match="--reward") as e:
        parse_rewards(GRPOConfig(rewards=(spec,)))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_a_reward_returning_the_wrong_count_or_type_is_named(tmp_path):
    f = tmp_path / "bad.py"
    f.write_text("def short(prompts, completions, **kw):\n    return [1.0]\n"
                 "def text(prompts, completions, **kw):\n    return ['yes'] * len(completions)\n"
                 "def boom(prompts, completions, **kw):\n    return [1 / 0]\n")
    for fn, needle in (("short", "returned 1 values for 2 completions"), ("text", "returned 'yes'"),
                       ("boom", f"raised ZeroDivisionError: division by zero (at {f}:6)")):
        with pytest.raises(ConfigError, match=re.escape(needle)):
            score(parse_rewards(GRPOConfig(rewards=(f"{f}:{fn}",))), ["p"] * 2, ["a", "b"], [[1], [2]], {})
    broken = tmp_path / "broken.py"
    broken.write_text("import no_such_dependency_abc\n")
    with pytest.raises(ConfigError, match="importing .*broken.py failed: ModuleNotFoundError"):
        parse_rewards(GRPOConfig(rewards=(f"{broken}:f",)))


def test_config_refuses_bad_values():
    for kw, needle in ((dict(group_size=1), "--group-size"), (dict(epsilon=1.5), "--epsilon"),
                       (dict(top_p=0.0), "--top-p"), (dict(rewards=()), "at least one --reward"),
                       (dict(format_pattern="("), "--format-pattern"), (dict(temperature=0.0), "--temperature")):
        with pytest.raises(ConfigError, match=needle):
            GRPOConfig(**kw)


# -- prompt rows -------------------------------------------------------------------------------------------
def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_prompt_rows_render_as_sft_renders_the_user_turn(tiny_dirs, tmp_path):
    from mlxlora.data.prompts import load_prompts
    from mlxlora.models import load_base

    tok = load_base(str(tiny_dirs["llama"])).tokenizer
    f = _write(tmp_path / "p.jsonl", [{"prompt": "2+2?", "answer": 4, "level": 1}, {"prompt": "3+3?", "answer": "6"}])
    rows = load_prompts(f, tok)
    want = tok.apply_chat_template([{"role": "user", "content": "2+2?"}], add_generation_prompt=True)
    assert rows[0].ids == want and rows[0].answer == "4" and rows[1].answer == "6" and rows[0].row["level"] == 1
    g = _write(tmp_path / "m.jsonl", [{"messages": [{"role": "system", "content": "be brief"},
                                                    {"role": "user", "content": "2+2?"}], "answer": "4"}])
    msgs = load_prompts(g, tok)[0]
    assert tok.decode(msgs.ids) == "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n" \
                                   "<|im_start|>assistant\n"


@pytest.mark.parametrize("row, needle", [
    ({"text": "x"}, "no 'prompt' or 'messages' key"),
    ({"prompt": "x"}, "no 'answer'"),
    ({"prompt": "x", "answer": [1]}, "'answer' must be a string or a number"),
    ({"prompt": "", "answer": "1"}, "'prompt' must be a non-empty string"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "answer": "1"},
     "ends with an assistant turn"),
    ({"messages": [{"role": "robot", "content": "a"}], "answer": "1"}, "messages[0] must be"),
    ("[1, 2]", "expected a JSON object"),
    ("{not json", "not valid JSON"),
])
def test_bad_prompt_rows_name_file_and_line(tiny_dirs, tmp_path, row, needle):
    from mlxlora.data.prompts import load_prompts
    from mlxlora.models import load_base

    tok = load_base(str(tiny_dirs["llama"])).tokenizer
    f = _write(tmp_path / "p.jsonl", [{"prompt": "ok", "answer": "1"}, row])
    with pytest.raises(DataError) as e:
        load_prompts(f, tok)
    assert str(e.value).startswith(f"{f}:2: ") and needle in str(e.value) and "\n" not in str(e.value)


def test_prompt_too_long_and_mixed_formats(tiny_dirs, tmp_path):
    from mlxlora.data.prompts import load_prompts
    from mlxlora.models import load_base

    tok = load_base(str(tiny_dirs["llama"])).tokenizer
    f = _write(tmp_path / "p.jsonl", [{"prompt": "x" * 50, "answer": "1"}])
    with pytest.raises(DataError, match=r"p.jsonl:1: the prompt has \d+ tokens, more than the 20"):
        load_prompts(f, tok, max_prompt_length=20)
    g = _write(tmp_path / "q.jsonl", [{"prompt": "a", "answer": "1"},
                                      {"messages": [{"role": "user", "content": "b"}], "answer": "2"}])
    with pytest.raises(DataError, match="q.jsonl:2: a 'messages' row, but line 1 is a 'prompt' row"):
        load_prompts(g, tok)


def test_prompt_split_counts_and_template(tiny_dirs, tmp_path):
    from mlxlora.data.prompts import load_prompt_split
    from mlxlora.models import load_base

    tok = load_base(str(tiny_dirs["llama"])).tokenizer
    f = _write(tmp_path / "p.jsonl", [{"prompt": "2+2?", "answer": 4}, {"prompt": "3+3?", "answer": 6}])
    split = load_prompt_split(f, tok)
    assert (split.stats.rows, split.stats.samples, split.stats.target_tokens) == (2, 2, 0)
    assert split.stats.tokens == sum(len(r.ids) for r in split.rows) and split.template == "tokenizer"
    assert split.template_text == tok.chat_template
