"""The GRPO engine on a tiny model: the reference is the base, sampling, and a learnable reward that rises."""

import json
from contextlib import contextmanager

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest

import tiny
from mlxlora.config import LoraConfig
from mlxlora.config.grpo import GRPOConfig
from mlxlora.data.prompts import load_prompts
from mlxlora.lora.surgery import adapter_layers, adapters_off, get_lora_model
from mlxlora.models import load_base
from mlxlora.train.grpo import GRPOStepper, sample_group
from mlxlora.train.rewards import Reward

IDS = mx.array([[5, 17, 33, 100, 200, 7, 9]])
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def first_is_letter(prompts, completions, **_):
    return [1.0 if c[:1] and c[:1] in LETTERS else 0.0 for c in completions]


def lora_base(tiny_dirs, seed=None):
    base = load_base(str(tiny_dirs["llama"]))
    get_lora_model(base.model, LoraConfig(r=8, target_modules="all-linear"))
    if seed is not None:
        tiny.randomize_adapters(base.model, seed=seed)
    return base


def test_adapters_off_is_the_base_and_puts_the_adapter_back(tiny_dirs):
    plain = load_base(str(tiny_dirs["llama"])).model(IDS)
    base = lora_base(tiny_dirs, seed=3)
    adapted = base.model(IDS)
    assert mx.abs(adapted - plain).max().item() > 1e-2  # the adapter changes the logits
    with adapters_off(base.model) as ref:
        assert mx.abs(ref(IDS) - plain).max().item() == 0.0
        assert adapter_layers(ref) == []
    assert mx.abs(base.model(IDS) - adapted).max().item() == 0.0


def test_greedy_group_sampling_equals_mlx_lm_and_stops_at_eos(tiny_dirs):
    from mlx_lm.generate import generate_step
    from mlx_lm.sample_utils import make_sampler

    base = lora_base(tiny_dirs, seed=5)
    prompt = [5, 17, 33, 100]
    want = [t for t, _ in zip((int(t) for t, _ in generate_step(mx.array(prompt), base.model,
                                                                  sampler=make_sampler(0.0))), range(6))]
    got = sample_group(base.model, prompt, 3, 6, make_sampler(0.0), set())
    assert got == [want] * 3
    i = next(i for i in range(1, 6) if want[i] not in want[:i])  # a token whose first use is not the first
    got = sample_group(base.model, prompt, 2, 6, make_sampler(0.0), {want[i]})
    assert got == [want[:i + 1]] * 2  # the stop token kept, nothing after it

    sampler = make_sampler(1.0)
    mx.random.seed(11)
    a = sample_group(base.model, prompt, 4, 5, sampler, set())
    mx.random.seed(11)
    assert sample_group(base.model, prompt, 4, 5, sampler, set()) == a  # seeded: a resumed step resamples the same
    assert len({tuple(x) for x in a}) > 1  # and the group is not four copies


def _prompts(tmp_path, tok, n=2):
    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["hi", "yo", "ok", "go"][:n]))
    return load_prompts(f, tok, need_answer=False)


def test_a_learnable_reward_rises(tiny_dirs, tmp_path):
    """Reward 1 when the completion starts with a lowercase letter (26 of the 259 byte tokens): 16 GRPO
    steps of 2 prompts x 8 completions take the mean reward from chance (~0.1) to (nearly) always."""
    base = load_base(str(tiny_dirs["llama"]))
    get_lora_model(base.model, LoraConfig(r=8, target_modules=["q_proj", "v_proj", "lm_head"]))
    rows = _prompts(tmp_path, base.tokenizer)
    cfg = GRPOConfig(group_size=8, max_completion_length=1, rewards=("first_is_letter",))
    stepper = GRPOStepper(base.model, optim.Adam(learning_rate=1e-2), base.tokenizer, cfg,
                          [Reward("first_is_letter", first_is_letter)], beta=0.0, loss_type="dapo")
    rewards = []
    for step in range(16):
        mx.random.seed(step)
        s = stepper.grpo_step(rows)
        rewards.append(s.reward)
        assert s.per_reward["first_is_letter"][0] == pytest.approx(s.reward) and s.completion_length == 1.0
        assert s.kl == 0.0 and s.tokens == 16
    assert np.mean(rewards[:3]) < 0.3 and np.mean(rewards[-4:]) >= 0.9, rewards


def test_beta_uses_the_reference_and_reports_kl(tiny_dirs, tmp_path):
    base = lora_base(tiny_dirs, seed=7)  # the adapter already differs from the base: KL > 0 at step 1
    rows = _prompts(tmp_path, base.tokenizer)
    calls = []

    @contextmanager
    def counted(model):
        calls.append(1)
        with adapters_off(model) as m:
            yield m

    def refuse(model):
        raise AssertionError("beta = 0 must not run a reference pass")

    reward = [Reward("first_is_letter", first_is_letter)]
    for beta, reference in ((0.0, refuse), (0.1, counted)):
        cfg = GRPOConfig(group_size=4, max_completion_length=3, rewards=("first_is_letter",))
        stepper = GRPOStepper(base.model, optim.Adam(learning_rate=1e-3), base.tokenizer, cfg, reward, beta=beta,
                              loss_type="grpo", reference=reference)
        mx.random.seed(0)
        s = stepper.grpo_step(rows)
        assert (s.kl > 1e-4) == (beta > 0), s.kl
    assert calls == [1]


def test_prompt_plan_covers_each_epoch_and_resumes_where_it_stopped():
    from mlxlora.data.prompts import PromptRow
    from mlxlora.train.checkpoint import TrainerState
    from mlxlora.train.grpo import PromptPlan

    rows = [PromptRow([i], None, f"p{i}", {}, i + 1) for i in range(7)]
    plan = PromptPlan(rows, batch_size=2, grad_accum=2, seed=5)
    st = TrainerState()
    steps = [[r.line for r in plan.next(st)[0]] for _ in range(3)]
    e0, e1 = ([rows[i].line for b in plan.plan(e) for i in b] for e in (0, 1))
    assert sorted(e0) == list(range(1, 8)) and e0 != e1  # every prompt once per epoch, reshuffled each epoch
    # 2 batches of 2 prompts per step; 7 prompts = batches of 2, 2, 2, 1, so step 2 has the epoch's last 3
    assert steps == [e0[:4], e0[4:7], e1[:4]]
    # a fresh plan from the saved position continues with the same prompts
    saved = TrainerState(epoch=st.epoch, batch_in_epoch=st.batch_in_epoch)
    again = PromptPlan(rows, batch_size=2, grad_accum=2, seed=5)
    assert [r.line for r in again.next(saved)[0]] == [r.line for r in plan.next(st)[0]]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2"])
def test_completion_logps_project_only_completion_rows_yet_equal_full_logits(tiny_dirs, arch):
    """Untied head, tied embedding head and a soft-capped head: the head sees only the completion positions,
    and the log-probs equal those of the full logits."""
    from mlxlora.loss.grpo import completion_logps

    model = load_base(str(tiny_dirs[arch])).model
    ids = mx.array([[5, 17, 33, 100, 200, 7, 9], [5, 17, 33, 100, 64, 2, 1]])
    full = model(ids[:, :-1]).astype(mx.float32)[:, 3:] / 0.7  # prompt of 4 tokens, completions of 3
    want = mx.take_along_axis(full, ids[:, 4:, None], axis=-1)[..., 0] - mx.logsumexp(full, axis=-1)
    got = completion_logps(model, ids, 4, temperature=0.7)
    assert got.shape == (2, 3) and mx.abs(got - want).max().item() < 1e-5
    from mlxlora.loss import head

    with head.only_rows(mx.arange(6)):  # the head completion_logps switched on projects only selected rows
        assert model(ids[:, :-1]).shape[:2] == (1, 6)
