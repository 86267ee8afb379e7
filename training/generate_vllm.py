"""Sample K completions per conversation with vLLM on a GPU: what ``generate_completions`` returns, faster.

An optional backend for the app's generation (the ``vllm`` extra; ``RANKWISE_GENERATION_BACKEND=vllm``).
Each conversation goes through the same chat template (``render_prompt``) and is tokenized as the torch
path tokenizes it, handed to vLLM as token ids (so vLLM adds no BOS of its own); each answer comes back as
a ``Sample`` whose tokens leave out the EOS vLLM stopped at, whose text our tokenizer decodes as the torch
path does, and which is ``truncated`` when vLLM stopped it at the length limit (finish reason "length").

Where it departs from ``generate_completions``:

- vLLM schedules the rows itself (continuous batching over a paged KV cache), so there is no batch size,
  and ``progress`` hears once, when every conversation is written.
- Sampled tokens come from vLLM's sampler: a seed makes them repeatable under vLLM, not equal to the torch
  path's draws. Greedy decoding gives the torch path's tokens up to the kernels' rounding (a GPU test, in
  float32).
- vLLM also ends an answer at any other end token the model's generation config names; the torch path
  ends at the tokenizer's EOS only.
- vLLM refuses more than one answer per request without sampling; greedy answers are all the same, so a
  greedy request asks for one and repeats it k times, as the torch path's k greedy rows are equal.

Online training's rollouts stay on the torch path: they sample from the policy being trained, whose
weights change every step, and vLLM serves weights it loaded once.
"""

from __future__ import annotations

import functools
import importlib.util
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from training.generate import Sample, SamplingConfig, inference_dtype, render_prompt
from training.models import load_model

# Each engine's share of the GPU's memory: its weights, activations and KV cache (vLLM takes 0.9 when not
# told). Two engines fit side by side, the two writers of a mixed round or a battle, and a fifth of the GPU
# stays for the worker's torch work.
GPU_MEMORY_SHARE = 0.4
ENGINES = 2  # engines kept started in a process, the most recently used


class VllmUnavailable(Exception):
    """vLLM cannot run here; the message says what is missing."""


def vllm_check() -> None:
    """Raise VllmUnavailable unless the vllm package is installed and torch sees a CUDA GPU."""
    if importlib.util.find_spec("vllm") is None:
        raise VllmUnavailable("the vllm package is not installed (pip install 'rankwise[vllm]')")
    if not torch.cuda.is_available():
        raise VllmUnavailable("vLLM needs a CUDA GPU and torch sees none here")


@dataclass
class VllmEngine:
    llm: Any  # vllm.LLM
    tokenizer: PreTrainedTokenizerBase
    merged: tempfile.TemporaryDirectory[str] | None  # a LoRA version's merged weights, kept while the engine lives


@functools.lru_cache(maxsize=ENGINES)
def vllm_engine(model_dir: str) -> VllmEngine:
    """A started vLLM engine for a model directory or hub id, kept for the process's later calls.

    Starting one takes tens of seconds (weights, memory profiling, CUDA graphs), so the engines of the
    ENGINES models used last stay started; an older one is dropped (vLLM stops its engine process when the
    engine is collected).

    A LoRA version (``adapter_config.json``) is merged into its base, with ``load_model`` as the torch path
    merges it, and vLLM loads the merged weights from a temporary directory. vLLM's documented way for an
    adapter, the base model started with ``enable_lora`` and a ``LoRARequest`` per generation, serves one
    adapter over full weights, while a version trained from an earlier LoRA version is an adapter over an
    adapter; it also accepts only the adapter ranks its kernels are built for (8, 16, 32, ..., varying by
    release). A merged directory is a plain model directory, which every vLLM release loads, and it holds
    the very weights the torch path decodes with, so the two backends' greedy answers agree.
    """
    vllm_check()
    from vllm import LLM

    dtype = inference_dtype(torch.device("cuda"))
    merged = None
    path = model_dir
    if (Path(model_dir) / "adapter_config.json").is_file():
        merged = tempfile.TemporaryDirectory(prefix="rankwise-merged-")
        model, tokenizer = load_model(model_dir, dtype=dtype)
        model.save_pretrained(merged.name, safe_serialization=True)
        tokenizer.save_pretrained(merged.name)
        del model
        path = merged.name
    llm = LLM(
        model=path,
        tokenizer=path,
        dtype=str(dtype).removeprefix("torch."),  # the torch path's dtype on this GPU
        gpu_memory_utilization=GPU_MEMORY_SHARE,
    )
    return VllmEngine(llm=llm, tokenizer=AutoTokenizer.from_pretrained(path), merged=merged)


def generate_completions_vllm(
    model_dir: str,
    conversations: list[list[dict[str, str]]],
    *,
    k: int,
    sampling: SamplingConfig,
    progress: Callable[[int, int], None] | None = None,
) -> list[list[Sample]]:
    """Return ``k`` completions for each conversation, in order, written by vLLM from ``model_dir``.

    Each conversation is a list of ``{role, content}`` messages ending with a user turn. A seed gives the
    conversations distinct seeds (``seed + i * k``; vLLM seeds a request's n answers ``seed``, ``seed + 1``,
    ...), so no two rows draw alike. ``progress`` is called with (conversations, conversations) at the end.

    Raises:
        VllmUnavailable: the vllm package or a CUDA GPU is missing.
    """
    if k < 1:
        raise ValueError("k must be at least 1")
    for conversation in conversations:
        if not conversation or conversation[-1].get("role") != "user":
            raise ValueError("each conversation must end with a user turn")
    vllm_check()
    if not conversations:
        return []
    from vllm import SamplingParams

    engine = vllm_engine(model_dir)
    tokenizer = engine.tokenizer
    prompt_ids: list[list[int]] = tokenizer(
        [render_prompt(tokenizer, c) for c in conversations], add_special_tokens=False
    )["input_ids"]
    greedy = sampling.temperature <= 0
    params = [
        SamplingParams(
            n=1 if greedy else k,
            temperature=0.0 if greedy else sampling.temperature,
            top_p=1.0 if greedy else sampling.top_p,
            max_tokens=sampling.max_new_tokens,
            seed=None if sampling.seed is None else sampling.seed + i * k,
            detokenize=False,  # our tokenizer decodes, as on the torch path
        )
        for i in range(len(conversations))
    ]
    results = engine.llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False)
    outputs: list[list[Sample]] = []
    for result in results:
        answers = sorted(result.outputs, key=lambda answer: answer.index)
        tokens = [_new_tokens(tokenizer, answer) for answer in answers]
        texts = tokenizer.batch_decode(tokens, skip_special_tokens=True)
        samples = [
            Sample(text=text.strip(), token_ids=tuple(ids), truncated=answer.finish_reason == "length")
            for answer, ids, text in zip(answers, tokens, texts, strict=True)
        ]
        outputs.append(samples * k if greedy else samples)
    if progress is not None:
        progress(len(conversations), len(conversations))
    return outputs


def _new_tokens(tokenizer: PreTrainedTokenizerBase, answer: Any) -> list[int]:
    """A vLLM answer's new tokens as ours count them: without the token it stopped at."""
    tokens = list(answer.token_ids)
    # vLLM keeps the token it stopped at (EOS, or another end token the model's generation config names:
    # its stop_reason) among the new tokens. No stop strings are asked for, so "stop" means such a token.
    if answer.finish_reason == "stop" and tokens and tokens[-1] in (tokenizer.eos_token_id, answer.stop_reason):
        tokens.pop()
    return tokens
