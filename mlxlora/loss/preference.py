"""Preference objectives on completion log-probabilities: DPO (sigmoid, IPO, hinge), ORPO, SimPO and KTO.

The definitions are TRL's (trl 1.16: DPOTrainer._compute_loss, ORPOTrainer.odds_ratio_loss,
CPOTrainer.cpo_loss with loss_type="simpo", KTOTrainer._compute_loss); tests/test_preference_trl.py
checks each against TRL itself. A batch holds 2B rows: the first B are the chosen completions (KTO: the
completions), the last B the rejected ones (KTO: the KL completions, see data/preference.py).

`preference_sums` is what the training step differentiates: (sum of per-item losses, number of items,
metric sums), so gradient accumulation and data-parallel ranks sum items exactly like SFT sums tokens.
"""

from __future__ import annotations

from contextlib import nullcontext

import mlx.core as mx
import mlx.nn as nn

from ..lora.quant import on_cpu
from . import head
from .attention import blocked_causal

# The metric sums preference_sums returns, in this order (see Stepper.metrics and train/progress.py).
METRICS = ("accuracy", "margin", "chosen_reward", "rejected_reward", "chosen_logp", "rejected_logp",
           "n_chosen", "n_rejected", "kl")


def sequence_logps(model: nn.Module, inputs: mx.array, targets: mx.array, mask: mx.array,
                   rows: mx.array | None = None, full: mx.array | None = None):
    """Per-row summed log-probability of the target tokens under mask, and the number of those tokens.

    inputs/targets/mask: (N, L); rows: the head's loss positions (head.target_rows) or None.
    Returns (logps (N,), tokens (N,)), float32; with `full` (N, L), a second mask (ORPO's NLL over the
    whole sequence; rows must be None then), also (full_logps (N,), full_tokens (N,)).
    """
    n, length = targets.shape
    if rows is not None:
        head.enable(model)
    with head.only_rows(rows), (blocked_causal(model) if on_cpu() else nullcontext()):
        logits = model(inputs)
    if rows is not None and logits.shape[:2] != targets.shape:  # (1, R, V): only the target rows
        tgt, m, seq = targets.reshape(-1)[rows], mask.reshape(-1)[rows], rows // length
    else:
        tgt, m, seq = targets.reshape(-1), mask.reshape(-1), mx.arange(n * length) // length
    logits = logits.reshape(-1, logits.shape[-1]).astype(mx.float32)  # (R, V)
    token_logps = -nn.losses.cross_entropy(logits, tgt)  # (R,)
    owner = (seq[:, None] == mx.arange(n)[None]).astype(mx.float32)  # (R, N): which row a position belongs to
    m = m.astype(mx.float32)
    out = ((token_logps * m) @ owner, m @ owner)
    if full is None:
        return out
    f = full.reshape(-1).astype(mx.float32)
    return out + ((token_logps * f) @ owner, f @ owner)


def dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta: float, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0, chosen_tokens=None, rejected_tokens=None):
    """DPO (Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a Reward
    Model"); loss_type "sigmoid" with label_smoothing is conservative DPO (Mitchell 2023), "ipo" is IPO (Azar
    et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences", eq. 17, with
    TRL's per-token normalisation: needs chosen_tokens / rejected_tokens), "hinge" is SLiC (Zhao et al. 2023).

    All inputs (B,): summed completion log-probs. Returns (losses, chosen_rewards, rejected_rewards), each (B,).
    """
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    delta = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = (-nn.log_sigmoid(beta * delta) * (1 - label_smoothing)
                  - nn.log_sigmoid(-beta * delta) * label_smoothing)
    elif loss_type == "hinge":
        losses = nn.relu(1 - beta * delta)
    elif loss_type == "ipo":
        avg = chosen_ratio / mx.maximum(chosen_tokens, 1) - rejected_ratio / mx.maximum(rejected_tokens, 1)
        losses = (avg - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss type {loss_type!r}")
    return losses, mx.stop_gradient(beta * chosen_ratio), mx.stop_gradient(beta * rejected_ratio)


def orpo_loss(chosen_avg, rejected_avg, beta: float):
    """ORPO's odds-ratio term (Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference
    Model", eqs. 4 and 7): beta * log sigmoid(log odds(chosen) - log odds(rejected)), to be SUBTRACTED from
    the chosen NLL. Inputs (B,): per-token average completion log-probs. Returns (terms, chosen_rewards,
    rejected_rewards)."""
    log_odds = (chosen_avg - rejected_avg) - (_log1mexp(chosen_avg) - _log1mexp(rejected_avg))
    terms = beta * nn.log_sigmoid(log_odds)
    return terms, mx.stop_gradient(beta * chosen_avg), mx.stop_gradient(beta * rejected_avg)


def simpo_loss(chosen_avg, rejected_avg, beta: float, gamma: float, label_smoothing: float = 0.0):
    """SimPO (Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward"):
    -log sigmoid(beta * (avg logp chosen - avg logp rejected) - gamma), reference-free and length-normalised
    (TRL's CPOTrainer with loss_type="simpo" and cpo_alpha=0). Returns (losses, chosen_rewards, rejected_rewards)."""
    logits = (chosen_avg - rejected_avg) - gamma / beta
    losses = (-nn.log_sigmoid(beta * logits) * (1 - label_smoothing)
              - nn.log_sigmoid(-beta * logits) * label_smoothing)
    return losses, mx.stop_gradient(beta * chosen_avg), mx.stop_gradient(beta * rejected_avg)


def kto_loss(logps, ref_logps, kl, desirable, beta: float, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0):
    """KTO (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", eq. 7).

    logps/ref_logps (B,): summed completion log-probs; kl: the (detached, >= 0) KL estimate of the batch;
    desirable (B,) bool. Returns (losses, rewards), each (B,); losses already weighted.
    """
    ratio = logps - ref_logps
    good = desirable_weight * (1 - mx.sigmoid(beta * (ratio - kl)))
    bad = undesirable_weight * (1 - mx.sigmoid(beta * (kl - ratio)))
    return mx.where(desirable, good, bad), mx.stop_gradient(beta * ratio)


def _log1mexp(x):
    # log(1 - exp(x)) for x < 0, accurate on both sides of -log 2 (Maechler 2012).
    return mx.where(x > -0.6931471805599453, mx.log(-mx.expm1(x)), mx.log1p(-mx.exp(x)))


def preference_sums(model: nn.Module, inputs, targets, mask, rows, real, ref, weight, label, *, cfg):
    """(sum of per-item losses, number of items, metric sums (len(METRICS),)) for one batch of 2B rows.

    real (2B, L): 1 on every predicted token of a row (prompt included), 0 on padding: ORPO's NLL is over
    the whole chosen sequence, as TRL's ORPOTrainer computes it. ref (2B,): the reference's summed log-probs of the same rows (zeros for reference-free methods);
    weight (B,): 1 for a real item, 0 for a filler (a rank the batch did not reach); label (B,): KTO's
    desirability (ignored otherwise). cfg: the PreferenceConfig.
    """
    if cfg.method == "orpo":
        logps, tokens, full_logps, full_tokens = sequence_logps(model, inputs, targets, mask, None, real)
    else:
        logps, tokens = sequence_logps(model, inputs, targets, mask, rows)
    b = weight.shape[0]
    first, second, n1, n2 = logps[:b], logps[b:], tokens[:b], tokens[b:]
    count = weight.sum()
    method = cfg.method
    if method == "kto":
        kl_each = mx.stop_gradient(second - ref[b:])
        kl = mx.maximum((kl_each * weight).sum() / mx.maximum(count, 1), 0.0)
        losses, rewards = kto_loss(first, ref[:b], kl, label, cfg.beta, cfg.desirable_weight, cfg.undesirable_weight)
        good, bad = label.astype(mx.float32) * weight, (1 - label.astype(mx.float32)) * weight
        ng, nb = good.sum(), bad.sum()
        metrics = [mx.array(0.0), (rewards * good).sum() * count / mx.maximum(ng, 1)
                   - (rewards * bad).sum() * count / mx.maximum(nb, 1),
                   (rewards * good).sum(), (rewards * bad).sum(), (first * good).sum(), (first * bad).sum(),
                   ng, nb, kl * count]
        return (losses * weight).sum(), count, mx.stack(metrics)
    if method == "dpo":
        losses, cr, rr = dpo_loss(first, second, ref[:b], ref[b:], cfg.beta, cfg.loss_type, cfg.label_smoothing, n1, n2)
        shown = (first, second)
    else:
        avg1, avg2 = first / mx.maximum(n1, 1), second / mx.maximum(n2, 1)
        shown = (avg1, avg2)
        if method == "simpo":
            losses, cr, rr = simpo_loss(avg1, avg2, cfg.beta, cfg.gamma, cfg.label_smoothing)
        elif method == "orpo":
            terms, cr, rr = orpo_loss(avg1, avg2, cfg.beta)
            # token mean over the chosen sequences, prompt included (TRL's ORPOTrainer)
            nll = -(full_logps[:b] * weight).sum() / mx.maximum((full_tokens[:b] * weight).sum(), 1)
            losses = nll - terms  # summed over items and divided by their count: nll - mean(terms)
        else:
            raise ValueError(f"preference_sums: unknown method {method!r}")
    metrics = [((cr > rr) * weight).sum(), ((cr - rr) * weight).sum(), (cr * weight).sum(), (rr * weight).sum(),
               (mx.stop_gradient(shown[0]) * weight).sum(), (mx.stop_gradient(shown[1]) * weight).sum(),
               count, count, mx.array(0.0)]
    return (losses * weight).sum(), count, mx.stack(metrics)
