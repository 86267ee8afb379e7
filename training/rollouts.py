"""What the online loops (online GRPO, PPO) share: the reward model beside the policy, sampling and scoring.

Rollouts are sampled with ``training.generate`` from the policy's weights (a LoRA policy merged into
a copy first), and scored by a reward model of the policy's base model and tokenizer (the scores are
of the same token ids).
"""

from __future__ import annotations

import contextlib
import copy
import random
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
from transformers import PreTrainedModel

from training.config import OnlineGRPOConfig, PPOConfig
from training.data import encode_prompt, prompt_key, prompt_messages
from training.generate import SamplingConfig, generate_completions
from training.lineage import base_model_of
from training.logprobs import autocast_context, evaluation, grouped_logps
from training.models import ModelLoadError, is_lora, reference_mode
from training.reward import RewardModel, load_reward_model, score_sequences
from training.runs import passes


def load_scorer(reward_model: str, tokenizer: Any, policy_name: str, device: torch.device) -> RewardModel:
    """The reward model at ``reward_model``, on the policy's device; refused if its base model or tokenizer differs."""
    reward_base, policy_base = base_model_of(reward_model), base_model_of(policy_name)
    if reward_base != policy_base:
        raise ModelLoadError(
            f"reward model {reward_model} was trained on base model {reward_base}, "
            f"but the policy {policy_name} is of base model {policy_base}: train the reward model from {policy_base}"
        )
    scorer, scorer_tokenizer = load_reward_model(reward_model, device=device)
    if scorer_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ModelLoadError(
            f"reward model {reward_model} uses another tokenizer than the policy {policy_name}: "
            "train the reward model from the same base model"
        )
    return scorer


def frozen_reference(policy: torch.nn.Module) -> torch.nn.Module | None:
    """A frozen copy of the starting model for full fine-tuning; None with LoRA (adapters off is the reference)."""
    return None if is_lora(policy) else copy.deepcopy(policy).eval().requires_grad_(False)


def reference_token_logps(
    policy: torch.nn.Module,
    reference: torch.nn.Module | None,
    sequences: list[tuple[list[int], list[int]]],
    *,
    pad_id: int,
    share_prompt: bool,
    precision: str,
    chunk: int,
) -> torch.Tensor:
    """(N, T) per-token log-probs of the (prompt, completion) sequences' completions under the reference, without
    grad."""
    device = next(policy.parameters()).device
    kwargs: dict[str, Any] = {"pad_id": pad_id, "share_prompt": share_prompt, "chunk_size": chunk}
    with evaluation(policy), autocast_context(precision, device):
        if reference is None:
            with reference_mode(policy):
                return grouped_logps(policy, sequences, **kwargs).float()
        return grouped_logps(reference, sequences, **kwargs).float()


def unique_prompts(records: list[dict[str, Any]]) -> list[Any]:
    """The distinct ``prompt`` values of the rows, in first-seen order."""
    seen: dict[str, Any] = {}
    for record in records:
        if "prompt" in record:
            seen.setdefault(prompt_key(record["prompt"]), record["prompt"])
    return list(seen.values())


@dataclass
class PromptSet:
    """The prompts an online run samples on, and how it samples."""

    train: list[Any]  # distinct training prompts that fit max_prompt_length
    eval: list[Any]  # distinct held-out prompts that are not training prompts
    dropped_long_prompt: int
    sampling: SamplingConfig  # max_new_tokens cut so that the longest prompt and its completion fit max_length


def prompt_set(
    config: OnlineGRPOConfig | PPOConfig,
    tokenizer: Any,
    train_examples: list[dict[str, Any]],
    eval_examples: list[dict[str, Any]],
) -> PromptSet:
    """Rollouts use training prompts only; held-out prompts are only sampled to measure the reward."""
    prompts = unique_prompts(train_examples)
    if not prompts:
        raise ValueError("no training prompts: the examples hold no 'prompt'")
    assert config.max_prompt_length is not None  # set from max_length after init
    lengths = [len(encode_prompt(tokenizer, prompt_messages(p))) for p in prompts]
    train = [p for p, n in zip(prompts, lengths, strict=True) if n <= config.max_prompt_length]
    if not train:
        raise ValueError(f"no training prompts left: every prompt is longer than {config.max_prompt_length} tokens")
    train_keys = {prompt_key(p) for p in prompts}
    longest = max(n for n in lengths if n <= config.max_prompt_length)
    sampling = SamplingConfig(
        temperature=config.temperature,
        top_p=config.top_p,
        max_new_tokens=min(config.max_new_tokens, config.max_length - longest),
    )
    return PromptSet(
        train=train,
        eval=[p for p in unique_prompts(eval_examples) if prompt_key(p) not in train_keys],
        dropped_long_prompt=len(prompts) - len(train),
        sampling=sampling,
    )


def prompt_plan(
    count: int, *, batch_size: int, epochs: int, seed: int, min_steps: int = 0, steps_per_batch: int = 1
) -> list[list[int]]:
    """Rollout batches of prompt indices: each epoch every prompt once, batches in a seeded order.

    ``epochs`` passes, or as ``runs.passes`` extends them to reach ``min_steps`` optimizer steps at
    ``steps_per_batch`` steps on each rollout batch (as ``step_plan`` does for offline data).
    """
    batches = [list(range(i, min(i + batch_size, count))) for i in range(0, count, batch_size)]
    epochs, stop = passes(len(batches) * steps_per_batch, epochs, min_steps, steps_per_batch)
    plan = []
    for epoch in range(epochs):
        order = list(batches)
        random.Random(seed * 1000 + epoch).shuffle(order)
        plan.extend(order)
    return plan[:stop]


@dataclass
class Samples:
    completions: list[list[int]]  # G·K token lists, group by group; EOS only where sampling stopped there
    rewards: torch.Tensor  # (G, K) the reward model's scores


def sample_and_score(
    policy: torch.nn.Module,
    scorer: RewardModel,
    tokenizer: Any,
    prompts: list[Any],
    *,
    k: int,
    sampling: SamplingConfig,
    batch_size: int,
    precision: str,
    share_prompt: bool,
) -> Samples:
    """Sample ``k`` completions per prompt from the policy and score each with the reward model (each prompt
    once for its ``k`` completions, with ``share_prompt``)."""
    with _sampler(policy, precision) as model:
        texts = generate_completions(
            model, tokenizer, [prompt_messages(p) for p in prompts], k=k, sampling=sampling, batch_size=batch_size
        )
    prompt_ids = [encode_prompt(tokenizer, prompt_messages(p)) for p in prompts]
    # The ids as sampled, not the text encoded again: a sampled sequence need not be its text's own
    # tokenization, and the gradient and the KL must be of the tokens the policy drew.
    eos = [int(tokenizer.eos_token_id)]
    completions = [[*s.token_ids, *([] if s.truncated else eos)] for group in texts for s in group]
    rewards = score_sequences(
        scorer,
        [(prompt_ids[i // k], c) for i, c in enumerate(completions)],
        pad_id=int(tokenizer.pad_token_id),
        batch_size=batch_size,
        precision=precision,
        share_prompt=share_prompt,
    ).view(len(prompts), k)
    return Samples(completions, rewards)


def mean_sample_reward(
    policy: torch.nn.Module,
    scorer: RewardModel,
    tokenizer: Any,
    prompts: list[Any],
    *,
    samples: int,
    sampling: SamplingConfig,
    seed: int,
    batch_size: int,
    precision: str,
    share_prompt: bool,
) -> dict[str, float | None]:
    """The reward model's mean score of fresh samples on held-out prompts (the same seed before and after).

    ``reward_stderr`` is the mean's standard error from the spread of each prompt's samples
    (None with one sample a prompt): a change smaller than a few of it is sampling luck.
    """
    if not prompts:  # None rather than NaN: metrics are stored as JSON
        return {"reward": None, "reward_stderr": None, "response_length": None, "prompts": 0}
    scored = sample_and_score(
        policy,
        scorer,
        tokenizer,
        prompts,
        k=samples,
        sampling=replace(sampling, seed=seed),
        batch_size=batch_size,
        precision=precision,
        share_prompt=share_prompt,
    )
    g, k = scored.rewards.shape
    # The sampling noise of the mean over these prompts: each prompt's spread of scores, not the spread between prompts.
    stderr = float((scored.rewards.var(dim=1).mean() / (g * k)).sqrt()) if k > 1 else None
    return {
        "reward": float(scored.rewards.mean()),
        "reward_stderr": stderr,
        "response_length": sum(map(len, scored.completions)) / len(scored.completions),
        "prompts": len(prompts),
    }


@contextlib.contextmanager
def _sampler(policy: torch.nn.Module, precision: str) -> Iterator[PreTrainedModel]:
    """The model to sample from, and how: the policy's weights as one plain model.

    A LoRA policy is merged into a copy in the run's precision (bf16 as the worker's inference model
    where the CPU has it), so that a decoding step runs one product per layer rather than the frozen
    layer, the adapter's two small ones and autocast's casts: at a rollout's few rows a step costs
    about its number of operations, not its arithmetic (benchmarks/RESULTS.md, "Rollouts from a
    merged copy"). The copy takes a fraction of a second against seconds of sampling and is dropped
    after it. The log-probs the losses use are the policy's own, taken after sampling, so the
    importance ratios are exact whatever the copy rounded. A policy without LoRA samples as it
    trains, under the run's autocast, with SDPA attention while it samples (5.9 to 6.4 s against 7.2
    to 8.5 s for eager attention, 8 rows of 48 tokens in fp32: RESULTS.md, "One pass fewer a PPO
    rollout").
    """
    device = next(policy.parameters()).device
    if not is_lora(policy):
        assert isinstance(policy, PreTrainedModel)
        attention = policy.config._attn_implementation
        with autocast_context(precision, device):
            if device.type == "cpu":
                policy.set_attn_implementation("sdpa")
            try:
                yield policy
            finally:
                policy.set_attn_implementation(attention)
        return
    merged = copy.deepcopy(policy).merge_and_unload()
    assert isinstance(merged, PreTrainedModel)
    merged.to(torch.bfloat16 if precision == "bf16" else torch.float32)  # type: ignore[arg-type]
    if device.type == "cpu":
        merged.set_attn_implementation("sdpa")  # eager attention is for training's backward (tune_for_training)
    yield merged
