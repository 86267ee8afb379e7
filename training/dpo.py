"""Direct Preference Optimization on human-judged pairs.

The loop, top to bottom: tokenize the pairs; compute the reference log-probs once
(from the on-disk cache where the same reference already scored the same sequence);
score held-out pairs; then for each optimizer step run chosen and rejected through the
policy in one forward pass, apply ``dpo_loss`` against the cached reference numbers,
clip, step. The reference never runs during training, so no second model copy exists.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from training.data import collate_pairs, sequence_key, tokenize_pairs
from training.logprobs import (
    ReferenceCache,
    autocast_context,
    model_fingerprint,
    reference_logps,
    sequence_logps,
    shared_prompt_logps,
)
from training.losses import DPO_LOSS_TYPES, dpo_loss
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
class DPOConfig:
    beta: float = 0.1  # strength of the implicit KL constraint; higher stays closer to the reference
    loss_type: str = "sigmoid"  # sigmoid | ipo | hinge | robust
    label_smoothing: float = 0.0  # assumed share of flipped labels (sigmoid: cDPO, robust: rDPO)
    use_weights: bool = True  # multiply each pair's loss by its `weight` (annotator agreement)
    learning_rate: float = 5e-5  # peak AdamW learning rate (LoRA; use ~5e-7..5e-6 for full fine-tuning)
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    warmup_ratio: float = 0.1  # share of steps with a linear learning-rate warmup
    lr_scheduler: str = "cosine"  # cosine | linear | constant, after warmup
    epochs: int = 1  # passes over the training pairs
    batch_size: int = 4  # pairs per forward pass (2x sequences: chosen and rejected)
    gradient_accumulation: int = 1  # forward passes per optimizer step
    max_grad_norm: float = 1.0  # gradient clipping by global norm; 0 disables
    max_length: int = 512  # prompt + completion tokens; completions are cut to fit
    max_prompt_length: int = 256  # pairs whose prompt alone is longer are dropped
    lora: bool = True  # train LoRA adapters (reference = base with adapters off); False: full fine-tuning
    lora_r: int = 16  # LoRA rank
    lora_alpha: int = 32  # LoRA scaling numerator (updates scaled by alpha / r)
    lora_dropout: float = 0.0  # dropout on the LoRA input
    merge_lora: bool = False  # save merged full weights instead of the adapter
    precision: str = "auto"  # auto | bf16 | fp32; auto uses bf16 autocast where the hardware is fast at it
    eval_batch_size: int = 8  # pairs per forward pass when scoring held-out pairs and the reference
    logprob_chunk_size: int = 2048  # completion positions per chunk of the output projection
    share_prompt: bool = True  # run each prompt once for chosen and rejected (shared KV cache)
    save_every: int = 50  # optimizer steps between resumable checkpoints; 0 disables
    seed: int = 0  # seeds batch order and adapter initialisation

    def validate(self) -> None:
        """Raise ValueError for values or combinations that make no sense."""
        if self.loss_type not in DPO_LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {', '.join(DPO_LOSS_TYPES)}, not {self.loss_type!r}")
        if self.beta <= 0:
            raise ValueError("beta must be positive")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError("label_smoothing must be in [0, 0.5)")
        if self.label_smoothing and self.loss_type not in ("sigmoid", "robust"):
            raise ValueError(f"label_smoothing has no effect with loss_type {self.loss_type!r}")
        if self.lr_scheduler not in ("cosine", "linear", "constant"):
            raise ValueError("lr_scheduler must be cosine, linear or constant")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError("precision must be auto, bf16 or fp32")
        if min(self.epochs, self.batch_size, self.gradient_accumulation, self.eval_batch_size) < 1:
            raise ValueError("epochs, batch sizes and gradient_accumulation must be at least 1")
        if self.learning_rate <= 0:
            raise ValueError("learning_rate must be positive")
        if not 0 < self.max_prompt_length < self.max_length:
            raise ValueError("max_prompt_length must be positive and smaller than max_length")
        if self.merge_lora and not self.lora:
            raise ValueError("merge_lora needs lora")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError("warmup_ratio must be in [0, 1)")


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
    training pairs are left out of evaluation. ``progress(step, total, metrics)`` is
    called after every optimizer step; ``should_stop()`` is checked before each one and
    a stopped run writes no model directory.
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

    train = tokenize_pairs(
        train_examples, tokenizer, max_length=config.max_length, max_prompt_length=config.max_prompt_length
    )
    held = tokenize_pairs(
        eval_examples, tokenizer, max_length=config.max_length, max_prompt_length=config.max_prompt_length
    )
    train_prompts = {p.prompt_key for p in train.examples}
    eval_pairs = [p for p in held.examples if p.prompt_key not in train_prompts]
    if not train.examples:
        raise ValueError(
            f"no training pairs left ({train.dropped_long_prompt} dropped: prompt longer than "
            f"{config.max_prompt_length} tokens)"
        )
    pairs = train.examples

    if config.lora:
        policy = apply_lora(policy, LoraSettings(config.lora_r, config.lora_alpha, config.lora_dropout))
    tune_for_training(policy, precision=precision, bf16_frozen_base=config.lora and not config.merge_lora)

    # Reference log-probs: once, no grad, from the cache when this reference already saw the sequence.
    ref_started = time.perf_counter()
    fingerprint = model_fingerprint(model, precision)
    cache = ReferenceCache(cache_dir, fingerprint)
    sequences = [(p.prompt_ids, c) for p in [*pairs, *eval_pairs] for c in (p.chosen_ids, p.rejected_ids)]
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
    ref_chosen = torch.tensor([float(ref[sequence_key(p.prompt_ids, p.chosen_ids)].sum()) for p in pairs])  # (P,)
    ref_rejected = torch.tensor([float(ref[sequence_key(p.prompt_ids, p.rejected_ids)].sum()) for p in pairs])

    eval_kwargs: dict[str, Any] = {"beta": config.beta, "pad_id": pad_id, "batch_size": config.eval_batch_size}
    before = evaluate_pairs(None, eval_pairs, ref, precision=precision, **eval_kwargs)

    lengths = [len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs]
    plan = step_plan(lengths, config.batch_size, config.gradient_accumulation, config.epochs, config.seed)
    total_steps = len(plan)
    optimizer, params = make_optimizer(policy, lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_factor(config.lr_scheduler, int(config.warmup_ratio * total_steps), total_steps)
    )
    checkpoint = RunCheckpoint(
        out_dir,
        run_fingerprint(asdict(config), fingerprint, [sequence_key(p.prompt_ids, p.chosen_ids) for p in pairs]),
    )
    start_step = checkpoint.load(policy, optimizer, scheduler) if resume else 0

    policy.train()
    cancelled = False
    last: dict[str, float] = {}
    train_started = time.perf_counter()
    trained_tokens = 0
    for step in range(start_step, total_steps):
        if should_stop is not None and should_stop():
            cancelled = True
            break
        step_started = time.perf_counter()
        micro_batches = plan[step]
        n_pairs = sum(len(idx) for idx in micro_batches)
        sums = {"loss": 0.0, "chosen": 0.0, "rejected": 0.0, "correct": 0.0, "logps_chosen": 0.0, "logps_rejected": 0.0}
        step_tokens = 0
        for idx in micro_batches:
            batch = collate_pairs([pairs[i] for i in idx], pad_id)  # 2B rows: chosen, then rejected
            step_tokens += batch.num_tokens
            b = len(idx)
            with autocast_context(precision, device):
                if config.share_prompt:
                    logps = shared_prompt_logps(
                        policy,
                        [pairs[i].prompt_ids for i in idx],
                        [pairs[i].chosen_ids for i in idx] + [pairs[i].rejected_ids for i in idx],
                        [*range(b), *range(b)],
                        pad_id=pad_id,
                        chunk_size=config.logprob_chunk_size,
                    ).sum(dim=1)  # (2B,)
                else:
                    logps = sequence_logps(policy, batch, chunk_size=config.logprob_chunk_size)  # (2B,)
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
        if progress is not None:
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
        tokenizer=tokenizer,
        base_model=model,
        out_dir=out_dir,
        metrics=metrics,
        checkpoint=checkpoint,
        cancelled=cancelled,
        evaluate_after=lambda: evaluate_pairs(policy, eval_pairs, ref, precision=precision, **eval_kwargs),
        started=started,
    )
