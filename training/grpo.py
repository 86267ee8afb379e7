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
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from training.data import GroupExample, collate_sequences, pairs_from_groups, sequence_key, tokenize_groups
from training.logprobs import (
    ReferenceCache,
    autocast_context,
    completion_logps,
    completion_mask,
    model_fingerprint,
    padded_from_keys,
    reference_logps,
    shared_prompt_logps,
)
from training.losses import GRPO_LOSS_TYPES, group_advantages, grpo_loss
from training.models import LoraSettings, apply_lora, load_model, tune_for_training
from training.runs import (
    ProgressCallback,
    RunCheckpoint,
    TrainResult,
    evaluate_pairs,
    finish_run,
    lr_factor,
    make_optimizer,
    resolve_precision,
    run_fingerprint,
    step_plan,
)


@dataclass
class GRPOConfig:
    beta: float = 0.04  # weight of the k3 KL penalty to the frozen reference; 0 disables it
    epsilon: float = 0.2  # lower clip range of the probability ratio
    epsilon_high: float | None = None  # upper clip range (DAPO clip-higher); None: same as epsilon
    loss_type: str = "grpo"  # grpo | dapo | dr_grpo: how per-token losses are averaged
    advantage_scale: str = "group"  # group: divide by the group's reward std; none: only centre (Dr. GRPO)
    num_iterations: int = 2  # optimizer steps per batch of groups (μ); >1 makes clipping matter
    learning_rate: float = 5e-5  # peak AdamW learning rate (LoRA; use ~1e-6 for full fine-tuning)
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    warmup_ratio: float = 0.1  # share of steps with a linear learning-rate warmup
    lr_scheduler: str = "cosine"  # cosine | linear | constant, after warmup
    epochs: int = 1  # passes over the groups
    batch_size: int = 2  # groups per forward pass (all K completions of each group together)
    gradient_accumulation: int = 1  # forward passes per optimizer step
    max_grad_norm: float = 1.0  # gradient clipping by global norm; 0 disables
    max_length: int = 512  # prompt + completion tokens; completions are cut to fit
    max_prompt_length: int = 256  # groups whose prompt alone is longer are dropped
    lora: bool = True  # train LoRA adapters; False: full fine-tuning
    lora_r: int = 16  # LoRA rank
    lora_alpha: int = 32  # LoRA scaling numerator (updates scaled by alpha / r)
    lora_dropout: float = 0.0  # dropout on the LoRA input
    merge_lora: bool = False  # save merged full weights instead of the adapter
    precision: str = "auto"  # auto | bf16 | fp32; auto uses bf16 autocast where the hardware is fast at it
    eval_beta: float = 0.1  # β of the implicit reward in held-out metrics (comparable with DPO runs)
    eval_batch_size: int = 8  # pairs per forward pass when scoring held-out pairs and the reference
    logprob_chunk_size: int = 2048  # completion positions per chunk of the output projection
    share_prompt: bool = True  # run each prompt once for all K completions of its group (shared KV cache)
    save_every: int = 50  # optimizer steps between resumable checkpoints (at batch boundaries); 0 disables
    seed: int = 0  # seeds batch order and adapter initialisation

    def validate(self) -> None:
        """Raise ValueError for values or combinations that make no sense."""
        if self.loss_type not in GRPO_LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {', '.join(GRPO_LOSS_TYPES)}, not {self.loss_type!r}")
        if self.advantage_scale not in ("group", "none"):
            raise ValueError("advantage_scale must be group or none")
        if self.beta < 0:
            raise ValueError("beta must not be negative")
        if not 0 < self.epsilon < 1 or (self.epsilon_high is not None and self.epsilon_high <= 0):
            raise ValueError("epsilon must be in (0, 1) and epsilon_high positive")
        if self.num_iterations < 1:
            raise ValueError("num_iterations must be at least 1")
        if self.lr_scheduler not in ("cosine", "linear", "constant"):
            raise ValueError("lr_scheduler must be cosine, linear or constant")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError("precision must be auto, bf16 or fp32")
        if min(self.epochs, self.batch_size, self.gradient_accumulation, self.eval_batch_size) < 1:
            raise ValueError("epochs, batch sizes and gradient_accumulation must be at least 1")
        if self.learning_rate <= 0 or self.eval_beta <= 0:
            raise ValueError("learning_rate and eval_beta must be positive")
        if not 0 < self.max_prompt_length < self.max_length:
            raise ValueError("max_prompt_length must be positive and smaller than max_length")
        if self.merge_lora and not self.lora:
            raise ValueError("merge_lora needs lora")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError("warmup_ratio must be in [0, 1)")


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
    (better, worse) pair inside them. Callbacks behave as in ``train_dpo``.
    """
    config.validate()
    started = time.perf_counter()
    out_dir = Path(out_dir)
    torch.manual_seed(config.seed)
    policy: torch.nn.Module
    policy, tokenizer = load_model(model)
    pad_id = int(tokenizer.pad_token_id)  # type: ignore[arg-type]
    device = next(policy.parameters()).device
    precision = resolve_precision(config.precision, device)

    lengths_kw = {"max_length": config.max_length, "max_prompt_length": config.max_prompt_length}
    train = tokenize_groups(train_examples, tokenizer, **lengths_kw)
    held = tokenize_groups(eval_examples, tokenizer, **lengths_kw)
    groups: list[GroupExample] = train.examples
    if not groups:
        raise ValueError(
            f"no training groups left ({train.dropped_equal_rewards} with all rewards equal, "
            f"{train.dropped_long_prompt} with a prompt longer than {config.max_prompt_length} tokens)"
        )
    train_prompts = {g.prompt_key for g in groups}
    eval_pairs = pairs_from_groups([g for g in held.examples if g.prompt_key not in train_prompts])

    if config.lora:
        policy = apply_lora(policy, LoraSettings(config.lora_r, config.lora_alpha, config.lora_dropout))
    tune_for_training(policy, precision=precision, bf16_frozen_base=config.lora and not config.merge_lora)

    ref_started = time.perf_counter()
    fingerprint = model_fingerprint(model, precision)
    cache = ReferenceCache(cache_dir, fingerprint)
    sequences = [(g.prompt_ids, c) for g in groups for c in g.completion_ids]
    sequences += [(p.prompt_ids, c) for p in eval_pairs for c in (p.chosen_ids, p.rejected_ids)]
    ref, ref_computed = reference_logps(
        policy,
        sequences,
        cache,
        pad_id=pad_id,
        batch_size=2 * config.eval_batch_size,
        precision=precision,
        chunk_size=config.logprob_chunk_size,
        share_prompt=config.share_prompt,
    )
    ref_seconds = time.perf_counter() - ref_started

    eval_kwargs: dict[str, Any] = {"beta": config.eval_beta, "pad_id": pad_id, "batch_size": config.eval_batch_size}
    before = evaluate_pairs(None, eval_pairs, ref, precision=precision, **eval_kwargs)

    lengths = [len(g.prompt_ids) * len(g.completion_ids) + sum(map(len, g.completion_ids)) for g in groups]
    plan = step_plan(lengths, config.batch_size, config.gradient_accumulation, config.epochs, config.seed)
    total_steps = len(plan) * config.num_iterations
    optimizer, params = make_optimizer(policy, lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_factor(config.lr_scheduler, int(config.warmup_ratio * total_steps), total_steps)
    )
    checkpoint = RunCheckpoint(
        out_dir, run_fingerprint(asdict(config), fingerprint, [sequence_key(*s) for s in sequences])
    )
    start_step = checkpoint.load(policy, optimizer, scheduler) if resume else 0

    policy.train()
    cancelled = False
    last: dict[str, float] = {}
    old_logps: list[torch.Tensor] = []  # per micro-batch, snapshotted at the batch's first iteration
    train_started = time.perf_counter()
    trained_tokens = 0
    steps_since_save = 0
    for step in range(start_step, total_steps):
        if should_stop is not None and should_stop():
            cancelled = True
            break
        step_started = time.perf_counter()
        micro_batches = plan[step // config.num_iterations]
        iteration = step % config.num_iterations
        if iteration == 0:
            old_logps = []
        sums = {"loss": 0.0, "kl": 0.0, "clipped": 0.0, "tokens": 0.0, "advantage": 0.0, "sequences": 0.0}
        step_tokens = 0
        for m, idx in enumerate(micro_batches):
            batch_groups = [groups[i] for i in idx]
            prompts = [g.prompt_ids for g in batch_groups for _ in g.completion_ids]
            completions = [c for g in batch_groups for c in g.completion_ids]
            batch = collate_sequences(prompts, completions, pad_id)  # N = sum of K over the groups
            step_tokens += batch.num_tokens
            advantages = torch.cat(
                [group_advantages(torch.tensor([g.rewards]), config.advantage_scale)[0] for g in batch_groups]
            ).to(device)  # (N,)
            mask = completion_mask(batch.completion_lengths).to(device)  # (N, T)
            ref_tokens = padded_from_keys(
                ref, [sequence_key(p, c) for p, c in zip(prompts, completions, strict=True)], mask.shape[1]
            ).to(device)  # (N, T)

            with autocast_context(precision, device):
                if config.share_prompt:
                    owner = [g for g, group in enumerate(batch_groups) for _ in group.completion_ids]
                    logps = shared_prompt_logps(
                        policy,
                        [group.prompt_ids for group in batch_groups],
                        completions,
                        owner,
                        pad_id=pad_id,
                        chunk_size=config.logprob_chunk_size,
                    )  # (N, T)
                else:
                    logps = completion_logps(policy, batch, chunk_size=config.logprob_chunk_size)  # (N, T)
                logps = logps.float()
            if iteration == 0:
                old_logps.append(logps.detach())
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
        if progress is not None:
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
        tokenizer=tokenizer,
        base_model=model,
        out_dir=out_dir,
        metrics=metrics,
        checkpoint=checkpoint,
        cancelled=cancelled,
        evaluate_after=lambda: evaluate_pairs(policy, eval_pairs, ref, precision=precision, **eval_kwargs),
        started=started,
    )
