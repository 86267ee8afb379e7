"""Sample K completions per conversation with the model's chat template."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import GenerationMixin, PreTrainedModel, PreTrainedTokenizerBase


@dataclass
class SamplingConfig:
    temperature: float = 0.8  # softmax temperature; 0 means greedy decoding
    top_p: float = 0.95  # nucleus sampling: keep the smallest token set with this much probability
    max_new_tokens: int = 256  # completion length limit in tokens
    seed: int | None = None  # seed for reproducible samples; None leaves the RNG as it is


def render_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> str:
    """The conversation through the chat template, ending with the assistant's generation prompt."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)  # type: ignore[return-value]


@torch.no_grad()
def generate_completions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    conversations: list[list[dict[str, str]]],
    *,
    k: int,
    sampling: SamplingConfig,
    batch_size: int = 8,
    progress: Callable[[int, int], None] | None = None,
) -> list[list[str]]:
    """Return ``k`` sampled completions for each conversation, in order.

    Each conversation is a list of ``{role, content}`` messages ending with a user turn.
    Prompts are left-padded and batched (``batch_size`` sequences per ``generate`` call);
    completions are decoded without special tokens and stripped. ``progress`` is called
    with (conversations done, total) after each batch.
    """
    if k < 1:
        raise ValueError("k must be at least 1")
    for conversation in conversations:
        if not conversation or conversation[-1].get("role") != "user":
            raise ValueError("each conversation must end with a user turn")
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)

    assert isinstance(model, GenerationMixin)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    prompts = [render_prompt(tokenizer, c) for c in conversations]
    rows = [i for i in range(len(prompts)) for _ in range(k)]  # conversation index of each sampled row
    outputs: list[list[str]] = [[] for _ in prompts]
    greedy = sampling.temperature <= 0
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for start in range(0, len(rows), batch_size):
            batch_rows = rows[start : start + batch_size]
            enc = tokenizer(
                [prompts[i] for i in batch_rows],
                return_tensors="pt",
                padding=True,
                add_special_tokens=False,
            ).to(device)
            generated = model.generate(
                **enc,
                do_sample=not greedy,
                temperature=None if greedy else sampling.temperature,
                top_p=None if greedy else sampling.top_p,
                top_k=None,
                max_new_tokens=sampling.max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )  # (b, T_prompt + T_new)
            new_tokens = generated[:, enc["input_ids"].shape[1] :]
            texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            for i, text in zip(batch_rows, texts, strict=True):
                outputs[i].append(text.strip())
            if progress is not None:
                progress(sum(len(o) == k for o in outputs), len(prompts))
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return outputs
