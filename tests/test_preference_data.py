"""Preference data and flags: TRL's standard forms rendered as SFT renders them, bad rows in one line, --method."""

import json

import pytest

from mlxlora import LoraConfig
from mlxlora.config import PreferenceConfig, build_train_config
from mlxlora.config.train import stored_flags
from mlxlora.data import Sample, load_preference_split, load_split
from mlxlora.errors import ConfigError, DataError
from mlxlora.models import load_base

import tiny

PAIRS = [{"prompt": f"Name {i}.", "chosen": f"Number {i} it is.", "rejected": "Nope."} for i in range(6)]


@pytest.fixture(scope="module")
def tok(tiny_dirs):
    return load_base(str(tiny_dirs["llama"])).tokenizer


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_string_pairs_render_like_sft_prompt_completion(tok, tmp_path):
    pref = load_preference_split(_jsonl(tmp_path / "p.jsonl", PAIRS), tok, 512)
    sft_c = load_split(_jsonl(tmp_path / "c.jsonl", [{"prompt": r["prompt"], "completion": r["chosen"]} for r in PAIRS]), tok, 512)
    sft_r = load_split(_jsonl(tmp_path / "r.jsonl", [{"prompt": r["prompt"], "completion": r["rejected"]} for r in PAIRS]), tok, 512)
    assert len(pref.items) == len(PAIRS) and pref.labels is None
    for (chosen, rejected), c, r in zip(pref.items, sft_c.samples, sft_r.samples):
        assert (chosen.ids, chosen.mask) == (c.ids, c.mask)
        assert (rejected.ids, rejected.mask) == (r.ids, r.mask)
    # loss only on the completion (+ end of turn): the text of the masked tokens is the completion
    hf = tok._tokenizer
    chosen = pref.items[0][0]
    assert hf.decode([t for t, m in zip(chosen.ids, chosen.mask) if m]) == "Number 0 it is.<|im_end|>"
    assert pref.template == "tokenizer"


def test_conversational_pairs_with_system_mask_only_the_completion(tok, tmp_path):
    row = {"system": "Be brief.",
           "prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                      {"role": "user", "content": "Name a colour"}],
           "chosen": [{"role": "assistant", "content": "Teal."}],
           "rejected": [{"role": "assistant", "content": "I cannot."}]}
    split = load_preference_split(_jsonl(tmp_path / "p.jsonl", [row]), tok, 512)
    sft = load_split(_jsonl(tmp_path / "s.jsonl", [{"messages": [{"role": "system", "content": "Be brief."}]
                                                    + row["prompt"] + row["chosen"]}]), tok, 512)
    chosen, rejected = split.items[0]
    assert chosen.ids == sft.samples[0].ids  # the same rendering as SFT ...
    hf = tok._tokenizer
    # ... but the prompt's own assistant turn ("Hello.") carries no loss here
    assert hf.decode([t for t, m in zip(chosen.ids, chosen.mask) if m]) == "Teal.<|im_end|>"
    assert hf.decode([t for t, m in zip(rejected.ids, rejected.mask) if m]) == "I cannot.<|im_end|>"


@pytest.mark.parametrize("row, needle", [
    ({"prompt": "a", "chosen": "b"}, "no 'rejected'"),
    ({"prompt": "a", "chosen": "b", "rejected": "b"}, "identical"),
    ({"prompt": "a", "chosen": "  ", "rejected": "b"}, "'chosen' is empty"),
    ({"prompt": [{"role": "user", "content": "a"}], "chosen": [{"role": "assistant", "content": ""}],
      "rejected": [{"role": "assistant", "content": "x"}]}, "chosen[0]['content'] is empty"),
    ({"prompt": "a", "completion": "b", "label": True}, "--method kto"),
    ({"prompt": "a", "chosen": ["b"], "rejected": "c"}, "'chosen' must be a string"),
])
def test_bad_rows_name_file_and_line(tok, tmp_path, row, needle):
    path = _jsonl(tmp_path / "bad.jsonl", [PAIRS[0], "", row])
    with pytest.raises(DataError) as e:
        load_preference_split(path, tok, 512)
    msg = str(e.value)
    assert msg.startswith(f"{path}:3: ") and needle in msg and "\n" not in msg, msg


def test_kto_rows_and_trl_kl_rotation(tok, tmp_path):
    rows = [{"prompt": f"Q{i}", "completion": f"A{i}", "label": i % 2 == 0} for i in range(5)]
    split = load_preference_split(_jsonl(tmp_path / "k.jsonl", rows), tok, 512, "kto", kl_group=2)
    assert split.labels == [True, False, True, False, True]
    hf = tok._tokenizer

    def text(s: Sample, masked: bool):
        return hf.decode([t for t, m in zip(s.ids, s.mask) if m == masked])

    # groups of 2 in file order, completions rotated by one: (x1,y2),(x2,y1) | (x3,y4),(x4,y3) | (x5,y5)
    partners = [text(kl, True) for _, kl in split.items]
    assert partners == [f"A{j}<|im_end|>" for j in (1, 0, 3, 2, 4)]
    assert "Q1" in text(split.items[1][1], False)  # the KL sample keeps its own prompt
    with pytest.raises(DataError, match=r"k2.jsonl:1: 'label' must be true or false"):
        load_preference_split(_jsonl(tmp_path / "k2.jsonl", [{"prompt": "a", "completion": "b", "label": 1}]),
                              tok, 512, "kto")


def test_truncated_pairs_without_completion_are_dropped(tok, tmp_path):
    rows = PAIRS[:2] + [{"prompt": "x" * 300, "chosen": "long", "rejected": "longer"}]
    split = load_preference_split(_jsonl(tmp_path / "p.jsonl", rows), tok, 200)
    assert (split.stats.rows, split.stats.samples, split.stats.dropped) == (3, 2, 1)
    with pytest.raises(DataError, match="all 1 rows were dropped"):
        load_preference_split(_jsonl(tmp_path / "q.jsonl", rows[2:]), tok, 200)


def test_method_flags_one_dataclass_and_checks():
    cfg = build_train_config({"method": "dpo", "beta": "0.25"}, {"loss_type": "ipo"})
    assert cfg.preference == PreferenceConfig(method="dpo", beta=0.25, loss_type="ipo")
    again = build_train_config(None, {}, stored=cfg.to_dict())  # --resume refills the method's flags
    assert again.preference == cfg.preference
    assert cfg.preference.params() == {"method": "dpo", "beta": 0.25, "loss_type": "ipo", "label_smoothing": 0.0}
    for kw, needle in [({"method": "ppo"}, "--method must be one of"), ({"method": "dpo", "beta": 0}, "--beta"),
                       ({"method": "dpo", "label_smoothing": 0.5}, "--label-smoothing"),
                       ({"method": "orpo", "label_smoothing": 0.1}, "not to --method orpo"),
                       ({"method": "kto", "desirable_weight": -1.0}, "--desirable-weight")]:
        with pytest.raises(ConfigError, match=needle):
            PreferenceConfig(**kw)
    assert PreferenceConfig(method="grpo", beta=0.0).beta == 0.0  # GRPO may run without a KL term
    assert stored_flags(cfg.to_dict())["method"] == "dpo"


def test_cli_errors_and_inspect_show_both_sides(tiny_dirs, tmp_path, cli):
    data = tiny.write_data(tmp_path / "d", PAIRS)
    out = cli("data", "inspect", "--model", tiny_dirs["llama"], "--data", data, "-n", "1")
    assert out.exit_code == 0, out.output
    assert "=== pair 0" in out.output and "--- chosen:" in out.output and "--- rejected:" in out.output
    assert "]N|u|m|b|e|r| |0" in out.output and "]N|o|p|e|.|<|im_end|>" in out.output
    res = cli("train", "--model", tiny_dirs["llama"], "--data", data, "--method", "grpo", "--adapter-path", tmp_path / "a")
    tiny.one_line_error(res, "train.jsonl:1: no 'answer'")  # pairs are not prompt rows: grpo says which line
    res = cli("train", "--model", tiny_dirs["llama"], "--data", data, "--method", "dpo", "--pack",
              "--adapter-path", tmp_path / "a")
    tiny.one_line_error(res, "--pack")
    sft = tiny.write_data(tmp_path / "s", [{"prompt": "a", "completion": "b"}])
    res = cli("train", "--model", tiny_dirs["llama"], "--data", sft, "--method", "simpo", "--adapter-path", tmp_path / "a")
    tiny.one_line_error(res, "train.jsonl:1:", "no 'chosen' or 'rejected'")


def test_plan_counts_both_sequences_and_the_reference(tiny_dirs, cli):
    from mlxlora.plan import plan_training

    lora = LoraConfig(r=4, target_modules="all-linear")
    kw = dict(max_seq_length=256, memory_bytes=2**34, backend="cpu")
    dpo = plan_training(str(tiny_dirs["llama"]), lora, batch_size=4, method="dpo", **kw)
    sft4 = plan_training(str(tiny_dirs["llama"]), lora, batch_size=4, **kw)
    sft8 = plan_training(str(tiny_dirs["llama"]), lora, batch_size=8, **kw)
    assert dpo.activation_bytes == sft8.activation_bytes > sft4.activation_bytes  # 4 pairs = 8 sequences
    assert dpo.settings["reference_bytes"] == dpo.adapter_param_bytes  # a frozen adapter copy, never a base copy
    assert dpo.peak_bytes - sft8.peak_bytes == dpo.adapter_param_bytes
    simpo = plan_training(str(tiny_dirs["llama"]), lora, batch_size=4, method="simpo", **kw)
    assert simpo.peak_bytes == sft8.peak_bytes  # reference-free
    res = cli("plan", "--model", tiny_dirs["llama"], "--method", "dpo", "--batch-size", "4", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["settings"]["method"] == "dpo"
    res = cli("plan", "--model", tiny_dirs["llama"], "--method", "dpo", "--batch-size", "4")
    assert "4 pairs = 8 sequences (dpo)" in res.output and "no second model" in res.output
