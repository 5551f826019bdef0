"""The GRPO objective: group-normalised advantages, per-token log-probs, the clipped surrogate with a KL term.

GRPO is from "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models" (Shao et
al., 2024). The formulas are TRL's GRPOTrainer (trl 1.x, `_generate_and_score_completions` for the
advantages, `_compute_loss` for the objective), checked against it in tests/test_grpo_parity.py:

    advantage   A_i = (r_i - mean_group(r)) / (std_group(r) + 1e-4)       (std: Bessel-corrected)
    ratio       c_t = exp(logp_t - logp_old_t)                              (1 with one pass per batch)
    token loss  l_t = -min(c_t A_i, clip(c_t, 1 - eps, 1 + eps_high) A_i) + beta * KL_t
    KL_t        exp(ref_t - logp_t) - (ref_t - logp_t) - 1                  (the k3 estimator)

Log-probs are of the sampling distribution: logits divided by the temperature, as TRL does.
Aggregation over tokens (loss_type) returns a (sum, normaliser) pair per micro-batch, so that gradient
accumulation over micro-batches divides once by the summed normaliser, as TRL does for one step:
    dapo     sum of l_t over the step's completion tokens / their number
    grpo     mean over sequences of (each sequence's mean l_t)
    bnpo     mean over micro-batches of (their token mean)
    dr_grpo  sum of l_t / (sequences x max_completion_length)
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import head

STD_EPS = 1e-4  # TRL's: advantages = (r - mean) / (std + 1e-4)


def group_advantages(rewards: np.ndarray, weights, group_size: int,
                     scale: str = "group") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(advantages (N,), weighted rewards (N,), the std they were scaled by (N,)) for N = groups x group_size.

    rewards: (N, F), one column per reward function, NaN where a function gave no score; weights (F,).
    Completions of one prompt are consecutive. Rewards are summed with the weights first (TRL's
    "sum_then_normalize"); a completion no function scored is left out of its group's mean and std
    and gets advantage 0. scale: "group" (the group's std), "batch" (the whole batch's) or "none".
    """
    rewards = np.asarray(rewards, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    unscored = np.isnan(rewards).all(axis=1)
    total = np.nansum(rewards * w[None, :], axis=1)
    total[unscored] = np.nan
    grouped = total.reshape(-1, group_size)  # (groups, G)
    mean = np.repeat(_nanmean(grouped, axis=1), group_size)
    if scale == "batch":
        std = np.full_like(total, _nanstd(total) if total.size > 1 else 0.0)
    else:  # "group", and "none" (std then only reported)
        std = np.repeat(_nanstd(grouped, axis=1), group_size)
    adv = total - mean
    if scale != "none":
        adv = adv / (std + STD_EPS)
    return np.nan_to_num(adv, nan=0.0), total, std


def completion_logps(model: nn.Module, ids: mx.array, prompt_len: int, temperature: float = 1.0) -> mx.array:
    """(B, T) log-probs of the completion tokens ids[:, prompt_len:] under the model, logits / temperature.

    ids: (B, prompt_len + T), the prompt followed by each completion (padding after it is masked later).
    The output head projects only the B * T positions that predict completion tokens (loss/head.py).
    """
    B, L = ids.shape
    T = L - prompt_len
    # Only the positions that predict a completion token reach the output head (head.py): (B * T,) rows.
    rows = (mx.arange(B)[:, None] * (L - 1) + (prompt_len - 1) + mx.arange(T)[None, :]).reshape(-1)
    selected = head.enable(model)
    with head.only_rows(rows if selected else None):
        logits = model(ids[:, :-1])
    if logits.shape[:2] == (1, B * T) and (B, L - 1) != (1, B * T):
        logits = logits.reshape(B, T, -1)  # (B, T, V)
    else:  # a head head.py does not recognise: full logits, cut here
        logits = logits[:, prompt_len - 1:]
    logits = logits.astype(mx.float32) / temperature
    targets = ids[:, prompt_len:]
    picked = mx.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return picked - mx.logsumexp(logits, axis=-1)


def token_losses(logps: mx.array, old_logps: mx.array | None, ref_logps: mx.array | None, advantages: mx.array,
                 *, beta: float, clip_low: float, clip_high: float) -> tuple[mx.array, mx.array | None, mx.array]:
    """(per-token loss (B, T), per-token KL (B, T) or None when beta = 0, ratio c_t (B, T)).

    old_logps None: the completions were sampled from these very weights (one pass per batch), so the
    old log-probs are the current ones without gradient and the ratio is exactly 1, as in TRL.
    advantages: (B,). clip_low / clip_high: the ratio's bounds 1 - eps and 1 + eps_high.
    """
    old = mx.stop_gradient(logps) if old_logps is None else old_logps
    coef_1 = mx.exp(logps - old)
    coef_2 = mx.clip(coef_1, clip_low, clip_high)
    a = advantages[:, None]
    loss = -mx.minimum(coef_1 * a, coef_2 * a)
    kl = None
    if beta != 0.0:
        d = ref_logps - logps
        kl = mx.exp(d) - d - 1
        loss = loss + beta * kl
    return loss, kl, coef_1


def aggregate(loss: mx.array, mask: mx.array, loss_type: str, max_completion_length: int) -> tuple[mx.array, mx.array]:
    """(sum, normaliser) of one micro-batch's per-token loss under loss_type (module docstring).

    mask: (B, T) float, 1 on completion tokens (through the first EOS). The step's loss is
    sum of sums / sum of normalisers over its micro-batches.
    """
    masked = loss * mask
    B = loss.shape[0]
    if loss_type == "dapo":
        return masked.sum(), mask.sum()
    if loss_type == "grpo":
        return (masked.sum(-1) / mx.maximum(mask.sum(-1), 1.0)).sum(), mx.array(float(B))
    if loss_type == "bnpo":
        return masked.sum() / mx.maximum(mask.sum(), 1.0), mx.array(1.0)
    if loss_type == "dr_grpo":
        return masked.sum() / max_completion_length, mx.array(float(B))
    raise ValueError(f"unknown loss_type {loss_type!r}")


def grpo_loss_sums(model: nn.Module, ids: mx.array, mask: mx.array, advantages: mx.array, old_logps, ref_logps, *,
                   prompt_len: int, temperature: float, beta: float, clip_low: float, clip_high: float,
                   loss_type: str, max_completion_length: int):
    """The micro-batch objective for value_and_grad: (sum, (normaliser, KL sum, clipped-token count, tokens)).

    ids (B, P + T) one prompt's group of completions; mask (B, T); advantages (B,); old_logps / ref_logps
    (B, T) or None (see token_losses; ref_logps is needed when beta != 0).
    """
    logps = completion_logps(model, ids, prompt_len, temperature)
    loss, kl, coef = token_losses(logps, old_logps, ref_logps, advantages, beta=beta, clip_low=clip_low,
                                  clip_high=clip_high)
    total, norm = aggregate(loss, mask, loss_type, max_completion_length)
    a = advantages[:, None]
    clipped = (((coef < clip_low) & (a < 0)) | ((coef > clip_high) & (a > 0))).astype(mx.float32)
    kl_sum = (kl * mask).sum() if kl is not None else mx.array(0.0)
    return total, (norm, mx.stop_gradient(kl_sum), (clipped * mask).sum(), mask.sum())


def _nanmean(x: np.ndarray, axis=None):
    n = (~np.isnan(x)).sum(axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.nansum(x, axis=axis) / n


def _nanstd(x: np.ndarray, axis=None):
    """Bessel-corrected std ignoring NaN (TRL's nanstd); NaN with fewer than two values."""
    mean = _nanmean(x, axis=axis)
    mean = mean if axis is None else np.expand_dims(mean, axis)
    n = (~np.isnan(x)).sum(axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        var = np.nansum((x - mean) ** 2, axis=axis) / (n - 1)
    return np.where(n > 1, np.sqrt(np.maximum(var, 0.0)), np.nan)
