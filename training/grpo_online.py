"""Online GRPO: the policy samples K completions per prompt and a reward model scores them.

This is DeepSeekMath's GRPO (Shao et al., 2024) as the paper runs it, where ``grpo.py`` is its
offline variant on groups people ranked: at every step a batch of training prompts is sampled
``num_generations`` times from the current policy (``training.generate``), the reward model
(``training.reward``) scores each completion, rewards become advantages inside each prompt's
group (``group_advantages``) and ``num_iterations`` clipped steps of ``grpo_loss`` follow, with
the k3 KL penalty to the reference (the base with LoRA adapters off, or a frozen copy for full
fine-tuning). Any prompt of the project can train it, judged or not; held-out prompts are only
sampled to measure the reward model's mean score before and after. Departures: one reward per
completion (no process rewards), and groups whose K rewards are all equal are skipped.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from training.config import OnlineGRPOConfig
from training.data import encode_prompt, prompt_key, prompt_messages
from training.generate import SamplingConfig
from training.logprobs import autocast_context, completion_mask, grouped_logps
from training.losses import group_advantages, grpo_loss
from training.reward import RewardModel
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


def train_grpo_online(
    config: OnlineGRPOConfig,
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
    """Train ``model`` with online GRPO against ``config.reward_model`` and write the result to ``out_dir``.

    Examples are any rows with a ``prompt`` (prompts files, or either export); only the prompts
    are used, each once. Callbacks behave as in ``train_dpo``; ``cache_dir`` is not used.
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
        steps_per_batch=config.num_iterations,
    )
    total_steps = len(plan) * config.num_iterations
    optimizer, params, scheduler, checkpoint, start_step = start_optimization(
        config,
        setup,
        total_steps=total_steps,
        out_dir=out_dir,
        data_keys=[prompt_key(p) for p in prompts.train],
        resume=resume,
    )
    torch.manual_seed(config.seed + start_step)  # rollouts after a resume differ from the lost ones, as they would

    policy.train()
    cancelled = False
    last: dict[str, float] = {}
    rollout: _Rollout | None = None
    skipped_groups = 0
    train_started = time.perf_counter()
    trained_tokens = 0
    for step in range(start_step, total_steps):
        if should_stop is not None and should_stop():
            cancelled = True
            break
        step_started = time.perf_counter()
        iteration = step % config.num_iterations
        if iteration == 0 or rollout is None:
            batch_indices = plan[step // config.num_iterations]
            rollout = _roll_out(
                policy,
                reference,
                scorer,
                tokenizer,
                [prompts.train[i] for i in batch_indices],
                config,
                sampling,
                precision,
            )
            skipped_groups += rollout.skipped
        metrics = {"reward": rollout.reward_mean, "reward_std": rollout.reward_std, "response_length": rollout.length}
        if not rollout.sequences:  # every group had equal rewards: nothing to learn from this batch
            scheduler.step()
            last = {"loss": 0.0, "kl": 0.0, **metrics, "learning_rate": float(scheduler.get_last_lr()[0])}
            if progress is not None:
                progress(step + 1, total_steps, {**last, "tokens_per_second": 0.0})
            continue
        mask = rollout.mask
        with autocast_context(precision, device):
            logps = grouped_logps(
                policy,
                rollout.sequences,
                pad_id=setup.pad_id,
                share_prompt=config.share_prompt,
                chunk_size=config.logprob_chunk_size,
            ).float()  # (N, T)
        if iteration == 0:
            rollout.old_logps = logps.detach()
        loss = grpo_loss(
            logps,
            rollout.old_logps,
            rollout.ref_logps,
            rollout.advantages,
            mask,
            epsilon=config.epsilon,
            epsilon_high=config.epsilon_high,
            beta=config.beta,
            loss_type=config.loss_type,
        )
        loss.backward()
        if config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        lr = float(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        trained_tokens += rollout.tokens
        with torch.no_grad():
            delta = rollout.ref_logps - logps
            kl = float(((torch.exp(delta) - delta - 1) * mask).sum() / mask.sum())
        last = {
            "loss": float(loss.detach()),
            "kl": kl,
            **metrics,
            "iteration": float(iteration),
            "learning_rate": lr,
            "tokens_per_second": rollout.tokens / max(time.perf_counter() - step_started, 1e-9),
        }
        if progress is not None:
            progress(step + 1, total_steps, last)
        at_batch_end = (step + 1) % config.num_iterations == 0
        if config.save_every and at_batch_end and (step + 1) % config.save_every == 0 and step + 1 < total_steps:
            checkpoint.save(policy, optimizer, scheduler, step + 1)

    train_seconds = time.perf_counter() - train_started
    metrics_out: dict[str, Any] = {
        "algorithm": "grpo_online",
        "precision": precision,
        "steps": total_steps,
        "resumed_from_step": start_step,
        "train_prompts": len(prompts.train),
        "eval_prompts": len(prompts.eval),
        "dropped_long_prompt": prompts.dropped_long_prompt,
        "skipped_equal_reward_groups": skipped_groups,
        "reward_model": config.reward_model,
        "train_seconds": train_seconds,
        "train_tokens": trained_tokens,
        "tokens_per_second": trained_tokens / max(train_seconds, 1e-9),
        "eval_before": before,
        "last_step": last,
    }
    return finish_run(
        algorithm="grpo_online",
        config=config,
        policy=policy,
        tokenizer=tokenizer,
        base_model=model,
        out_dir=out_dir,
        metrics=metrics_out,
        checkpoint=checkpoint,
        cancelled=cancelled,
        evaluate_after=mean_reward,
        started=started,
    )


class _Rollout:
    """One batch of sampled groups: their tokens, advantages, reference and old log-probs, and reward figures."""

    def __init__(self) -> None:
        self.sequences: list[tuple[list[int], list[int]]] = []  # (prompt, completion) ids, group by group
        self.tokens = 0  # their prompt and completion tokens
        self.mask = torch.zeros(0)
        self.advantages = torch.zeros(0)
        self.ref_logps = torch.zeros(0)
        self.old_logps = torch.zeros(0)
        self.skipped = 0
        self.reward_mean = 0.0
        self.reward_std = 0.0
        self.length = 0.0


@torch.no_grad()
def _roll_out(
    policy: torch.nn.Module,
    reference: torch.nn.Module | None,
    scorer: RewardModel,
    tokenizer: Any,
    prompts: list[Any],
    config: OnlineGRPOConfig,
    sampling: SamplingConfig,
    precision: str,
) -> _Rollout:
    """Sample K completions per prompt, score them, and keep the groups whose rewards differ."""
    out = _Rollout()
    k = config.num_generations
    samples = sample_and_score(
        policy,
        scorer,
        tokenizer,
        prompts,
        k=k,
        sampling=sampling,
        batch_size=config.eval_batch_size,
        precision=precision,
        share_prompt=config.share_prompt,
    )
    rewards, completions = samples.rewards, samples.completions  # (G, K), G·K token lists
    out.reward_mean, out.reward_std = float(rewards.mean()), float(rewards.std(dim=1).mean())
    out.length = sum(map(len, completions)) / len(completions)
    keep = [g for g in range(len(prompts)) if float(rewards[g].max() - rewards[g].min()) > 1e-6]
    out.skipped = len(prompts) - len(keep)
    if not keep:
        return out
    prompt_ids = [encode_prompt(tokenizer, prompt_messages(prompts[g])) for g in keep]
    device = next(policy.parameters()).device
    out.sequences = [(prompt_ids[i], completions[g * k + j]) for i, g in enumerate(keep) for j in range(k)]
    out.tokens = sum(len(p) + len(c) for p, c in out.sequences)
    out.mask = completion_mask(torch.tensor([len(c) for _, c in out.sequences])).to(device)  # (N, T)
    out.advantages = group_advantages(rewards[keep], config.advantage_scale).flatten().to(device)  # (N,)
    out.ref_logps = reference_token_logps(
        policy,
        reference,
        out.sequences,
        pad_id=int(tokenizer.pad_token_id),
        share_prompt=config.share_prompt,
        precision=precision,
        chunk=config.logprob_chunk_size,
    )  # (N, T)
    return out
