"""Online GRPO on a LoRA model: sample a group per prompt, score it, one clipped policy-gradient update.

One optimizer step (GRPOStepper.grpo_step) over a batch of prompt rows:
  1. sample `group_size` completions per prompt from the current policy (adapter attached, eval mode),
     through mlx-lm's KV cache and sampler (one batched decode per group, temperature / top-p);
  2. score them with the reward functions (train/rewards.py) -> group-normalised advantages;
  3. with beta > 0, the reference log-probs: the same model with every adapter layer swapped for its
     base layer (lora.surgery.adapters_off), or with the --init-adapter's tensors swapped in
     (adapter_tensors), so the reference costs a forward pass and no second copy of the base;
  4. per group (one micro-batch), the gradient of the objective (loss/grpo.py) with the adapter in train
     mode; gradients are summed and divided once by the summed normaliser, clipped, applied.
One pass per batch (TRL's num_iterations = 1): the sampled completions come from the weights being
updated, so the probability ratio is 1 and the clip only bounds later passes (none are made).
The sampling draws from MLX's global generator; the caller seeds it from (seed, step), so a resumed
run samples the same completions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_map

from ..config.choices import number
from ..config import TrainConfig
from ..config.grpo import GRPO_LOSS_TYPES, GRPOConfig
from ..errors import ConfigError, choice_error
from ..data.prompts import PromptRow, PromptSplit, load_prompt_split
from ..lora.surgery import adapter_tensors, adapters_off
from ..loss.grpo import completion_logps, group_advantages, grpo_loss_sums
from .batches import EpochCursor
from .rewards import Reward, parse_rewards, score


class PromptPlan(EpochCursor):
    """Which prompt rows go into each GRPO step: --batch-size x --grad-accum prompts per rank and step.

    An epoch's order is a permutation seeded by (seed, epoch), cut into global batches of
    batch_size x world prompts; rank r takes slice r. Like BatchPlan, the plan depends only on its
    inputs, so a resumed run (st.epoch, st.batch_in_epoch) continues with the same prompts.
    """

    pack = False

    def __init__(self, rows: list[PromptRow], batch_size: int, grad_accum: int, seed: int, rank: int = 0,
                 world: int = 1):
        self.rows, self.batch_size, self.grad_accum, self.seed = rows, batch_size, grad_accum, seed
        self.rank, self.world = rank, world
        self.pack_capacity = max(len(r.ids) for r in rows)  # the longest prompt (memory_warning adds completions)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world

    def plan(self, epoch: int) -> list[list[int]]:
        rng = np.random.default_rng([self.seed % 2**63, epoch % 2**63])
        order = rng.permutation(len(self.rows)).tolist()
        return [order[i:i + self.global_batch] for i in range(0, len(order), self.global_batch)]

    def next(self, st) -> tuple[list[PromptRow], int]:
        """This rank's prompts for one step, and 0 (tokens are known after sampling); advances `st`."""
        out = []
        for _ in range(self.grad_accum):
            batch = self.take(st)
            part = batch[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
            out += [self.rows[i] for i in part]
        return out, 0


def sample_group(model: nn.Module, prompt: list[int], n: int, max_tokens: int, sampler, stop_ids) -> list[list[int]]:
    """n completions of `prompt` sampled together (one (n, .) decode with mlx-lm's KV cache).

    Each completion ends after its first stop token (kept) or at max_tokens.
    """
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    logits = model(mx.array([prompt] * n), cache=cache)[:, -1, :]  # (n, V)
    stop = mx.array(sorted(stop_ids)) if stop_ids else None
    steps, done = [], np.zeros(n, dtype=bool)
    for t in range(max_tokens):
        logprobs = logits.astype(mx.float32) - mx.logsumexp(logits.astype(mx.float32), axis=-1, keepdims=True)
        tok = sampler(logprobs)  # (n,)
        hit = (tok[:, None] == stop[None, :]).any(axis=1) if stop is not None else mx.zeros((n,), dtype=mx.bool_)
        mx.eval(tok, hit)
        steps.append(np.array(tok))
        done |= np.array(hit)
        if done.all() or t == max_tokens - 1:
            break
        logits = model(tok[:, None], cache=cache)[:, -1, :]
    toks = np.stack(steps, axis=1)  # (n, T)
    out = []
    for row in toks.tolist():
        end = next((i + 1 for i, x in enumerate(row) if x in stop_ids), len(row))
        out.append(row[:end])
    return out


@dataclass
class GroupBatch:
    """One prompt's sampled group, ready for the loss: ids (G, P + T), mask (G, T), advantages (G,)."""

    ids: mx.array
    mask: mx.array
    advantages: mx.array
    prompt_len: int
    ref_logps: mx.array | None = None


@dataclass
class StepStats:
    """What one GRPO step reports (means over the step's completions)."""

    loss: float
    reward: float
    reward_std: float
    per_reward: dict[str, tuple[float, float]]  # name -> (mean, std)
    kl: float
    clip_ratio: float
    completion_length: float
    tokens: int
    grad_norm: float
    completions: list[str] = field(default_factory=list)


class GRPOStepper:
    """GRPO optimizer steps for one LoRA model, optimizer, tokenizer and set of reward functions."""

    def __init__(self, model: nn.Module, optimizer: optim.Optimizer, tokenizer, cfg: GRPOConfig,
                 rewards: list[Reward], *, beta: float, loss_type: str, clip_grad: float | None = 1.0,
                 pad_id: int = 0, reference=adapters_off):
        """beta: the KL weight (0: no reference pass); loss_type: one of GRPO_LOSS_TYPES (loss/grpo.py).
        reference: a context-manager factory that turns the model into the KL reference while active
        (default: the base with the adapters swapped out)."""
        if loss_type not in GRPO_LOSS_TYPES:
            raise choice_error("--loss-type", loss_type, GRPO_LOSS_TYPES)
        self.beta, self.loss_type = number("--beta", beta, low=0.0), loss_type
        from mlx_lm.sample_utils import make_sampler

        self.model, self.optimizer, self.tokenizer, self.cfg = model, optimizer, tokenizer, cfg
        self.rewards, self.clip_grad, self.pad_id, self.reference = rewards, clip_grad, pad_id, reference
        self.sampler = make_sampler(temp=cfg.temperature, top_p=cfg.top_p if cfg.top_p < 1 else 0.0)
        eos = getattr(tokenizer, "eos_token_ids", None) or {getattr(tokenizer, "eos_token_id", None)}
        self.stop_ids = {int(e) for e in eos if e is not None}
        self.vg = nn.value_and_grad(model, grpo_loss_sums)

    def sample(self, rows: list[PromptRow]) -> list[list[int]]:
        """group_size completions per row, rows in order (completions of one row consecutive)."""
        self.model.eval()
        out = []
        for row in rows:
            out += sample_group(self.model, row.ids, self.cfg.group_size, self.cfg.max_completion_length,
                                self.sampler, self.stop_ids)
        return out

    def score(self, rows: list[PromptRow], completion_ids: list[list[int]]) -> tuple[np.ndarray, list[str]]:
        """(rewards (N, F), completion texts): texts decoded without special tokens, as TRL's."""
        G = self.cfg.group_size
        hf = getattr(self.tokenizer, "_tokenizer", self.tokenizer)
        texts = [hf.decode(ids, skip_special_tokens=True) for ids in completion_ids]
        prompts = [row.prompt for row in rows for _ in range(G)]
        keys = sorted({k for row in rows for k in row.row if k not in ("prompt", "messages")})
        columns = {k: [row.row.get(k) for row in rows for _ in range(G)] for k in keys}
        if "answer" in columns:
            columns["answer"] = [row.answer for row in rows for _ in range(G)]
        return score(self.rewards, prompts, texts, completion_ids, columns), texts

    def groups(self, rows: list[PromptRow], completion_ids: list[list[int]], advantages: np.ndarray) -> list[GroupBatch]:
        G = self.cfg.group_size
        out = []
        for i, row in enumerate(rows):
            comps = completion_ids[i * G:(i + 1) * G]
            T = max(len(c) for c in comps)
            ids = np.full((G, len(row.ids) + T), self.pad_id, dtype=np.int32)
            mask = np.zeros((G, T), dtype=np.float32)
            ids[:, :len(row.ids)] = row.ids
            for j, c in enumerate(comps):
                ids[j, len(row.ids):len(row.ids) + len(c)] = c
                mask[j, :len(c)] = 1.0
            out.append(GroupBatch(mx.array(ids), mx.array(mask),
                                  mx.array(advantages[i * G:(i + 1) * G].astype(np.float32)), len(row.ids)))
        return out

    def step(self, rows: list[PromptRow]) -> tuple[mx.array, mx.array, mx.array]:
        """grpo_step in the shape the training loop takes (as train.step.Stepper.step): (loss, completion
        tokens, grad norm); the step's StepStats stay in `self.last`."""
        self.last = self.grpo_step(rows)
        return mx.array(self.last.loss), mx.array(self.last.tokens), mx.array(self.last.grad_norm)

    def grpo_step(self, rows: list[PromptRow]) -> StepStats:
        """One optimizer step over `rows` (sample, score, reference pass, gradient, update)."""
        cfg, model = self.cfg, self.model
        completion_ids = self.sample(rows)
        rewards, texts = self.score(rows, completion_ids)
        adv, total, _ = group_advantages(rewards, [r.weight for r in self.rewards], cfg.group_size,
                                         cfg.scale_rewards)
        batches = self.groups(rows, completion_ids, adv)
        if self.beta != 0.0:
            with self.reference(model):
                for b in batches:
                    b.ref_logps = mx.stop_gradient(completion_logps(model, b.ids, b.prompt_len, cfg.temperature))
                    mx.eval(b.ref_logps)
        model.train()
        low, high = cfg.clip_range
        acc = None
        sums = np.zeros(5)  # loss sum, normaliser, KL sum, clipped tokens, tokens
        for b in batches:
            (lsum, (norm, kl, clipped, ntok)), grads = self.vg(
                model, b.ids, b.mask, b.advantages, None, b.ref_logps, prompt_len=b.prompt_len,
                temperature=cfg.temperature, beta=self.beta, clip_low=low, clip_high=high, loss_type=self.loss_type,
                max_completion_length=cfg.max_completion_length)
            acc = grads if acc is None else tree_map(mx.add, acc, grads)
            mx.eval(acc, lsum, norm, kl, clipped, ntok)  # one group's activations at a time
            sums += [lsum.item(), norm.item(), kl.item(), clipped.item(), ntok.item()]
        denom = max(sums[1], 1e-12)
        grads = tree_map(lambda g: g / denom, acc)
        grads, norm = optim.clip_grad_norm(grads, self.clip_grad if self.clip_grad is not None else float("inf"))
        self.optimizer.update(model, grads)
        mx.eval(model.parameters(), self.optimizer.state, norm)
        per = {r.name: (float(np.nanmean(rewards[:, j])), float(_std(rewards[:, j])))
               for j, r in enumerate(self.rewards)}
        tokens = int(sums[4])
        return StepStats(loss=sums[0] / denom, reward=float(np.nanmean(total)), reward_std=float(_std(total)),
                         per_reward=per, kl=sums[2] / max(tokens, 1), clip_ratio=sums[3] / max(tokens, 1),
                         completion_length=float(np.mean([len(c) for c in completion_ids])), tokens=tokens,
                         grad_norm=float(norm.item()), completions=texts)


def load_grpo(cfg: TrainConfig, files: dict, tokenizer, rank: int = 0, world: int = 1):
    """The reward functions, the prompt split and its PromptPlan of a `--method grpo` run; ConfigError or
    DataError (file:line) for what cannot be used, before any model work."""
    if world > 1:
        raise ConfigError("--method grpo runs on one rank for now (its sampling is not split across ranks); "
                          "run it without mlx.launch")
    if cfg.save_best or cfg.early_stop:
        raise ConfigError(f"{'--save-best' if cfg.save_best else '--early-stop'}: --method grpo has no validation "
                          "loss to compare; drop the flag")
    g = cfg.grpo
    room = cfg.max_seq_length - g.max_completion_length
    if room < 1:
        raise ConfigError(f"--max-seq-length {cfg.max_seq_length} leaves no room for a prompt next to "
                          f"--max-completion-length {g.max_completion_length}; raise --max-seq-length")
    rewards = parse_rewards(g)
    split: PromptSplit = load_prompt_split(files["train"], tokenizer, max_prompt_length=room,
                                           need_answer=any(r.name == "exact" for r in rewards))
    plan = PromptPlan(split.rows, cfg.batch_size, cfg.grad_accum, cfg.seed, rank, world)
    plan.pack_capacity += g.max_completion_length
    return rewards, split, plan


def make_stepper(model, optimizer, tokenizer, cfg: TrainConfig, rewards: list[Reward], pad_id: int,
                 ref_tensors: dict | None = None) -> "GRPOStepper":
    """The run's GRPOStepper; the KL reference is the --init-adapter's tensors when given, else the base."""
    reference = (lambda m: adapter_tensors(m, ref_tensors)) if ref_tensors else adapters_off
    return GRPOStepper(model, optimizer, tokenizer, cfg.grpo, rewards, beta=cfg.preference.beta,
                       loss_type=cfg.preference.loss_type, clip_grad=cfg.clip_grad, pad_id=pad_id,
                       reference=reference)


def step_metrics(s: StepStats) -> dict[str, float]:
    """A step's metrics by name (TRL's names), as the run record's method_log keeps them."""
    out = {"reward": s.reward, "reward_std": s.reward_std}
    for name, (m, sd) in s.per_reward.items():
        out[f"rewards/{name}/mean"], out[f"rewards/{name}/std"] = m, sd
    out.update(kl=s.kl, clip_ratio=s.clip_ratio, completion_length=s.completion_length)
    return out


def stats_text(s: StepStats) -> str:
    """The GRPO part of a progress line: mean reward ± std, each function's mean (± std), KL, length."""
    parts = [f"reward {s.reward:.3f} ± {s.reward_std:.3f}"]
    if len(s.per_reward) > 1:
        parts.append(" ".join(f"{name} {m:.3f}±{sd:.3f}" for name, (m, sd) in s.per_reward.items()))
    parts.append(f"kl {s.kl:.4f}")
    parts.append(f"length {s.completion_length:.1f}")
    return " · ".join(parts)


def _std(x: np.ndarray) -> float:
    x = x[~np.isnan(x)]
    return float(np.std(x, ddof=1)) if x.size > 1 else 0.0
