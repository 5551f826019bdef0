"""GRPO against TRL (the installed trl, torch CPU): advantages, the per-token objective, its gradient, log-probs.

What is TRL's own code and what is reproduced:
  - the objective: TRL's `GRPOTrainer._compute_loss` itself, called unbound on a stand-in `self` that holds
    the config attributes it reads; for the fixed-tensor checks its `_get_per_token_logps_and_entropies` is
    replaced by one returning our fixed (leaf) log-probs, so autograd gives TRL's gradient w.r.t. them;
  - the log-probs: TRL's real `_get_per_token_logps_and_entropies` on the tiny llama loaded in transformers
    with TRL's `add_fused_lm_head` (the temperature divides the logits there);
  - the advantages: the block of `_generate_and_score_completions` that forms them is inside a method that
    samples, so it is reproduced here with torch, line for line from trl 1.x's source, calling TRL's `nanstd`.
"""

from collections import defaultdict
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest

from mlxlora.loss.grpo import aggregate, completion_logps, group_advantages, grpo_loss_sums, token_losses

pytestmark = pytest.mark.peer
torch = pytest.importorskip("torch")
trl = pytest.importorskip("trl")
from trl.trainer.grpo_trainer import GRPOTrainer  # noqa: E402
from trl.trainer.utils import nanstd  # noqa: E402

TOL = 1e-5


def trl_advantages(rewards_per_func, weights, G, scale):
    """trl 1.x `_generate_and_score_completions`, multi_objective_aggregation="sum_then_normalize"."""
    rewards_per_func = torch.tensor(rewards_per_func, dtype=torch.float32)
    w = torch.tensor(weights, dtype=torch.float32)
    unscorable_mask = torch.isnan(rewards_per_func).all(dim=1)
    rewards = (rewards_per_func * w.unsqueeze(0)).nansum(dim=1)
    rewards[unscorable_mask] = torch.nan
    mean_grouped = torch.nanmean(rewards.view(-1, G), dim=1).repeat_interleave(G, dim=0)
    if scale in ("group", "none"):
        std = nanstd(rewards.view(-1, G), dim=1).repeat_interleave(G, dim=0)
    else:
        std = nanstd(rewards).expand_as(rewards)
    adv = rewards - mean_grouped
    if scale != "none":
        adv = adv / (std + 1e-4)
    return torch.nan_to_num(adv, nan=0.0).numpy()


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_equal_trls(scale):
    rng = np.random.default_rng(0)
    r = rng.normal(size=(12, 3)).round(2)  # 3 groups of 4, 3 reward functions
    r[1, 1] = np.nan  # one function did not score one completion
    r[6, :] = np.nan  # no function scored this one: left out of its group, advantage 0
    r[8:12, 0] = 1.0  # a function constant over a group
    w = [1.0, 0.5, 2.0]
    ours, total, _ = group_advantages(r, w, 4, scale)
    want = trl_advantages(r, w, 4, scale)
    np.testing.assert_allclose(ours, want, atol=TOL, rtol=0)
    assert ours[6] == 0.0 and np.isnan(total[6]) and np.abs(ours).max() > 0.5


def fake_trainer(loss_type, beta, eps, eps_high, max_len, logps_fn):
    """The attributes trl 1.x's `_compute_loss` reads, for one process, no accumulation, no vLLM."""
    acc = SimpleNamespace(num_processes=1, is_main_process=True, reduce=lambda x, reduction="sum": x, gather=lambda x: x,
                          gather_for_metrics=lambda x: x)
    return SimpleNamespace(
        loss_type=loss_type, beta=beta, epsilon_low=eps, epsilon_high=eps_high, max_completion_length=max_len,
        importance_sampling_level="token", top_entropy_quantile=1.0, aux_loss_enabled=False,
        off_policy_mask_threshold=None, use_vllm=False, vllm_importance_sampling_correction=False,
        _entropy_bonus_enabled=False, current_gradient_accumulation_steps=1, model=SimpleNamespace(training=True),
        accelerator=acc, args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _get_per_token_logps_and_entropies=logps_fn)


def fixed_group(seed=0, B=6, T=7):
    rng = np.random.default_rng(seed)
    new = rng.normal(-2.0, 0.5, size=(B, T)).astype(np.float32)
    old = (new + rng.normal(0, 0.3, size=(B, T))).astype(np.float32)  # far enough that both clips bite
    ref = (new + rng.normal(0, 0.2, size=(B, T))).astype(np.float32)
    lengths = [7, 3, 5, 1, 7, 4]
    mask = np.array([[1.0] * n + [0.0] * (T - n) for n in lengths], dtype=np.float32)
    adv = group_advantages(rng.integers(0, 3, size=(B, 1)).astype(float), [1.0], B)[0].astype(np.float32)
    return new, old, ref, mask, adv


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "bnpo", "dr_grpo"])
@pytest.mark.parametrize("beta, eps, eps_high", [(0.0, 0.2, 0.2), (0.04, 0.2, 0.28)])
def test_objective_and_gradient_equal_trls(loss_type, beta, eps, eps_high):
    new, old, ref, mask, adv = fixed_group()
    B, T = new.shape
    leaf = torch.tensor(new, requires_grad=True)
    fake = fake_trainer(loss_type, beta, eps, eps_high, T + 2, lambda *a, **k: (leaf, torch.zeros_like(leaf), None))
    inputs = {"prompt_ids": torch.zeros((B, 3), dtype=torch.long), "prompt_mask": torch.ones((B, 3)),
              "completion_ids": torch.zeros((B, T), dtype=torch.long), "completion_mask": torch.tensor(mask),
              "advantages": torch.tensor(adv), "old_per_token_logps": torch.tensor(old),
              "ref_per_token_logps": torch.tensor(ref), "num_items_in_batch": torch.tensor(mask.sum())}
    want = GRPOTrainer._compute_loss(fake, None, inputs)
    want.backward()

    def ours(logps):
        loss, kl, coef = token_losses(logps, mx.array(old), mx.array(ref), mx.array(adv), beta=beta,
                                      clip_low=1 - eps, clip_high=1 + eps_high)
        s, n = aggregate(loss, mx.array(mask), loss_type, T + 2)
        return s / n

    value, grad = mx.value_and_grad(ours)(mx.array(new))
    assert abs(value.item() - want.item()) <= TOL * max(1.0, abs(want.item())), (value.item(), want.item())
    np.testing.assert_allclose(np.array(grad), leaf.grad.numpy(), atol=TOL, rtol=0)
    assert np.abs(leaf.grad.numpy()).max() > 1e-3  # a gradient that is there, with some tokens clipped:
    assert fake._metrics["train"]["clip_ratio/region_mean"][0] > 0
    if beta:
        _, kl, _ = token_losses(mx.array(new), None, mx.array(ref), mx.array(adv), beta=beta, clip_low=0.8,
                                clip_high=1.2)
        ours_kl = float((kl * mx.array(mask)).sum().item() / mask.sum())
        assert abs(ours_kl - fake._metrics["train"]["kl"][0]) <= TOL


@pytest.fixture(scope="module")
def llama_pair(tiny_dirs):
    """The tiny llama in transformers (TRL's fused head at temperature 0.7) and in mlxlora."""
    import transformers
    from trl.trainer.utils import add_fused_lm_head

    from mlxlora.models import load_base

    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"], dtype=torch.float32).eval()
    add_fused_lm_head(hf, temperature=0.7, outputs=("log_probs", "entropy"))
    return hf, load_base(str(tiny_dirs["llama"])).model


def test_completion_logps_and_on_policy_loss_equal_trls_on_a_model(llama_pair):
    """The real TRL log-prob path on the same weights, then TRL's `_compute_loss` end to end (old log-probs
    None: on-policy, ratio 1) against grpo_loss_sums, with the KL term against perturbed reference log-probs."""
    hf, model = llama_pair
    prompt = [5, 17, 33, 100]
    comps = [[200, 7, 9, 2], [250, 3], [64, 2, 1], [9]]
    T = max(len(c) for c in comps)
    ids = np.zeros((4, len(prompt) + T), dtype=np.int64)
    mask = np.zeros((4, T), dtype=np.float32)
    ids[:, :len(prompt)] = prompt
    for j, c in enumerate(comps):
        ids[j, len(prompt):len(prompt) + len(c)] = c
        mask[j, :len(c)] = 1
    attn = np.concatenate([np.ones((4, len(prompt))), mask], axis=1).astype(np.int64)
    fake = fake_trainer("dapo", 0.04, 0.2, 0.2, 8, None)
    fake.accelerator.autocast = lambda: torch.autocast("cpu", enabled=False)
    fake._get_per_token_logps_and_entropies = lambda *a, **k: GRPOTrainer._get_per_token_logps_and_entropies(
        fake, *a, **k)
    with torch.no_grad():
        want, _, _ = fake._get_per_token_logps_and_entropies(hf, torch.tensor(ids), torch.tensor(attn), T)
    ours = np.array(completion_logps(model, mx.array(ids), len(prompt), temperature=0.7))
    np.testing.assert_allclose(ours * mask, want.numpy() * mask, atol=1e-4, rtol=0)

    ref = (want.numpy() + np.random.default_rng(1).normal(0, 0.1, size=want.shape)).astype(np.float32)
    adv = np.array([1.2, -0.4, 0.3, -1.1], dtype=np.float32)
    inputs = {"prompt_ids": torch.tensor(ids[:, :len(prompt)]), "prompt_mask": torch.ones((4, len(prompt))),
              "completion_ids": torch.tensor(ids[:, len(prompt):]), "completion_mask": torch.tensor(mask),
              "advantages": torch.tensor(adv), "ref_per_token_logps": torch.tensor(ref),
              "num_items_in_batch": torch.tensor(mask.sum())}
    loss_trl = GRPOTrainer._compute_loss(fake, hf, inputs).item()
    s, (n, *_rest) = grpo_loss_sums(model, mx.array(ids), mx.array(mask), mx.array(adv), None, mx.array(ref),
                                    prompt_len=len(prompt), temperature=0.7, beta=0.04, clip_low=0.8,
                                    clip_high=1.2, loss_type="dapo", max_completion_length=8)
    assert abs((s / n).item() - loss_trl) <= 1e-5, ((s / n).item(), loss_trl)
