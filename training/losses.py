"""Preference losses as pure functions of log-prob tensors (no models, no state).

B is the number of pairs, G the number of groups, K completions per group, N the
number of sequences in a GRPO batch and T their longest completion in tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from training.config import DPO_LOSS_TYPES, GRPO_LOSS_TYPES


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Direct Preference Optimization loss for a batch of pairs.

    With ``h = (pc - rc) - (pr - rr)`` (summed completion log-probs):

    - ``sigmoid``: ``-(1-e)·logσ(βh) - e·logσ(-βh)`` (e = label_smoothing; conservative DPO)
    - ``ipo``: ``(h - 1/(2β))²``, with each side's log-ratio divided by its completion
      length when lengths are given (IPO is defined on average log-probs)
    - ``hinge``: ``relu(1 - βh)``
    - ``robust``: ``(-(1-e)·logσ(βh) + e·logσ(-βh)) / (1-2e)`` (unbiased under label noise e)

    Args:
        policy_chosen_logps: (B,) summed log-probs of the chosen completions under the policy.
        policy_rejected_logps: (B,) the same for the rejected completions.
        ref_chosen_logps: (B,) chosen log-probs under the frozen reference.
        ref_rejected_logps: (B,) rejected log-probs under the reference.
        beta: strength of the implicit KL constraint to the reference.
        loss_type: one of ``sigmoid``, ``ipo``, ``hinge``, ``robust``.
        label_smoothing: assumed probability e that a label is flipped (``sigmoid``, ``robust``).
        chosen_lengths: (B,) completion token counts of the chosen side (used by ``ipo``).
        rejected_lengths: (B,) token counts of the rejected side (used by ``ipo``).
        weights: (B,) per-pair weights (e.g. annotator agreement) multiplied into the losses.

    Returns:
        per_pair_losses: (B,) the loss of each pair (weighted when weights are given).
        chosen_rewards: (B,) implicit rewards ``β·(pc - rc)``, detached.
        rejected_rewards: (B,) implicit rewards ``β·(pr - rr)``, detached.
    """
    chosen_logratios = policy_chosen_logps - ref_chosen_logps  # (B,)
    rejected_logratios = policy_rejected_logps - ref_rejected_logps  # (B,)

    if loss_type == "sigmoid":
        h = chosen_logratios - rejected_logratios
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        if chosen_lengths is not None and rejected_lengths is not None:
            h = chosen_logratios / chosen_lengths - rejected_logratios / rejected_lengths
        else:
            h = chosen_logratios - rejected_logratios
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        h = chosen_logratios - rejected_logratios
        losses = torch.relu(1 - beta * h)
    elif loss_type == "robust":
        if not 0 <= label_smoothing < 0.5:
            raise ValueError("robust DPO needs 0 <= label_smoothing < 0.5")
        h = chosen_logratios - rejected_logratios
        losses = (-(1 - label_smoothing) * F.logsigmoid(beta * h) + label_smoothing * F.logsigmoid(-beta * h)) / (
            1 - 2 * label_smoothing
        )
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; choose from {', '.join(DPO_LOSS_TYPES)}")

    if weights is not None:
        losses = losses * weights
    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return losses, chosen_rewards, rejected_rewards


def group_advantages(rewards: torch.Tensor, scale: str = "group") -> torch.Tensor:
    """Group-relative advantages: each completion's reward against its group's mean.

    Args:
        rewards: (G, K) one reward per completion, K completions per group.
        scale: ``group`` divides by the group's standard deviation (+1e-4),
            ``none`` keeps the centred rewards (Dr. GRPO).

    Returns:
        (G, K) advantages ``(r - mean) / (std + 1e-4)`` per group.
    """
    centred = rewards - rewards.mean(dim=1, keepdim=True)  # (G, K)
    if scale == "none":
        return centred
    if scale != "group":
        raise ValueError(f"unknown advantage scale {scale!r}; choose 'group' or 'none'")
    return centred / (rewards.std(dim=1, keepdim=True) + 1e-4)


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    beta: float = 0.04,
    loss_type: str = "grpo",
) -> torch.Tensor:
    """Clipped policy-gradient loss with a k3 KL penalty to the reference, per token.

    ``ratio = exp(logp - old_logp)``, ``pg = -min(ratio·A, clip(ratio, 1-ε, 1+ε_high)·A)``,
    ``kl = exp(ref - logp) - (ref - logp) - 1``, ``t = pg + β·kl``; then ``grpo`` averages
    each sequence over its tokens and then over sequences, ``dapo`` averages over all
    tokens of the batch, ``dr_grpo`` divides the sum by N × T.

    Args:
        logps: (N, T) per-token log-probs of the completions under the current policy.
        old_logps: (N, T) the same under the policy that the advantages were computed for.
        ref_logps: (N, T) the same under the frozen reference.
        advantages: (N,) one advantage per sequence.
        mask: (N, T) 1 for completion tokens, 0 for padding.
        epsilon: lower clip range.
        epsilon_high: upper clip range (DAPO's clip-higher); defaults to ``epsilon``.
        beta: weight of the KL penalty; 0 disables it.
        loss_type: ``grpo``, ``dapo`` or ``dr_grpo``.

    Returns:
        The scalar loss.
    """
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    mask = mask.to(logps.dtype)
    ratio = torch.exp(logps - old_logps)  # (N, T)
    adv = advantages.unsqueeze(1)  # (N, 1)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high)
    per_token = -torch.min(ratio * adv, clipped * adv)  # (N, T)
    if beta != 0.0:
        delta = ref_logps - logps
        per_token = per_token + beta * (torch.exp(delta) - delta - 1)

    if loss_type == "grpo":
        per_seq = (per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)  # (N,)
        return per_seq.mean()
    if loss_type == "dapo":
        return (per_token * mask).sum() / mask.sum().clamp(min=1)
    if loss_type == "dr_grpo":
        return (per_token * mask).sum() / (mask.shape[0] * mask.shape[1])
    raise ValueError(f"unknown GRPO loss_type {loss_type!r}; choose from {', '.join(GRPO_LOSS_TYPES)}")
