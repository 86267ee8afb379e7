"""GRPO on groups of completions ranked by people: an offline variant of DeepSeekMath's GRPO.

DeepSeekMath (Shao et al., 2024) samples a fresh group of G outputs per question from the
current policy, scores them with a reward model, normalises the rewards inside the group
into advantages and takes μ clipped policy-gradient steps per batch with a k3 KL penalty
to a frozen reference. This module keeps the objective and departs from the procedure:

- **Offline groups.** Completions are not sampled during training; they are the groups
  people ranked (written earlier by a previous model version, another model, or a
  person). The ratio ``π/π_old`` is therefore taken against the policy snapshot at the
  start of each batch's iterations, not against the model that wrote the data, and no
  correction is made for that distribution shift; the KL term to the reference is what
  keeps the policy near the data.
- **Rewards from human ranks.** One reward per completion: an annotator's ranking of K
  completions gives ``(K - rank) / (K - 1)`` with ties sharing the mean of their places,
  averaged over annotators (or the export's ``rewards`` as given). No reward model,
  no per-step (process) rewards.
- **Equal-reward groups are skipped.** Their advantages are all zero, so they would only
  contribute the KL term; they are dropped and counted instead.
- **μ = ``num_iterations`` passes per batch.** The first pass takes the old log-probs from
  its own forward (ratio 1, no extra pass); later passes reuse them, so clipping acts.
- **Reference log-probs computed once.** With a fixed dataset the reference's per-token
  log-probs are computed before training and cached on disk, so the reference never runs
  during training (no second model copy, even for full fine-tuning).
- **Loss normalisation** is selectable: ``grpo`` (per sequence, as in the paper), ``dapo``
  (per token over the batch) or ``dr_grpo`` (sum / (N × T), with ``advantage_scale="none"``
  for Dr. GRPO proper).

Under several processes (``training.parallel``) each takes its share of every micro-batch's
groups and scales its loss by ``loss_share``, so that the gradients summed before the step
are those of the whole micro-batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from training.config import GRPOConfig
from training.data import GroupExample, collate_sequences, pairs_from_groups, sequence_key, tokenize_groups
from training.logprobs import (
    autocast_context,
    completion_mask,
    grouped_logps,
    padded_from_keys,
)
from training.losses import group_advantages, grpo_loss
from training.runs import (
    ProgressCallback,
    TrainResult,
    evaluate_pairs,
    finish_run,
    load_policy,
    start_optimization,
    step_plan,
)


def train_grpo(
    config: GRPOConfig,
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
    """Train ``model`` with offline GRPO on ranked groups and write the result to ``out_dir``.

    ``train_examples`` / ``eval_examples`` are GRPO export rows (``prompt``,
    ``completions``, ``rewards`` or ``ranks``). Held-out groups are scored as every
    (better, worse) pair inside them, and by Kendall's tau between the model's log-probs and
    the human rewards, before (the parent) and after training. Callbacks behave as in ``train_dpo``.
    """
    config.validate()
    started = time.perf_counter()
    out_dir = Path(out_dir)
    setup = load_policy(config, model)
    policy, pad_id, device, precision, ranks = setup.model, setup.pad_id, setup.device, setup.precision, setup.ranks

    lengths_kw: dict[str, Any] = {"max_length": config.max_length, "max_prompt_length": config.max_prompt_length}
    train = tokenize_groups(train_examples, setup.tokenizer, **lengths_kw)
    held = tokenize_groups(eval_examples, setup.tokenizer, **lengths_kw)
    groups: list[GroupExample] = train.examples
    if not groups:
        raise ValueError(
            f"no training groups left ({train.dropped_equal_rewards} with all rewards equal, "
            f"{train.dropped_long_prompt} with a prompt longer than {config.max_prompt_length} tokens)"
        )
    train_prompts = {g.prompt_key for g in groups}
    eval_groups = [g for g in held.examples if g.prompt_key not in train_prompts]
    eval_pairs = pairs_from_groups(eval_groups)

    sequences = [(g.prompt_ids, c) for g in groups for c in g.completion_ids]
    sequences += [(p.prompt_ids, c) for p in eval_pairs for c in (p.chosen_ids, p.rejected_ids)]
    ref, ref_computed, ref_seconds = setup.reference(config, sequences, cache_dir)

    eval_kwargs: dict[str, Any] = {"beta": config.eval_beta, "pad_id": pad_id, "batch_size": config.eval_batch_size}
    eval_kwargs["share_prompt"] = config.share_prompt
    eval_kwargs["groups"] = eval_groups
    before = evaluate_pairs(None, eval_pairs, ref, precision=precision, **eval_kwargs)

    lengths = [len(g.prompt_ids) * len(g.completion_ids) + sum(map(len, g.completion_ids)) for g in groups]
    plan = step_plan(
        lengths,
        config.batch_size,
        config.gradient_accumulation,
        config.epochs,
        config.seed,
        min_steps=config.min_steps,
        steps_per_batch=config.num_iterations,
    )
    total_steps = len(plan) * config.num_iterations
    optimizer, params, scheduler, checkpoint, start_step = start_optimization(
        config,
        setup,
        total_steps=total_steps,
        out_dir=out_dir,
        data_keys=[sequence_key(*s) for s in sequences],
        resume=resume,
    )

    policy.train()
    cancelled = False
    last: dict[str, float] = {}
    old_logps: dict[int, torch.Tensor] = {}  # by micro-batch, snapshotted at the batch's first iteration
    train_started = time.perf_counter()
    trained_tokens = 0
    steps_since_save = 0
    for step in range(start_step, total_steps):
        if ranks.agree(ranks.main and should_stop is not None and should_stop()):
            cancelled = True
            break
        step_started = time.perf_counter()
        micro_batches = plan[step // config.num_iterations]
        iteration = step % config.num_iterations
        if iteration == 0:
            old_logps = {}
        sums = {"loss": 0.0, "kl": 0.0, "clipped": 0.0, "tokens": 0.0, "advantage": 0.0, "sequences": 0.0}
        sums["batch_tokens"] = 0.0
        for m, whole in enumerate(micro_batches):
            idx = ranks.share(whole)
            if not idx:
                continue
            batch_groups = [groups[i] for i in idx]
            prompts = [g.prompt_ids for g in batch_groups for _ in g.completion_ids]
            completions = [c for g in batch_groups for c in g.completion_ids]
            batch = collate_sequences(prompts, completions, pad_id)  # N = sum of K over the groups
            sums["batch_tokens"] += batch.num_tokens
            advantages = torch.cat(
                [group_advantages(torch.tensor([g.rewards]), config.advantage_scale)[0] for g in batch_groups]
            ).to(device)  # (N,)
            mask = completion_mask(batch.completion_lengths).to(device)  # (N, T)
            ref_tokens = padded_from_keys(
                ref, [sequence_key(p, c) for p, c in zip(prompts, completions, strict=True)], mask.shape[1]
            ).to(device)  # (N, T)

            with autocast_context(precision, device):
                logps = grouped_logps(
                    policy,
                    list(zip(prompts, completions, strict=True)),
                    pad_id=pad_id,
                    share_prompt=config.share_prompt,
                    chunk_size=config.logprob_chunk_size,
                )  # (N, T)
                logps = logps.float()
            if iteration == 0:
                old_logps[m] = logps.detach()
            old = old_logps[m]
            loss = grpo_loss(
                logps,
                old,
                ref_tokens,
                advantages,
                mask,
                epsilon=config.epsilon,
                epsilon_high=config.epsilon_high,
                beta=config.beta,
                loss_type=config.loss_type,
            )
            if ranks.parallel:
                loss = loss * loss_share(config.loss_type, batch_groups, [groups[i] for i in whole])
            (loss / len(micro_batches)).backward()

            with torch.no_grad():
                ratio = torch.exp(logps - old)
                high = config.epsilon if config.epsilon_high is None else config.epsilon_high
                adv = advantages.unsqueeze(1)
                clipped = ((ratio < 1 - config.epsilon) & (adv < 0)) | ((ratio > 1 + high) & (adv > 0))
                delta = ref_tokens - logps
                kl = torch.exp(delta) - delta - 1
                sums["loss"] += float(loss) / len(micro_batches)
                sums["kl"] += float((kl * mask).sum())
                sums["clipped"] += float((clipped.float() * mask).sum())
                sums["tokens"] += float(mask.sum())
                sums["advantage"] += float(advantages.abs().sum())
                sums["sequences"] += advantages.shape[0]
        ranks.sum_gradients(params)
        sums = ranks.total(sums)
        step_tokens = int(sums["batch_tokens"])
        if config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        lr = float(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        trained_tokens += step_tokens

        last = {
            "loss": sums["loss"],
            "kl": sums["kl"] / sums["tokens"],
            "clip_fraction": sums["clipped"] / sums["tokens"],
            "advantage_abs_mean": sums["advantage"] / sums["sequences"],
            "iteration": float(iteration),
            "learning_rate": lr,
            "tokens_per_second": step_tokens / max(time.perf_counter() - step_started, 1e-9),
        }
        if progress is not None and ranks.main:
            progress(step + 1, total_steps, last)
        steps_since_save += 1
        at_batch_end = (step + 1) % config.num_iterations == 0
        if config.save_every and at_batch_end and steps_since_save >= config.save_every and step + 1 < total_steps:
            checkpoint.save(policy, optimizer, scheduler, step + 1)  # old log-probs need not be saved here
            steps_since_save = 0

    train_seconds = time.perf_counter() - train_started
    metrics: dict[str, Any] = {
        "algorithm": "grpo",
        "precision": precision,
        "steps": total_steps,
        "resumed_from_step": start_step,
        "train_groups": len(groups),
        "eval_pairs": len(eval_pairs),
        "dropped_long_prompt": train.dropped_long_prompt + held.dropped_long_prompt,
        "dropped_equal_rewards": train.dropped_equal_rewards + held.dropped_equal_rewards,
        "truncated": train.truncated + held.truncated,
        "reference_computed": ref_computed,
        "reference_cached": len({sequence_key(*s) for s in sequences}) - ref_computed,
        "reference_seconds": ref_seconds,
        "train_seconds": train_seconds,
        "train_tokens": trained_tokens,
        "tokens_per_second": trained_tokens / max(train_seconds, 1e-9),
        "eval_before": before,
        "last_step": last,
    }
    return finish_run(
        algorithm="grpo",
        config=config,
        policy=policy,
        tokenizer=setup.tokenizer,
        base_model=model,
        out_dir=out_dir,
        metrics=metrics,
        checkpoint=checkpoint,
        cancelled=cancelled,
        evaluate_after=lambda: evaluate_pairs(policy, eval_pairs, ref, precision=precision, **eval_kwargs),
        started=started,
        ranks=ranks,
    )


def loss_share(loss_type: str, mine: list[GroupExample], whole: list[GroupExample]) -> float:
    """The part of a micro-batch's ``grpo_loss`` that one process's groups (``mine``, out of ``whole``) make up.

    ``grpo_loss`` divides by the sequences (``grpo``), the completion tokens (``dapo``) or the
    sequences × the longest completion (``dr_grpo``) of the batch it is given; a process's loss
    over its share times this, summed over the processes, is the loss of the whole micro-batch.
    """

    def normaliser(batch: list[GroupExample]) -> int:
        lengths = [len(c) for g in batch for c in g.completion_ids]
        if loss_type == "grpo":
            return len(lengths)
        if loss_type == "dapo":
            return sum(lengths)
        return len(lengths) * max(lengths)  # dr_grpo

    return normaliser(mine) / normaliser(whole)
