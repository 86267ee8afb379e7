"""A reward model learned from human judgements: the base model with a scalar head.

The model reads prompt + completion and the head maps the last token's hidden state to one
number. Pairs train it with the Bradley-Terry loss (``-logσ(r_chosen - r_rejected - margin)``),
ranked groups with the Plackett-Luce likelihood of each annotator's ranking, ties sharing their
place (``plackett_luce_loss``). As in InstructGPT (Ouyang et al., 2022) all completions of a
group go through one forward pass (and with ``share_prompt`` their prompt runs once for all of
them); unlike it, the K·(K-1)/2 pairs of a ranking are not separate Bradley-Terry terms but one
likelihood of the whole ranking.

By default LoRA adapters train on the body and the head trains in full (``--full`` trains
everything). The finished directory is the language model as any version is saved (full weights
with ``merge_lora``, else an adapter) plus ``reward_head.safetensors``; ``load_reward_model``
reads it back. Held-out accuracy is the share of held-out pairs whose chosen completion
scores higher, before training (the untrained head: about 0.5) and after.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import PreTrainedTokenizerBase

from training.config import RewardConfig
from training.data import (
    GroupExample,
    PairExample,
    collate_sequences,
    encode_completion,
    encode_prompt,
    pairs_from_groups,
    prompt_messages,
    sequence_key,
    tokenize_groups,
    tokenize_pairs,
)
from training.logprobs import (
    autocast_context,
    backbone_and_head,
    evaluation,
    prompt_batches,
    shared_prompt_states,
    shared_prompts,
)
from training.losses import bradley_terry_loss, plackett_luce_loss
from training.models import ModelLoadError, load_model
from training.runs import ProgressCallback, TrainResult, finish_run, load_policy, start_optimization, step_plan

HEAD_FILE = "reward_head.safetensors"


class RewardModel(torch.nn.Module):
    """A causal language model's body with a linear head that gives one score per sequence."""

    def __init__(self, lm: torch.nn.Module, head: torch.nn.Linear) -> None:
        super().__init__()
        self.lm = lm
        self.head = head

    def forward(
        self, sequences: Sequence[tuple[list[int], list[int]]], *, pad_id: int, share_prompt: bool
    ) -> torch.Tensor:
        """Scores (N,) of tokenized (prompt, completion) sequences, read at each one's last token.

        With ``share_prompt`` each distinct prompt runs once for all its completions (``shared_prompt_states``),
        unless no prompt repeats.
        """
        backbone, _ = backbone_and_head(self.lm)
        n = len(sequences)
        shared = shared_prompts(sequences, share_prompt)
        if shared is not None:
            prompts, owner = shared
            states, _, lengths = shared_prompt_states(
                backbone, prompts, [c for _, c in sequences], owner, pad_id=pad_id
            )  # (N, 1 + C, H)
            last = states[torch.arange(n, device=states.device), lengths]  # (N, H)
        else:
            batch = collate_sequences([p for p, _ in sequences], [c for _, c in sequences], pad_id)
            device = next(backbone.parameters()).device
            hidden = backbone(
                input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device), use_cache=False
            ).last_hidden_state  # (N, T, H)
            ends = (batch.prompt_lengths + batch.completion_lengths - 1).to(device)  # (N,)
            last = hidden[torch.arange(n, device=device), ends]  # (N, H)
        with torch.autocast(last.device.type, enabled=False):  # the head stays in float32
            return self.head(last.float()).squeeze(-1)  # (N,)


def new_head(lm: torch.nn.Module) -> torch.nn.Linear:
    """A fresh scalar head, initialised as transformers initialises a classification head."""
    config: Any = lm.config
    head = torch.nn.Linear(config.hidden_size, 1, bias=False)
    torch.nn.init.normal_(head.weight, std=getattr(config, "initializer_range", 0.02))
    return head.to(next(lm.parameters()).device)


def load_reward_model(
    path: str | Path, *, device: torch.device | None = None
) -> tuple[RewardModel, PreTrainedTokenizerBase]:
    """A reward model directory written by ``train_reward``, ready to score (eval mode, frozen), on ``device``."""
    path = Path(path)
    if not (path / HEAD_FILE).is_file():
        raise ModelLoadError(f"{path} is not a reward model (no {HEAD_FILE})")
    lm, tokenizer = load_model(str(path), device=device)
    head = new_head(lm)  # on the body's device
    try:
        head.load_state_dict(load_file(path / HEAD_FILE))
    except RuntimeError as exc:
        raise ModelLoadError(f"reward head in {path} does not fit its model: {exc}") from exc
    model = RewardModel(lm, head).eval()
    model.requires_grad_(False)
    return model, tokenizer


@torch.no_grad()
def score_texts(
    model: RewardModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Any],
    completions: Sequence[str],
    *,
    max_length: int = 1024,
    batch_size: int = 8,
) -> list[float]:
    """The reward of each (prompt, completion) pair; a prompt is a string or a message list.

    Completions are cut to fit ``max_length`` tokens after their prompt, as in training.
    """
    sequences = []
    for prompt, text in zip(prompts, completions, strict=True):
        prompt_ids = encode_prompt(tokenizer, prompt_messages(prompt))
        sequences.append((prompt_ids, encode_completion(tokenizer, text)[: max(1, max_length - len(prompt_ids))]))
    return score_sequences(model, sequences, pad_id=int(tokenizer.pad_token_id), batch_size=batch_size).tolist()  # type: ignore[arg-type]


def score_sequences(
    model: RewardModel,
    sequences: Sequence[tuple[list[int], list[int]]],
    *,
    pad_id: int,
    batch_size: int,
    precision: str = "fp32",
    share_prompt: bool = True,
) -> torch.Tensor:
    """Rewards (N,) of tokenized (prompt, completion) sequences, in batches of similar length, without grad."""
    scores = torch.zeros(len(sequences))
    device = next(model.parameters()).device
    with evaluation(model), autocast_context(precision, device):
        for idx in prompt_batches(sequences, batch_size, share_prompt=share_prompt):
            batch = [sequences[i] for i in idx]
            scores[idx] = model(batch, pad_id=pad_id, share_prompt=share_prompt).float().cpu()
    return scores


def pair_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, float | None]:
    """Share of pairs whose chosen side scores higher (an exact tie counts half) and the mean margin."""
    if len(chosen) == 0:  # None rather than NaN: metrics are stored as JSON
        return {"accuracy": None, "margin": None, "pairs": 0}
    margin = chosen - rejected  # (B,)
    accuracy = (margin > 0).float() + 0.5 * (margin == 0).float()
    return {"accuracy": float(accuracy.mean()), "margin": float(margin.mean()), "pairs": len(margin)}


def evaluate_reward(
    model: RewardModel,
    pairs: Sequence[PairExample],
    *,
    pad_id: int,
    batch_size: int,
    precision: str,
    share_prompt: bool,
) -> dict[str, float | None]:
    """Held-out pairwise accuracy and margin of the reward model."""
    sequences = [(p.prompt_ids, c) for p in pairs for c in (p.chosen_ids, p.rejected_ids)]
    scores = score_sequences(
        model, sequences, pad_id=pad_id, batch_size=batch_size, precision=precision, share_prompt=share_prompt
    )
    return pair_accuracy(scores[0::2], scores[1::2])


def is_pairs(records: Sequence[dict[str, Any]]) -> bool:
    """Pairs (the ``dpo`` export) when the first record has ``chosen``; else ranked groups (``grpo``)."""
    return bool(records) and "chosen" in records[0]


def train_reward(
    config: RewardConfig,
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
    """Train a reward model on ``model`` from pairs or ranked groups and write it to ``out_dir``.

    ``train_examples`` / ``eval_examples`` are DPO export rows (``prompt``, ``chosen``,
    ``rejected``, optional ``weight`` and ``margin``) or GRPO export rows (``prompt``,
    ``completions``, ``ranks`` or ``rewards``). Held-out examples whose prompt is also in
    training are left out. ``cache_dir`` is not used (there is no reference pass); the
    callbacks behave as in ``train_dpo``.
    """
    config.validate()
    started = time.perf_counter()
    out_dir = Path(out_dir)
    setup = load_policy(config, model)
    reward_model = RewardModel(setup.model, new_head(setup.model))
    pad_id, device, precision = setup.pad_id, setup.device, setup.precision

    lengths_kw: dict[str, Any] = {"max_length": config.max_length, "max_prompt_length": config.max_prompt_length}
    pairs_data = is_pairs(train_examples)
    tokenize = tokenize_pairs if pairs_data else tokenize_groups
    train = tokenize(train_examples, setup.tokenizer, **lengths_kw)
    held = tokenize(eval_examples, setup.tokenizer, **lengths_kw)
    examples: list[PairExample] | list[GroupExample] = train.examples
    if not examples:
        raise ValueError(
            f"no training {'pairs' if pairs_data else 'groups'} left ({train.dropped_long_prompt} dropped: prompt "
            f"longer than {config.max_prompt_length} tokens, {train.dropped_equal_rewards} with all ranks equal)"
        )
    train_prompts = {e.prompt_key for e in examples}
    held_out = [e for e in held.examples if e.prompt_key not in train_prompts]
    eval_pairs = held_out if pairs_data else pairs_from_groups(held_out)

    eval_kwargs: dict[str, Any] = {"pad_id": pad_id, "batch_size": config.eval_batch_size, "precision": precision}
    eval_kwargs["share_prompt"] = config.share_prompt
    before = evaluate_reward(reward_model, eval_pairs, **eval_kwargs)

    sequences = [(e.prompt_ids, c) for e in examples for c in _completions(e)]
    lengths = [len(e.prompt_ids) * len(_completions(e)) + sum(map(len, _completions(e))) for e in examples]
    plan = step_plan(
        lengths, config.batch_size, config.gradient_accumulation, config.epochs, config.seed, config.min_steps
    )
    total_steps = len(plan)
    optimizer, params, scheduler, checkpoint, start_step = start_optimization(
        config,
        replace(setup, model=reward_model),
        total_steps=total_steps,
        out_dir=out_dir,
        data_keys=[sequence_key(*s) for s in sequences],
        resume=resume,
    )

    reward_model.train()
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
        n_examples = sum(len(idx) for idx in micro_batches)
        sums = {"loss": 0.0, "correct": 0.0, "pairs": 0.0, "chosen": 0.0, "rejected": 0.0, "mean": 0.0, "n": 0.0}
        step_tokens = 0
        for idx in micro_batches:
            batch_examples = [examples[i] for i in idx]
            counts = [len(_completions(e)) for e in batch_examples]
            batch_sequences = [(e.prompt_ids, c) for e in batch_examples for c in _completions(e)]
            step_tokens += sum(len(p) + len(c) for p, c in batch_sequences)
            with autocast_context(precision, device):
                scores = reward_model(batch_sequences, pad_id=pad_id, share_prompt=config.share_prompt).float()  # (N,)
            groups = torch.split(scores, counts)  # one (K,) tensor per example; K = 2 for a pair
            if pairs_data:
                chosen, rejected = scores[0::2], scores[1::2]  # (B,), (B,)
                pair_examples: list[PairExample] = batch_examples  # type: ignore[assignment]
                losses = bradley_terry_loss(
                    chosen,
                    rejected,
                    margins=torch.tensor([p.margin for p in pair_examples], device=device)
                    if config.use_margin
                    else None,
                    weights=torch.tensor([p.weight for p in pair_examples], device=device)
                    if config.use_weights
                    else None,
                )  # (B,)
                sums["chosen"] += float(chosen.detach().sum())
                sums["rejected"] += float(rejected.detach().sum())
                sums["correct"] += float((chosen > rejected).float().sum())
                sums["pairs"] += len(idx)
            else:
                group_examples: list[GroupExample] = batch_examples  # type: ignore[assignment]
                losses = torch.stack(
                    [
                        torch.stack([plackett_luce_loss(g, torch.tensor(r, device=device)) for r in e.rankings]).mean()
                        for g, e in zip(groups, group_examples, strict=True)
                    ]
                )  # (G,) each group's mean over its annotators' rankings
                for g, e in zip(groups, group_examples, strict=True):
                    better = torch.tensor(e.rewards, device=device)
                    ordered = better.unsqueeze(1) > better.unsqueeze(0)  # (K, K) i judged better than j
                    sums["correct"] += float(((g.unsqueeze(1) > g.unsqueeze(0)) & ordered).sum())
                    sums["pairs"] += float(ordered.sum())
            loss = losses.sum() / n_examples
            if config.center_rewards:
                # TRL's centring term, per example: the squared mean of its completions' rewards
                loss = loss + config.center_rewards * torch.stack([g.mean() for g in groups]).pow(2).sum() / n_examples
            loss.backward()
            sums["loss"] += float(loss.detach()) * n_examples
            sums["mean"] += float(scores.detach().sum())
            sums["n"] += len(scores)
        if config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        lr = float(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        trained_tokens += step_tokens

        last = {
            "loss": sums["loss"] / n_examples,
            "accuracy": sums["correct"] / max(sums["pairs"], 1.0),
            "rewards/mean": sums["mean"] / sums["n"],
            "learning_rate": lr,
            "tokens_per_second": step_tokens / max(time.perf_counter() - step_started, 1e-9),
        }
        if pairs_data:
            last["rewards/chosen"] = sums["chosen"] / n_examples
            last["rewards/rejected"] = sums["rejected"] / n_examples
            last["rewards/margins"] = (sums["chosen"] - sums["rejected"]) / n_examples
        if progress is not None:
            progress(step + 1, total_steps, last)
        if config.save_every and (step + 1) % config.save_every == 0 and step + 1 < total_steps:
            checkpoint.save(reward_model, optimizer, scheduler, step + 1)

    train_seconds = time.perf_counter() - train_started
    metrics: dict[str, Any] = {
        "algorithm": "reward",
        "precision": precision,
        "steps": total_steps,
        "resumed_from_step": start_step,
        ("train_pairs" if pairs_data else "train_groups"): len(examples),
        "eval_pairs": len(eval_pairs),
        "dropped_long_prompt": train.dropped_long_prompt + held.dropped_long_prompt,
        "dropped_equal_rewards": train.dropped_equal_rewards + held.dropped_equal_rewards,
        "truncated": train.truncated + held.truncated,
        "eval_dropped_prompt_overlap": len(held.examples) - len(held_out),
        "train_seconds": train_seconds,
        "train_tokens": trained_tokens,
        "tokens_per_second": trained_tokens / max(train_seconds, 1e-9),
        "eval_before": before,
        "last_step": last,
    }
    return finish_run(
        algorithm="reward",
        config=config,
        policy=reward_model.lm,
        tokenizer=setup.tokenizer,
        base_model=model,
        out_dir=out_dir,
        metrics=metrics,
        checkpoint=checkpoint,
        cancelled=cancelled,
        evaluate_after=lambda: evaluate_reward(reward_model, eval_pairs, **eval_kwargs),
        started=started,
        extra_tensors={HEAD_FILE: reward_model.head.state_dict()},
    )


def _completions(example: PairExample | GroupExample) -> list[list[int]]:
    if isinstance(example, PairExample):
        return [example.chosen_ids, example.rejected_ids]
    return example.completion_ids
