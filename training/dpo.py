"""Direct Preference Optimization on human-judged pairs.

The loop, top to bottom: tokenize the pairs; compute the reference log-probs once
(from the on-disk cache where the same reference already scored the same sequence);
score held-out pairs; then for each optimizer step run chosen and rejected through the
policy in one forward pass, apply ``dpo_loss`` against the cached reference numbers,
clip, step. The reference never runs during training, so no second model copy exists.
Under several processes (``training.parallel``) each takes its share of every micro-batch,
scaled by the step's whole count of pairs, and the gradients are summed before the step.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from training.config import DPOConfig
from training.data import collate_pairs, sequence_key, tokenize_pairs
from training.logprobs import autocast_context, grouped_logps
from training.losses import dpo_loss
from training.runs import (
    ProgressCallback,
    TrainResult,
    evaluate_pairs,
    finish_run,
    load_policy,
    start_optimization,
    step_plan,
)


def train_dpo(
    config: DPOConfig,
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
    """Train ``model`` with DPO on preference pairs and write the result to ``out_dir``.

    ``train_examples`` / ``eval_examples`` are DPO export rows (``prompt``, ``chosen``,
    ``rejected``, optional ``weight``); held-out pairs whose prompt also occurs in the
    training pairs are left out of evaluation. ``eval_before`` scores the parent (``model``)
    and ``eval_after`` the trained policy on the same held-out pairs (``evaluate_pairs``).
    ``progress(step, total, metrics)`` is called after every optimizer step; ``should_stop()``
    is checked before each one and a stopped run writes no model directory.
    """
    config.validate()
    started = time.perf_counter()
    out_dir = Path(out_dir)
    setup = load_policy(config, model)
    policy, pad_id, device, precision, ranks = setup.model, setup.pad_id, setup.device, setup.precision, setup.ranks

    lengths_kw: dict[str, Any] = {"max_length": config.max_length, "max_prompt_length": config.max_prompt_length}
    train = tokenize_pairs(train_examples, setup.tokenizer, **lengths_kw)
    held = tokenize_pairs(eval_examples, setup.tokenizer, **lengths_kw)
    train_prompts = {p.prompt_key for p in train.examples}
    eval_pairs = [p for p in held.examples if p.prompt_key not in train_prompts]
    if not train.examples:
        raise ValueError(
            f"no training pairs left ({train.dropped_long_prompt} dropped: prompt longer than "
            f"{config.max_prompt_length} tokens)"
        )
    pairs = train.examples

    sequences = [(p.prompt_ids, c) for p in [*pairs, *eval_pairs] for c in (p.chosen_ids, p.rejected_ids)]
    ref, ref_computed, ref_seconds = setup.reference(config, sequences, cache_dir)
    ref_chosen = torch.tensor([float(ref[sequence_key(p.prompt_ids, p.chosen_ids)].sum()) for p in pairs])  # (P,)
    ref_rejected = torch.tensor([float(ref[sequence_key(p.prompt_ids, p.rejected_ids)].sum()) for p in pairs])

    eval_kwargs: dict[str, Any] = {"beta": config.beta, "pad_id": pad_id, "batch_size": config.eval_batch_size}
    eval_kwargs["share_prompt"] = config.share_prompt
    before = evaluate_pairs(None, eval_pairs, ref, precision=precision, **eval_kwargs)

    lengths = [len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs]
    plan = step_plan(
        lengths, config.batch_size, config.gradient_accumulation, config.epochs, config.seed, config.min_steps
    )
    total_steps = len(plan)
    optimizer, params, scheduler, checkpoint, start_step = start_optimization(
        config,
        setup,
        total_steps=total_steps,
        out_dir=out_dir,
        data_keys=[sequence_key(p.prompt_ids, p.chosen_ids) for p in pairs],
        resume=resume,
    )

    policy.train()
    cancelled = False
    last: dict[str, float] = {}
    train_started = time.perf_counter()
    trained_tokens = 0
    for step in range(start_step, total_steps):
        if ranks.agree(ranks.main and should_stop is not None and should_stop()):
            cancelled = True
            break
        step_started = time.perf_counter()
        micro_batches = plan[step]
        n_pairs = sum(len(idx) for idx in micro_batches)  # of the whole step, over all processes
        sums = {"loss": 0.0, "chosen": 0.0, "rejected": 0.0, "correct": 0.0, "logps_chosen": 0.0, "logps_rejected": 0.0}
        sums["tokens"] = 0.0
        for whole in micro_batches:
            idx = ranks.share(whole)
            if not idx:
                continue
            batch = collate_pairs([pairs[i] for i in idx], pad_id)  # 2B rows: chosen, then rejected
            sums["tokens"] += batch.num_tokens
            b = len(idx)
            with autocast_context(precision, device):
                sides = [(pairs[i].prompt_ids, pairs[i].chosen_ids) for i in idx]
                sides += [(pairs[i].prompt_ids, pairs[i].rejected_ids) for i in idx]
                logps = grouped_logps(
                    policy, sides, pad_id=pad_id, share_prompt=config.share_prompt, chunk_size=config.logprob_chunk_size
                ).sum(dim=1)  # (2B,)
                logps = logps.float()
            weights = torch.tensor([pairs[i].weight for i in idx]) if config.use_weights else None
            losses, chosen_rewards, rejected_rewards = dpo_loss(
                logps[:b],
                logps[b:],
                ref_chosen[idx].to(device),
                ref_rejected[idx].to(device),
                beta=config.beta,
                loss_type=config.loss_type,
                label_smoothing=config.label_smoothing,
                chosen_lengths=batch.completion_lengths[:b].to(device).float(),
                rejected_lengths=batch.completion_lengths[b:].to(device).float(),
                weights=None if weights is None else weights.to(device),
            )  # (B,), (B,), (B,)
            (losses.sum() / n_pairs).backward()
            sums["loss"] += float(losses.detach().sum())
            sums["chosen"] += float(chosen_rewards.sum())
            sums["rejected"] += float(rejected_rewards.sum())
            sums["correct"] += float((chosen_rewards > rejected_rewards).float().sum())
            sums["logps_chosen"] += float(logps[:b].detach().sum())
            sums["logps_rejected"] += float(logps[b:].detach().sum())
        ranks.sum_gradients(params)
        sums = ranks.total(sums)
        step_tokens = int(sums["tokens"])
        if config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        lr = float(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        trained_tokens += step_tokens

        last = {
            "loss": sums["loss"] / n_pairs,
            "rewards/chosen": sums["chosen"] / n_pairs,
            "rewards/rejected": sums["rejected"] / n_pairs,
            "rewards/margins": (sums["chosen"] - sums["rejected"]) / n_pairs,
            "rewards/accuracies": sums["correct"] / n_pairs,
            "logps/chosen": sums["logps_chosen"] / n_pairs,
            "logps/rejected": sums["logps_rejected"] / n_pairs,
            "learning_rate": lr,
            "tokens_per_second": step_tokens / max(time.perf_counter() - step_started, 1e-9),
        }
        if progress is not None and ranks.main:
            progress(step + 1, total_steps, last)
        if config.save_every and (step + 1) % config.save_every == 0 and step + 1 < total_steps:
            checkpoint.save(policy, optimizer, scheduler, step + 1)

    train_seconds = time.perf_counter() - train_started
    metrics: dict[str, Any] = {
        "algorithm": "dpo",
        "precision": precision,
        "steps": total_steps,
        "resumed_from_step": start_step,
        "train_pairs": len(pairs),
        "eval_pairs": len(eval_pairs),
        "dropped_long_prompt": train.dropped_long_prompt + held.dropped_long_prompt,
        "truncated": train.truncated + held.truncated,
        "eval_dropped_prompt_overlap": len(held.examples) - len(eval_pairs),
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
        algorithm="dpo",
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
