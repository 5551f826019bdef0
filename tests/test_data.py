"""Data layer: row formats, exact loss masks for three chat-template styles, errors, batching."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import tiny
from mlxlora.data.chat import fallback_prompt, render_fallback_template
from mlxlora.data import (Sample, collate, epoch_batches, find_split_files, inspect_split,
                          load_split)
from mlxlora.errors import ConfigError, DataError

LLAMA3 = (
    "{% for message in messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
GEMMA = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
# Like Qwen3: only the final assistant turn gets the (empty) think block, so prefixes differ.
QWEN3ISH = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' and loop.last %}"
    "{{ '<|im_start|>assistant\n<think>\n\n</think>\n\n' + message['content'] + '<|im_end|>\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATML_TOOLS = ("{% if tools %}{{ '<|im_start|>system\n' + (tools | tojson) + '<|im_end|>\n' }}{% endif %}"
                + tiny.CHATML)


def make_tok(path: Path, template=tiny.CHATML, specials=(), bos=None, eos="<|im_end|>", hf=False):
    """The tiny byte-level tokenizer with extra special tokens, another template, optional auto-BOS."""
    from mlx_lm.tokenizer_utils import load
    from tokenizers import Tokenizer, processors

    tiny.make_tokenizer(path)
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    tok.add_special_tokens(list(specials))
    if bos is not None:  # adds BOS to plain text, like Llama-3 / Gemma tokenizers
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
    tok.save(str(path / "tokenizer.json"))
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    cfg.update(bos_token=bos, eos_token=eos, chat_template=template)
    if template is None:
        del cfg["chat_template"]
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    if hf:
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(path)
    return load(path)


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    d = tmp_path_factory.mktemp("toks")
    return {
        "chatml": make_tok(d / "chatml"),
        "chatml_hf": make_tok(d / "chatml_hf", hf=True),
        "llama3": make_tok(d / "llama3", LLAMA3, ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                                  "<|end_header_id|>", "<|eot_id|>"],
                           bos="<|begin_of_text|>", eos="<|end_of_text|>"),
        "gemma": make_tok(d / "gemma", GEMMA, ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"],
                          bos="<bos>", eos="<eos>"),
        "qwen3": make_tok(d / "qwen3", QWEN3ISH),
        "tools": make_tok(d / "tools", CHATML_TOOLS),
        "base": make_tok(d / "base", None, eos="<|endoftext|>"),
    }


def write(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def expected(tok, pieces):
    """Token ids and mask from (text, is_target) pieces, each tokenized on its own."""
    ids, mask = [], []
    for text, target in pieces:
        part = tok.encode(text, add_special_tokens=False)
        ids += part
        mask += [target] * len(part)
    mask[0] = False
    return ids, mask


def one(tmp_path, tok, row, max_seq_length=4096) -> Sample:
    split = load_split(write(tmp_path / "train.jsonl", [row]), tok, max_seq_length)
    assert split.stats.samples == 1
    return split.samples[0]


CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "héllo 🙂"},
        {"role": "assistant", "content": "Hi!\nHow can I help?"}, {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4 ✓"}]


@pytest.mark.parametrize("name", ["chatml", "chatml_hf"])
def test_chatml_multi_turn_mask_token_by_token(tmp_path, toks, name):
    tok = toks[name]
    s = one(tmp_path, tok, {"messages": CHAT})
    ids, mask = expected(tok, [
        ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhéllo 🙂<|im_end|>\n"
         "<|im_start|>assistant\n", False),
        ("Hi!\nHow can I help?<|im_end|>", True),
        ("\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n", False),
        ("4 ✓<|im_end|>", True), ("\n", False)])
    assert s.ids == ids and s.mask == mask


def test_llama3_mask_no_double_bos(tmp_path, toks):
    tok = toks["llama3"]
    chat = [dict(m) for m in CHAT]
    chat[2]["content"] = "  Hi!\nHow can I help?\n"  # the template trims content
    s = one(tmp_path, tok, {"messages": chat})
    h = lambda role: f"<|start_header_id|>{role}<|end_header_id|>\n\n"  # noqa: E731
    ids, mask = expected(tok, [
        ("<|begin_of_text|>" + h("system") + "Be brief.<|eot_id|>" + h("user") + "héllo 🙂<|eot_id|>"
         + h("assistant"), False),
        ("Hi!\nHow can I help?<|eot_id|>", True),
        (h("user") + "2+2?<|eot_id|>" + h("assistant"), False),
        ("4 ✓<|eot_id|>", True)])
    assert s.ids == ids and s.mask == mask
    bos = tok.convert_tokens_to_ids("<|begin_of_text|>")
    assert s.ids.count(bos) == 1


def test_gemma_mask(tmp_path, toks):
    tok = toks["gemma"]
    s = one(tmp_path, tok, {"messages": CHAT[1:]})
    ids, mask = expected(tok, [
        ("<bos><start_of_turn>user\nhéllo 🙂<end_of_turn>\n<start_of_turn>model\n", False),
        ("Hi!\nHow can I help?<end_of_turn>", True),
        ("\n<start_of_turn>user\n2+2?<end_of_turn>\n<start_of_turn>model\n", False),
        ("4 ✓<end_of_turn>", True), ("\n", False)])
    assert s.ids == ids and s.mask == mask


def test_template_that_rewrites_past_turns(tmp_path, toks):
    # The last assistant turn renders with a think block the earlier one lacks.
    tok = toks["qwen3"]
    s = one(tmp_path, tok, {"messages": CHAT[1:]})
    ids, mask = expected(tok, [
        ("<|im_start|>user\nhéllo 🙂<|im_end|>\n<|im_start|>assistant\n", False),
        ("Hi!\nHow can I help?<|im_end|>", True),
        ("\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n", False),
        ("<think>\n\n</think>\n\n4 ✓<|im_end|>", True), ("\n", False)])
    assert s.ids == ids and s.mask == mask


def test_tools_are_rendered_and_not_targets(tmp_path, toks):
    tools = [{"type": "function", "function": {"name": "add", "parameters": {}}}]
    tok = toks["tools"]
    s = one(tmp_path, tok, {"messages": CHAT[1:3], "tools": tools})
    ids, mask = expected(tok, [
        ("<|im_start|>system\n" + json.dumps(tools) + "<|im_end|>\n"
         "<|im_start|>user\nhéllo 🙂<|im_end|>\n<|im_start|>assistant\n", False),
        ("Hi!\nHow can I help?<|im_end|>", True), ("\n", False)])
    assert s.ids == ids and s.mask == mask
    with pytest.raises(DataError, match=r"train\.jsonl:1: .*ignores 'tools'"):
        one(tmp_path, toks["chatml"], {"messages": CHAT[1:3], "tools": tools})


def test_fallback_template_for_base_models(tmp_path, toks):
    tok = toks["base"]
    s = one(tmp_path, tok, {"messages": CHAT})
    text = render_fallback_template(CHAT, "<|endoftext|>")
    assert text.startswith("### System:\nBe brief.\n\n### User:\nhéllo 🙂\n\n### Assistant:\nHi!")
    assert fallback_prompt("2+2?") == "### User:\n2+2?\n\n### Assistant:\n"
    ids, mask = expected(tok, [
        ("### System:\nBe brief.\n\n### User:\nhéllo 🙂\n\n### Assistant:\n", False),
        ("Hi!\nHow can I help?<|endoftext|>", True),
        ("\n\n### User:\n2+2?\n\n### Assistant:\n", False),
        ("4 ✓<|endoftext|>", True), ("\n\n", False)])
    assert s.ids == ids and s.mask == mask


def test_prompt_completion(tmp_path, toks):
    row = {"prompt": "2+2=", "completion": " 4"}
    base = toks["base"]  # no template: concatenated, loss on the completion + EOS
    s = one(tmp_path, base, row)
    assert (s.ids, s.mask) == expected(base, [("2+2=", False), (" 4<|endoftext|>", True)])
    chat = toks["chatml"]  # chat template: a user turn and an assistant turn
    s = one(tmp_path, chat, row)
    assert (s.ids, s.mask) == expected(chat, [("<|im_start|>user\n2+2=<|im_end|>\n<|im_start|>assistant\n", False),
                                              (" 4<|im_end|>", True), ("\n", False)])


def test_text_masks_everything_and_adds_eos_once(tmp_path, toks):
    tok = toks["chatml"]
    s = one(tmp_path, tok, {"text": "hello"})
    assert s.ids == tok.encode("hello<|im_end|>", add_special_tokens=False)
    assert s.mask == [False] + [True] * 5
    assert one(tmp_path, tok, {"text": "hello<|im_end|>"}).ids == s.ids
    llama = toks["llama3"]  # adds BOS to plain text, once
    s = one(tmp_path, llama, {"text": "hi"})
    assert s.ids == llama.encode("<|begin_of_text|>hi<|end_of_text|>", add_special_tokens=False)
    assert one(tmp_path, llama, {"text": "<|begin_of_text|>hi"}).ids == s.ids
    assert s.mask == [False, True, True, True]


def test_truncation_and_dropping(tmp_path, toks):
    tok = toks["chatml"]
    long_chat = {"messages": [{"role": "user", "content": "x" * 40}, {"role": "assistant", "content": "y"}]}
    rows = [{"messages": CHAT[1:3]}, long_chat, {"messages": CHAT[1:3]}]
    split = load_split(write(tmp_path / "train.jsonl", rows), tok, 40)
    st_ = split.stats
    assert (st_.rows, st_.samples, st_.dropped, st_.truncated) == (3, 2, 1, 2)
    assert all(len(s.ids) == 40 for s in split.samples)
    assert st_.tokens == 80 and st_.target_tokens == sum(sum(s.mask) for s in split.samples)
    with pytest.raises(DataError, match=r"train\.jsonl: all 1 rows were dropped.*--max-seq-length"):
        load_split(write(tmp_path / "train.jsonl", [long_chat]), tok, 40)
    with pytest.raises(ConfigError):
        load_split(tmp_path / "train.jsonl", tok, 1)


BAD = [
    (['{"text": "a"}', '{"text": '], 2, "not valid JSON"),
    (['[1, 2]'], 1, "expected a JSON object"),
    (['{"text": "a"}', '', '"just a string"'], 3, "expected a JSON object"),
    (['{"foo": 1}'], 1, "accepted rows"),
    (['{"prompt": "a"}'], 1, "no 'completion'"),
    (['{"prompt": "a", "completion": 3}'], 1, "'completion' must be a string"),
    (['{"text": null}'], 1, "'text' must be a string"),
    (['{"messages": "hi"}'], 1, "non-empty list"),
    (['{"messages": []}'], 1, "non-empty list"),
    (['{"messages": [["user", "hi"]]}'], 1, r"messages\[0\] must be an object"),
    (['{"messages": [{"content": "hi"}]}'], 1, "string 'role'"),
    (['{"messages": [{"role": "user", "content": 5}]}'], 1, r"messages\[0\]\['content'\] must be a string"),
    (['{"messages": [{"role": "user", "content": "hi"}]}'], 1, "no assistant message"),
    (['{"text": "a"}', '{"text": "b"}', '{"prompt": "a", "completion": "b"}'], 3, "one format per file"),
    (['{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "tools": 1}'],
     1, "'tools' must be a list"),
    (['{"text": "\\ud800"}'], 1, "unpaired surrogate"),
]


@pytest.mark.parametrize("lines,lineno,what", BAD)
def test_bad_rows_name_file_and_line(tmp_path, toks, lines, lineno, what):
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"^{path}:{lineno}: .*{what}") as e:
        load_split(path, toks["chatml"], 64)
    assert "\n" not in str(e.value)


def test_bad_bytes_template_errors_and_empty_files(tmp_path, toks):
    path = tmp_path / "valid.jsonl"
    path.write_bytes(b'{"text": "a"}\n{"text": "\xff"}\n')
    with pytest.raises(DataError, match=rf"^{path}:2: not UTF-8"):
        load_split(path, toks["chatml"], 64)
    write(path, [{"messages": CHAT}])  # Gemma's template refuses a system turn
    with pytest.raises(DataError, match=rf"^{path}:1: .*System role not supported"):
        load_split(path, toks["gemma"], 64)
    write(path, [{"messages": CHAT[1:3], "tools": [{"type": "function"}]}])
    with pytest.raises(DataError, match=rf"^{path}:1: .*no chat template.*'tools'"):
        load_split(path, toks["base"], 64)
    for content in ("", "\n\n  \n"):
        path.write_text(content)
        with pytest.raises(DataError, match=rf"^{path}: the file has no rows"):
            load_split(path, toks["chatml"], 64)
    with pytest.raises(DataError, match="missing.jsonl"):
        load_split(tmp_path / "missing.jsonl", toks["chatml"], 64)


def test_find_split_files(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    (d / "valid.jsonl").write_text("")
    (d / "notes.txt").write_text("")
    with pytest.raises(DataError, match=r"has no train\.jsonl \(found: notes\.txt, valid\.jsonl\)"):
        find_split_files(d)
    (d / "train.jsonl").write_text("")
    assert find_split_files(d) == {"train": d / "train.jsonl", "valid": d / "valid.jsonl"}
    other = write(tmp_path / "other.jsonl", [])
    assert find_split_files(d, valid_file=other)["valid"] == other
    assert find_split_files(None, train_file=other) == {"train": other}
    with pytest.raises(DataError) as e:
        find_split_files(tmp_path / "nope", valid_file=tmp_path / "gone.jsonl")
    assert "--data: " in str(e.value) and "nope" in str(e.value) and "--valid-file: " in str(e.value)
    with pytest.raises(DataError, match="--train-file"):
        find_split_files(None)
    (d / "train.jsonl").unlink()
    assert find_split_files(d, require_train=False) == {"valid": d / "valid.jsonl"}


def test_epoch_batches():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 20, size=103).tolist()
    a = epoch_batches(lengths, 8, seed=3, epoch=1)
    assert a == epoch_batches(lengths, 8, seed=3, epoch=1)
    assert a != epoch_batches(lengths, 8, seed=3, epoch=2)
    assert sorted(i for b in a for i in b) == list(range(103))
    assert sorted(len(b) for b in a) == [7] + [8] * 12
    # Batches are runs of the length-sorted order: put in order, their lengths never decrease.
    runs = sorted(sorted(lengths[i] for i in b) for b in a)
    flat = [x for r in runs for x in r]
    assert flat == sorted(lengths)
    assert epoch_batches([], 4, 0, 0) == []


def test_collate():
    samples = [Sample([1, 2, 3], [False, True, True]), Sample([4, 5, 6, 7, 8, 9], [False] * 3 + [True] * 3)]
    inputs, targets, mask = collate(samples, [1, 0], pad_multiple=4, pad_id=0)
    assert inputs.shape == targets.shape == mask.shape == (2, 8)
    assert inputs.dtype == targets.dtype == np.int32 and mask.dtype == np.float32
    assert inputs[1].tolist() == [1, 2, 0, 0, 0, 0, 0, 0] and targets[1].tolist() == [2, 3, 0, 0, 0, 0, 0, 0]
    assert inputs[0].tolist() == [4, 5, 6, 7, 8, 0, 0, 0] and targets[0].tolist() == [5, 6, 7, 8, 9, 0, 0, 0]
    assert mask.tolist() == [[0, 0, 1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0]]
    assert collate(samples, [0], pad_multiple=1, pad_id=7)[0].shape == (1, 2)


def test_inspect_split(tmp_path, toks):
    tok = toks["chatml"]
    split = load_split(write(tmp_path / "train.jsonl", [{"messages": CHAT[1:3]}] * 3), tok, 4096)
    view = inspect_split(split, tok, n=2)
    assert "3 rows -> 3 samples" in view and "0 truncated, 0 dropped" in view
    assert "|<|im_start|>|a|s|s|i|s|t|a|n|t|\\n]H|i|!|\\n|H|o|w|" in view
    assert "|?|<|im_end|>[\\n]" in view
    assert "sample 1" in view and "sample 2" not in view
    split = load_split(write(tmp_path / "train.jsonl", [{"text": "a|[b]"}]), tok, 4096)
    assert inspect_split(split, tok).endswith("[a]\\||\\[|b|\\]|<|im_end|>")


texts = st.text(max_size=12) | st.sampled_from(["\ud800", "<|im_end|>", "", " "])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | texts,
    lambda c: st.lists(c, max_size=4) | st.dictionaries(
        st.sampled_from(["text", "prompt", "completion", "messages", "tools", "role", "content", "x"]) | st.text(),
        c, max_size=4),
    max_leaves=12)
# Rows near the valid formats, so the fuzzing reaches templates and masking, not just the type checks.
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "tool"]) | json_values, "content": texts | json_values},
    optional={"tool_calls": json_values})
near_valid = (st.fixed_dictionaries({"messages": st.lists(message, max_size=4)}, optional={"tools": json_values})
              | st.fixed_dictionaries({"prompt": texts | json_values, "completion": texts | json_values})
              | st.fixed_dictionaries({"text": texts | json_values}))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(json_values | near_valid, min_size=1, max_size=4),
       name=st.sampled_from(["chatml", "gemma", "base", "tools"]))
def test_arbitrary_json_rows_raise_only_data_error(tmp_path_factory, toks, rows, name):
    path = write(tmp_path_factory.mktemp("fuzz") / "train.jsonl", [json.dumps(r) for r in rows])
    try:
        split = load_split(path, toks[name], 64)
    except DataError as e:
        assert str(e).startswith(str(path)) and "\n" not in str(e)
        event("DataError")
    else:
        event("loaded")
        assert split.stats.samples + split.stats.dropped == split.stats.rows == len(rows)
        assert all(len(x.ids) == len(x.mask) <= 64 and any(x.mask) and not x.mask[0] for x in split.samples)


plain = st.text(st.characters(blacklist_characters="<", blacklist_categories=["Cs"]), min_size=1, max_size=30)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(turns=st.lists(st.tuples(plain, plain), min_size=1, max_size=4), name=st.sampled_from(["chatml", "base"]))
def test_valid_chats_mask_exactly_the_assistant_tokens(tmp_path_factory, toks, turns, name):
    # Byte-level tokenizer: each UTF-8 byte is a token, so the target count is known in advance.
    messages = [m for u, a in turns for m in ({"role": "user", "content": u}, {"role": "assistant", "content": a})]
    d = tmp_path_factory.mktemp("chat")
    [chat] = load_split(write(d / "chat.jsonl", [{"messages": messages}]), toks[name], 10_000).samples
    [text] = load_split(write(d / "text.jsonl", [{"text": turns[0][0]}]), toks[name], 10_000).samples
    assert sum(chat.mask) == sum(len(a.encode()) + 1 for _, a in turns)
    assert len(text.ids) == len(turns[0][0].encode()) + 1 and all(text.mask[1:])


class NoOffsets:
    """An HF tokenizer that, like transformers' pure-Python ones, returns no offset mapping."""

    def __init__(self, hf):
        self._hf = hf

    def __getattr__(self, name):
        return getattr(self._hf, name)

    def __call__(self, text, **kw):
        kw.pop("return_offsets_mapping", None)
        return {"input_ids": self._hf(text, **kw)["input_ids"]}


@pytest.mark.parametrize("row", [{"messages": CHAT}, {"prompt": "2+2=", "completion": " 4"}])
def test_tokenizer_without_offsets_gives_the_same_samples(tmp_path, toks, row):
    for name in ("chatml_hf", "base"):
        hf = toks[name] if name == "chatml_hf" else toks[name]._tokenizer
        assert one(tmp_path, NoOffsets(hf), row) == one(tmp_path, hf, row)
