"""Preference losses as pure functions of log-prob tensors (no models, no state).

B is the number of pairs, G the number of groups, K completions per group, N the
number of sequences in a GRPO batch and T their longest completion in tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from training.loss_types import DPO_LOSS_TYPES, GRPO_LOSS_TYPES


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


def bradley_terry_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    *,
    margins: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Negative log-likelihood of each pair under Bradley-Terry: ``-logσ(r_c - r_r - m)``.

    A margin ``m`` (as TRL's RewardTrainer reads from a ``margin`` column) asks the chosen
    side to win by at least that much before the loss flattens out.

    Args:
        chosen_rewards: (B,) scalar rewards of the chosen completions.
        rejected_rewards: (B,) rewards of the rejected completions.
        margins: (B,) optional per-pair margins.
        weights: (B,) optional per-pair weights multiplied into the losses.

    Returns:
        (B,) the loss of each pair.
    """
    diff = chosen_rewards - rejected_rewards  # (B,)
    if margins is not None:
        diff = diff - margins
    losses = -F.logsigmoid(diff)
    return losses if weights is None else losses * weights


def plackett_luce_loss(rewards: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of one ranking with ties under Plackett-Luce.

    Plackett-Luce draws completions best first, each with probability ``exp(r_i)`` over the
    sum of ``exp(r)`` of those not yet drawn. Tied completions share their place: the
    ranking says only that they come after every better tier and before every worse one,
    in some order, so its likelihood is the sum of the probabilities of all orderings that
    agree with it. Tiers factorise (what is left after a tier does not depend on the order
    inside it), and within a tier the sum over its t! orders is computed exactly over its
    2^t subsets: ``f(S) = Σ_{i∈S} f(S∖i) · exp(r_i) / Σ_{j ∉ S∖i, j not in a better tier} exp(r_j)``,
    with ``f(∅) = 1``; the tier contributes ``f(tier)``. Without ties this is the usual
    Plackett-Luce likelihood.

    Args:
        rewards: (K,) scalar rewards of the K completions.
        ranks: (K,) their ranks, 1 = best; equal ranks are ties (any numbers, only the order counts).

    Returns:
        The scalar ``-log P(ranking)``.
    """
    if rewards.shape != ranks.shape or rewards.dim() != 1:
        raise ValueError("rewards and ranks must both have shape (K,)")
    log_likelihood = rewards.new_zeros(())
    for rank in torch.unique(ranks):  # sorted ascending: best tier first
        tier = (ranks == rank).nonzero().flatten()  # (t,)
        later = ranks > rank  # (K,) completions that come after this tier
        log_likelihood = log_likelihood + _tier_log_probability(rewards[tier], rewards[later])
    return -log_likelihood


def _tier_log_probability(tier: torch.Tensor, later: torch.Tensor) -> torch.Tensor:
    """log P(the ``tier`` rewards (t,) are all drawn, in any order, before the ``later`` ones (L,))."""
    t, device = tier.shape[0], tier.device  # the index tensors live beside the rewards (CPU or GPU)
    items = torch.arange(t, device=device)
    masks = torch.arange(1 << t, device=device)
    members = (masks.unsqueeze(1) >> items) & 1 == 1  # (2^t, t): which tier items each subset holds
    size = members.sum(dim=1)
    # log Σ exp(r) over what is still undrawn once subset S is drawn: the rest of the tier and the later ones
    undrawn = torch.where(members, -math.inf, tier)  # (2^t, t)
    if later.numel():
        undrawn = torch.cat([undrawn, later.logsumexp(0).expand(1 << t, 1)], dim=1)
    log_pool = undrawn.logsumexp(dim=1)  # (2^t,)
    position = torch.zeros(1 << t, dtype=torch.long, device=device)  # each subset's index inside its size layer
    layers = [tier.new_zeros(1)]  # log f over the subsets of each size; f(∅) = 1
    for s in range(1, t + 1):
        layer_masks = masks[size == s]  # (M,)
        position[layer_masks] = torch.arange(len(layer_masks), device=device)
        holds = members[layer_masks]  # (M, t)
        # (M, t): the subset without item i, where it holds i (else the empty set, masked out below)
        before = torch.where(holds, layer_masks.unsqueeze(1) ^ (1 << items), 0)
        terms = layers[s - 1][position[before]] + tier - log_pool[before]  # (M, t)
        layers.append(torch.where(holds, terms, -math.inf).logsumexp(dim=1))
    return layers[t][0]


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True) -> torch.Tensor:
    """``(x - mean) / std`` over the masked entries; with ``shift_mean=False`` the mean is put back.

    Args:
        values: (N, T) any per-token values.
        mask: (N, T) 1 where a value counts.

    Returns:
        (N, T) whitened values (zero where the mask is 0 only if they were).
    """
    mask = mask.to(values.dtype)
    count = mask.sum().clamp(min=1)
    mean = (values * mask).sum() / count
    variance = (((values - mean) * mask) ** 2).sum() / (count - 1).clamp(min=1)
    whitened = (values - mean) * torch.rsqrt(variance + 1e-8)
    return whitened if shift_mean else whitened + mean


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al., 2016) over completion tokens.

    ``δ_t = r_t + γ·V_{t+1} - V_t`` (``V`` is 0 after a sequence's last token),
    ``A_t = δ_t + γλ·A_{t+1}``, returns ``A_t + V_t``.

    Args:
        rewards: (N, T) per-token rewards (the KL penalty, and the score at the last token).
        values: (N, T) value estimates of the state before each token.
        mask: (N, T) 1 for completion tokens, 0 for padding.
        gamma: discount.
        lam: GAE's λ.

    Returns:
        advantages: (N, T), zero on padding.
        returns: (N, T) the value targets.
    """
    mask = mask.to(values.dtype)
    values = values * mask
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])  # (N,)
    for t in reversed(range(values.shape[1])):
        next_value = values[:, t + 1] if t + 1 < values.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


def ppo_policy_loss(
    logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *, cliprange: float
) -> torch.Tensor:
    """PPO's clipped surrogate, ``max(-A·ratio, -A·clip(ratio, 1-ε, 1+ε))``, averaged over the masked tokens.

    Args:
        logps: (N, T) per-token log-probs under the policy being trained.
        old_logps: (N, T) the same under the policy that sampled the rollouts.
        advantages: (N, T) per-token advantages.
        mask: (N, T) 1 for completion tokens.
        cliprange: ε.

    Returns:
        The scalar loss.
    """
    mask = mask.to(logps.dtype)
    ratio = torch.exp(logps - old_logps)
    per_token = torch.max(-advantages * ratio, -advantages * torch.clamp(ratio, 1 - cliprange, 1 + cliprange))
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    cliprange_value: float,
) -> torch.Tensor:
    """The clipped value loss, ``½·max((V - R)², (V_old + clip(V - V_old, ±ε_v) - R)²)`` over the masked tokens.

    Args:
        values: (N, T) the value head's estimates now.
        old_values: (N, T) its estimates when the rollouts were made.
        returns: (N, T) the GAE returns.
        mask: (N, T) 1 for completion tokens.
        cliprange_value: ε_v.

    Returns:
        The scalar loss.
    """
    mask = mask.to(values.dtype)
    clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    per_token = 0.5 * torch.max((values - returns) ** 2, (clipped - returns) ** 2)
    return (per_token * mask).sum() / mask.sum().clamp(min=1)
