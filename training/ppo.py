"""PPO against a reward model learned from human judgements (the InstructGPT recipe).

At every rollout batch: sample one completion per training prompt from the current policy,
score it with the reward model, and build per-token rewards ``-kl_coef·k3`` with the score added
at the last token, where ``k3 = exp(log π_ref - log π_old) - (log π_ref - log π_old) - 1`` is the
non-negative KL estimate GRPO uses too (the reference is the starting model: the base with
LoRA adapters off, or a frozen copy for full fine-tuning). Optionally whiten those rewards over
the batch, estimate advantages and returns with GAE from a value head, whiten the advantages,
then take ``ppo_epochs`` optimizer steps on the batch with the clipped policy objective plus
``vf_coef`` times the clipped value loss. ``epochs`` is passes over the prompts. ``π_old`` and the
values GAE starts from are the batch's first update pass, detached, as online GRPO's old log-probs
are: the policy has not changed since it sampled the batch, so a rollout runs no pass of its own.

Departures from Ouyang et al. (2022) and TRL's PPOTrainer: the value head is a linear layer on
the policy's own body (no separate critic model, so no second copy with LoRA), initialised at
zero and discarded when the policy is saved; no pretraining-loss mix (PPO-ptx); one optimizer
step per PPO epoch over the whole rollout batch (no mini-batches); the KL coefficient is fixed.
Rollouts are trained and scored on the token ids the policy sampled (``Sample.token_ids``),
not on its text encoded again, which need not give those ids back. The penalty is k3 rather
than the plain log-ratio, whose per-sample estimate can go negative.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from training.config import PPOConfig
from training.data import SequenceBatch, collate_sequences, encode_prompt, prompt_key, prompt_messages
from training.generate import SamplingConfig
from training.logprobs import autocast_context, backbone_and_head, completion_mask, token_logps_chunked
from training.losses import gae, masked_whiten, ppo_policy_loss, ppo_value_loss
from training.rollouts import (
    frozen_reference,
    load_scorer,
    mean_sample_reward,
    prompt_plan,
    prompt_set,
    reference_token_logps,
    sample_and_score,
)
from training.runs import ProgressCallback, TrainResult, finish_run, load_policy, start_optimization


class PolicyWithValueHead(torch.nn.Module):
    """The policy and a value head on its body, trained together (one optimizer, one checkpoint)."""

    def __init__(self, lm: torch.nn.Module) -> None:
        super().__init__()
        self.lm = lm
        config: Any = lm.config
        self.value_head = torch.nn.Linear(config.hidden_size, 1).to(next(lm.parameters()).device)
        torch.nn.init.zeros_(self.value_head.weight)  # values start at 0: early advantages are the rewards
        torch.nn.init.zeros_(self.value_head.bias)

    def forward(self, batch: SequenceBatch, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token log-probs (N, T) of each completion and the values (N, T) of the states before each token."""
        backbone, head = backbone_and_head(self.lm)
        device = next(self.parameters()).device
        input_ids = batch.input_ids.to(device)
        hidden = backbone(
            input_ids=input_ids, attention_mask=batch.attention_mask.to(device), use_cache=False
        ).last_hidden_state  # (N, L, H)
        lengths = batch.completion_lengths.to(device)  # (N,)
        n, width = input_ids.shape[0], int(lengths.max())
        rows = torch.repeat_interleave(torch.arange(n, device=device), lengths)  # (M,) row of each token
        offset = torch.arange(rows.shape[0], device=device) - (torch.cumsum(lengths, 0) - lengths)[rows]  # (M,)
        position = batch.prompt_lengths.to(device)[rows] - 1 + offset  # (M,) the state that predicts the token
        states = hidden[rows, position]  # (M, H)
        token_logps = token_logps_chunked(states, head, input_ids[rows, position + 1], chunk_size)  # (M,)
        with torch.autocast(device.type, enabled=False):  # the value head stays in float32
            token_values = self.value_head(states.float()).squeeze(-1)  # (M,)
        logps = torch.zeros(n, width, device=device).index_put((rows, offset), token_logps.float())
        values = torch.zeros(n, width, device=device).index_put((rows, offset), token_values)
        return logps, values


def train_ppo(
    config: PPOConfig,
    *,
    train_examples: list[dict[str, Any]],
    eval_examples: list[dict[str, Any]],
    model: str,
    out_dir: Path,
    cache_dir: Path | None = None,
    progress: ProgressCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
    resume: bool = True,
) -> TrainResult:
    """Train ``model`` with PPO against ``config.reward_model`` and write the policy to ``out_dir``.

    Examples are any rows with a ``prompt``; held-out prompts are only sampled to measure the
    reward model's mean score before and after. Callbacks behave as in ``train_dpo``.
    """
    config.validate()
    if not config.reward_model:
        raise ValueError("reward_model is required: train one first (python -m training reward)")
    started = time.perf_counter()
    out_dir = Path(out_dir)
    setup = load_policy(config, model)
    policy, tokenizer, device, precision = setup.model, setup.tokenizer, setup.device, setup.precision
    scorer = load_scorer(config.reward_model, tokenizer, model, device)
    reference = frozen_reference(policy)
    actor = PolicyWithValueHead(policy)

    prompts = prompt_set(config, tokenizer, train_examples, eval_examples)
    sampling = prompts.sampling

    def mean_reward() -> dict[str, float | None]:
        return mean_sample_reward(
            policy,
            scorer,
            tokenizer,
            prompts.eval,
            samples=config.eval_samples,
            sampling=sampling,
            seed=config.seed + 1,
            batch_size=config.eval_batch_size,
            precision=precision,
            share_prompt=config.share_prompt,
        )

    before = mean_reward()

    plan = prompt_plan(
        len(prompts.train),
        batch_size=config.batch_size,
        epochs=config.epochs,
        seed=config.seed,
        min_steps=config.min_steps,
        steps_per_batch=config.ppo_epochs,
    )
    total_steps = len(plan) * config.ppo_epochs
    optimizer, params, scheduler, checkpoint, start_step = start_optimization(
        config,
        replace(setup, model=actor),
        total_steps=total_steps,
        out_dir=out_dir,
        data_keys=[prompt_key(p) for p in prompts.train],
        resume=resume,
    )
    torch.manual_seed(config.seed + start_step)  # rollouts after a resume are fresh samples, as they would be

    actor.train()
    cancelled = False
    last: dict[str, float] = {}
    rollout: _Rollout | None = None
    train_started = time.perf_counter()
    trained_tokens = 0
    for step in range(start_step, total_steps):
        if should_stop is not None and should_stop():
            cancelled = True
            break
        step_started = time.perf_counter()
        ppo_epoch = step % config.ppo_epochs
        if ppo_epoch == 0 or rollout is None:
            batch_prompts = [prompts.train[i] for i in plan[step // config.ppo_epochs]]
            rollout = _roll_out(actor, reference, scorer, tokenizer, batch_prompts, config, sampling, precision)
        batch, mask = rollout.batch, rollout.mask
        with autocast_context(precision, device):
            logps, values = actor(batch, config.logprob_chunk_size)  # (N, T), (N, T)
        if rollout.advantages is None:  # the batch's first epoch: the policy is still the one that sampled it
            _estimate_advantages(rollout, logps.detach(), values.detach(), config)
        assert rollout.advantages is not None and rollout.returns is not None
        policy_loss = ppo_policy_loss(logps, rollout.old_logps, rollout.advantages, mask, cliprange=config.cliprange)
        value_loss = ppo_value_loss(
            values, rollout.old_values, rollout.returns, mask, cliprange_value=config.cliprange_value
        )
        loss = policy_loss + config.vf_coef * value_loss
        loss.backward()
        if config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        lr = float(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        trained_tokens += batch.num_tokens

        with torch.no_grad():
            ratio = torch.exp(logps - rollout.old_logps)
            clipped = ((ratio - 1).abs() > config.cliprange).float()
            tokens = mask.sum()
        last = {
            "loss": float(loss.detach()),
            "policy_loss": float(policy_loss.detach()),
            "value_loss": float(value_loss.detach()),
            "reward": rollout.score_mean,
            "kl": rollout.kl,
            "response_length": rollout.length,
            "clip_fraction": float((clipped * mask).sum() / tokens),
            "ppo_epoch": float(ppo_epoch),
            "learning_rate": lr,
            "tokens_per_second": batch.num_tokens / max(time.perf_counter() - step_started, 1e-9),
        }
        if progress is not None:
            progress(step + 1, total_steps, last)
        at_batch_end = (step + 1) % config.ppo_epochs == 0
        if config.save_every and at_batch_end and (step + 1) % config.save_every == 0 and step + 1 < total_steps:
            checkpoint.save(actor, optimizer, scheduler, step + 1)

    train_seconds = time.perf_counter() - train_started
    metrics: dict[str, Any] = {
        "algorithm": "ppo",
        "precision": precision,
        "steps": total_steps,
        "resumed_from_step": start_step,
        "train_prompts": len(prompts.train),
        "eval_prompts": len(prompts.eval),
        "dropped_long_prompt": prompts.dropped_long_prompt,
        "reward_model": config.reward_model,
        "train_seconds": train_seconds,
        "train_tokens": trained_tokens,
        "tokens_per_second": trained_tokens / max(train_seconds, 1e-9),
        "eval_before": before,
        "last_step": last,
    }
    return finish_run(
        algorithm="ppo",
        config=config,
        policy=policy,
        tokenizer=tokenizer,
        base_model=model,
        out_dir=out_dir,
        metrics=metrics,
        checkpoint=checkpoint,
        cancelled=cancelled,
        evaluate_after=mean_reward,
        started=started,
    )


class _Rollout:
    """One rollout batch with what PPO's epochs on it need."""

    def __init__(self, batch: SequenceBatch, mask: torch.Tensor, scores: torch.Tensor, ref_logps: torch.Tensor) -> None:
        self.batch = batch
        self.mask = mask  # (N, T)
        self.scores = scores  # (N,) the reward model's
        self.ref_logps = ref_logps  # (N, T)
        # set by _estimate_advantages from the batch's first update pass
        self.old_logps = torch.zeros(0)  # (N, T)
        self.old_values = torch.zeros(0)  # (N, T)
        self.advantages: torch.Tensor | None = None  # (N, T)
        self.returns: torch.Tensor | None = None  # (N, T)
        self.kl = 0.0  # mean over sequences of the summed per-token k3 KL to the reference
        self.score_mean = float(scores.mean())
        self.length = float(batch.completion_lengths.float().mean())


@torch.no_grad()
def _roll_out(
    actor: PolicyWithValueHead,
    reference: torch.nn.Module | None,
    scorer: Any,
    tokenizer: Any,
    prompts: list[Any],
    config: PPOConfig,
    sampling: SamplingConfig,
    precision: str,
) -> _Rollout:
    """Sample one completion per prompt, score it, and take the reference's log-probs of it."""
    samples = sample_and_score(
        actor.lm,
        scorer,
        tokenizer,
        prompts,
        k=1,
        sampling=sampling,
        batch_size=config.eval_batch_size,
        precision=precision,
        share_prompt=config.share_prompt,
    )
    device = next(actor.parameters()).device
    prompt_ids = [encode_prompt(tokenizer, prompt_messages(p)) for p in prompts]
    batch = collate_sequences(prompt_ids, samples.completions, int(tokenizer.pad_token_id))
    ref_logps = reference_token_logps(
        actor.lm,
        reference,
        list(zip(prompt_ids, samples.completions, strict=True)),
        pad_id=int(tokenizer.pad_token_id),
        share_prompt=config.share_prompt,
        precision=precision,
        chunk=config.logprob_chunk_size,
    )
    mask = completion_mask(batch.completion_lengths).to(device)  # (N, T)
    return _Rollout(batch, mask, samples.rewards[:, 0].to(device), ref_logps)


@torch.no_grad()
def _estimate_advantages(
    rollout: _Rollout, old_logps: torch.Tensor, old_values: torch.Tensor, config: PPOConfig
) -> None:
    """Turn the scores and the KL to the reference into advantages and returns, from the log-probs and values
    of the policy that sampled the batch.

    Those are the batch's first update pass, detached: until its first optimizer step the policy is
    the one that sampled, so a pass of its own at rollout time would compute the same numbers again.
    """
    mask = rollout.mask
    rollout.old_logps, rollout.old_values = old_logps, old_values
    delta = rollout.ref_logps - old_logps
    kl = (torch.exp(delta) - delta - 1) * mask  # (N, T) k3: never negative
    rewards = -config.kl_coef * kl
    last = rollout.batch.completion_lengths.to(mask.device) - 1  # (N,)
    rewards[torch.arange(len(last), device=mask.device), last] += rollout.scores
    if config.whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False) * mask
    advantages, rollout.returns = gae(rewards, old_values, mask, gamma=config.gamma, lam=config.lam)
    rollout.advantages = masked_whiten(advantages, mask) * mask
    rollout.kl = float(kl.sum(dim=1).mean())
