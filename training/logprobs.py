"""Per-token and per-sequence completion log-probs, and the on-disk reference cache.

The language-model head runs only on the positions that predict completion tokens,
in chunks, and each chunk is reduced to ``logit[target] - logsumexp(logits)`` at once:
no (N, T, V) logits and no full-vocabulary log-softmax are ever materialised.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from training.data import (
    SequenceBatch,
    collate_sequences,
    encode_completion,
    encode_prompt,
    length_sorted_batches,
    sequence_key,
)
from training.models import CACHE_KWARG, is_lora, reference_mode


def backbone_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The transformer body (returns hidden states) and the output projection of a causal LM."""
    base = model.get_base_model() if is_lora(model) else model
    assert isinstance(base, PreTrainedModel)
    return base.base_model, base.get_output_embeddings()


def completion_mask(completion_lengths: torch.Tensor, width: int | None = None) -> torch.Tensor:
    """(N,) lengths -> (N, Tc) float mask with ones on each row's first ``length`` entries."""
    width = int(completion_lengths.max()) if width is None else width
    return (torch.arange(width).unsqueeze(0) < completion_lengths.unsqueeze(1)).float()


def token_logps_chunked(
    hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor, chunk_size: int
) -> torch.Tensor:
    """log p(target) for each row of ``hidden`` (M, H) -> (M,), ``chunk_size`` rows at a time.

    Under autocast the head's weight is cast once for all chunks, as autocast casts it.
    """
    assert isinstance(head, torch.nn.Linear)
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    weight = head.weight.to(dtype)
    bias = None if head.bias is None else head.bias.to(dtype)
    out = [
        _TargetLogps.apply(
            hidden[start : start + chunk_size].to(dtype), weight, bias, targets[start : start + chunk_size]
        )
        for start in range(0, hidden.shape[0], chunk_size)
    ]
    return torch.cat(out) if out else hidden.new_zeros(0)


_ROWS_AT_ONCE = 16  # logits rows widened to float32 together: a few MB, so they stay in cache


class _TargetLogps(torch.autograd.Function):
    """``logits = hidden @ weight.T + bias``, then ``logits[target] - logsumexp(logits)`` per row.

    Autograd through the plain expression keeps a float32 copy of the (m, V) logits, a
    scattered one-hot and a softmax, each a pass over memory. Here the logits stay in the
    inputs' dtype (bf16 under autocast, as autocast would compute them), the log-sum-exp
    reads them a few rows at a time in float32, and the backward builds
    ``d logits = g * (one_hot - softmax)`` in the same small row blocks. The numbers are
    those of the plain expression.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor
    ) -> torch.Tensor:
        logits = torch.nn.functional.linear(hidden, weight, bias)  # (m, V), all three of one dtype
        lse = torch.empty(logits.shape[0], device=logits.device)  # (m,) float32
        for start in range(0, logits.shape[0], _ROWS_AT_ONCE):
            rows = slice(start, start + _ROWS_AT_ONCE)
            lse[rows] = torch.logsumexp(logits[rows].float(), dim=-1)
        picked = logits.gather(1, targets.unsqueeze(1)).squeeze(1).float()  # (m,)
        ctx.save_for_backward(hidden, weight, logits, lse, targets)
        return picked - lse

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        hidden, weight, logits, lse, targets = ctx.saved_tensors
        grad = grad.float()
        grad_logits = torch.empty_like(logits)  # (m, V)
        for start in range(0, logits.shape[0], _ROWS_AT_ONCE):
            rows = slice(start, start + _ROWS_AT_ONCE)
            block = (logits[rows].float() - lse[rows].unsqueeze(1)).exp_().mul_(-grad[rows].unsqueeze(1))
            block[torch.arange(block.shape[0], device=block.device), targets[rows]] += grad[rows]
            grad_logits[rows] = block
        grad_hidden = grad_logits @ weight if ctx.needs_input_grad[0] else None
        grad_weight = grad_logits.t() @ hidden if ctx.needs_input_grad[1] else None
        grad_bias = grad_logits.sum(0) if ctx.needs_input_grad[2] else None
        return grad_hidden, grad_weight, grad_bias, None


def completion_logps(model: torch.nn.Module, batch: SequenceBatch, *, chunk_size: int = 2048) -> torch.Tensor:
    """Per-token log-probs of each row's completion, left-aligned, zero past its length.

    Returns:
        (N, Tc) with Tc the longest completion; multiply by ``completion_mask`` or sum
        over dim 1 for per-sequence log-probs.
    """
    backbone, head = backbone_and_head(model)
    device = next(model.parameters()).device
    input_ids = batch.input_ids.to(device)
    hidden = backbone(
        input_ids=input_ids, attention_mask=batch.attention_mask.to(device), use_cache=False
    ).last_hidden_state  # (N, T, H)

    n = input_ids.shape[0]
    lengths = batch.completion_lengths.to(device)  # (N,)
    rows = torch.repeat_interleave(torch.arange(n, device=device), lengths)  # (M,) row of each token
    starts = torch.cumsum(lengths, 0) - lengths  # (N,) first flat index of each row
    offset = torch.arange(rows.shape[0], device=device) - starts[rows]  # (M,) index inside the completion
    position = batch.prompt_lengths.to(device)[rows] - 1 + offset  # (M,) hidden state that predicts it
    targets = input_ids[rows, position + 1]  # (M,)
    token_logps = token_logps_chunked(hidden[rows, position], head, targets, chunk_size)  # (M,)

    out = torch.zeros(n, int(lengths.max()), device=device, dtype=token_logps.dtype)
    return out.index_put((rows, offset), token_logps)


def grouped_logps(
    model: torch.nn.Module,
    sequences: Sequence[tuple[list[int], list[int]]],
    *,
    pad_id: int,
    share_prompt: bool,
    chunk_size: int = 2048,
) -> torch.Tensor:
    """(N, Tc) per-token log-probs of each (prompt, completion)'s completion, zero past its length.

    With ``share_prompt`` each distinct prompt runs once for all its completions
    (``shared_prompt_logps``); without, or when no prompt repeats (``shared_prompts``), every
    sequence runs whole. The two agree to rounding.
    """
    shared = shared_prompts(sequences, share_prompt)
    if shared is not None:
        prompts, owner = shared
        completions = [c for _, c in sequences]
        return shared_prompt_logps(model, prompts, completions, owner, pad_id=pad_id, chunk_size=chunk_size)
    batch = collate_sequences([p for p, _ in sequences], [c for _, c in sequences], pad_id)
    return completion_logps(model, batch, chunk_size=chunk_size)


def shared_prompts(
    sequences: Sequence[tuple[list[int], list[int]]], share_prompt: bool
) -> tuple[list[list[int]], list[int]] | None:
    """The distinct prompts of (prompt, completion) sequences in first-seen order and each sequence's prompt
    index, when a pass should run each prompt once: with ``share_prompt`` and some prompt repeated (else
    there is nothing to save, and None)."""
    index: dict[tuple[int, ...], int] = {}
    owner = [index.setdefault(tuple(prompt), len(index)) for prompt, _ in sequences]
    if not share_prompt or len(index) == len(sequences):
        return None
    return [list(prompt) for prompt in index], owner


def prompt_batches(
    sequences: Sequence[tuple[list[int], list[int]]], batch_size: int, *, share_prompt: bool
) -> list[list[int]]:
    """Indices of (prompt, completion) sequences in batches of about ``batch_size``, shortest first, for passes
    without grad.

    With ``share_prompt`` the completions of one prompt stay in one batch (which may then hold more
    than ``batch_size``), so that each prompt runs once.
    """
    lengths = [len(p) + len(c) for p, c in sequences]
    if not share_prompt:
        return length_sorted_batches(lengths, batch_size, seed=0, shuffle=False)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (prompt, _) in enumerate(sequences):
        groups.setdefault(tuple(prompt), []).append(i)
    batches: list[list[int]] = []
    for group in sorted(groups.values(), key=lambda idx: max(lengths[i] for i in idx)):
        if batches and len(batches[-1]) + len(group) <= batch_size:
            batches[-1].extend(group)
        else:
            batches.append(list(group))
    return batches


def shared_prompt_logps(
    model: torch.nn.Module,
    prompts: Sequence[list[int]],
    completions: Sequence[list[int]],
    owner: Sequence[int],
    *,
    pad_id: int,
    chunk_size: int = 2048,
) -> torch.Tensor:
    """Like ``completion_logps``, but each prompt runs through the model once (``shared_prompt_states``).

    Returns:
        (N, Tc) per-token completion log-probs, zero past each completion's length.
    """
    backbone, head = backbone_and_head(model)
    states, completion_ids, lengths = shared_prompt_states(backbone, prompts, completions, owner, pad_id=pad_id)
    n, c = completion_ids.shape
    rows = torch.repeat_interleave(torch.arange(n, device=states.device), lengths)  # (M,)
    starts = torch.cumsum(lengths, 0) - lengths
    offset = torch.arange(rows.shape[0], device=states.device) - starts[rows]  # (M,)
    token_logps = token_logps_chunked(states[rows, offset], head, completion_ids[rows, offset], chunk_size)
    result = torch.zeros(n, c, device=states.device, dtype=token_logps.dtype)
    return result.index_put((rows, offset), token_logps)


def shared_prompt_states(
    backbone: torch.nn.Module,
    prompts: Sequence[list[int]],
    completions: Sequence[list[int]],
    owner: Sequence[int],
    *,
    pad_id: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The transformer body's last hidden states of completion i after ``prompts[owner[i]]``, each prompt run once.

    The G prompts are left-padded and run first; their key/value cache is gathered to the N
    completions (gradients flow back through it) and the right-padded completions run on top.
    Chosen and rejected (or the K completions of a group) thus share one prompt pass, forward
    and backward. Positions are explicit, so padding does not shift them.

    Returns:
        states (N, 1 + C, H): position j is the state that predicts completion token j (position 0
        is the prompt's last token), so position ``lengths[i]`` is the state of the sequence's last
        token; the completion ids (N, C), right-padded; and their lengths (N,).
    """
    device = next(backbone.parameters()).device
    g, p = len(prompts), max(map(len, prompts))
    prompt_ids = torch.full((g, p), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros((g, p), dtype=torch.long)
    for i, ids in enumerate(prompts):
        prompt_ids[i, p - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        prompt_mask[i, p - len(ids) :] = 1
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
    prompt_positions = (prompt_mask.cumsum(1) - 1).clamp(min=0)  # (G, P)
    out = backbone(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=prompt_positions, use_cache=True)
    cache = getattr(out, CACHE_KWARG)  # the output names its cache as the forward names its keyword
    index = torch.tensor(list(owner), dtype=torch.long, device=device)  # (N,)
    cache.reorder_cache(index)  # (G, ...) -> (N, ...)

    n, c = len(completions), max(map(len, completions))
    completion_ids = torch.full((n, c), pad_id, dtype=torch.long)
    for i, ids in enumerate(completions):
        completion_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    completion_ids = completion_ids.to(device)
    lengths = torch.tensor([len(ids) for ids in completions], device=device)  # (N,)
    own_mask = (torch.arange(c, device=device).unsqueeze(0) < lengths.unsqueeze(1)).long()  # (N, C)
    positions = prompt_mask.sum(1)[index].unsqueeze(1) + torch.arange(c, device=device).unsqueeze(0)  # (N, C)
    hidden = backbone(
        input_ids=completion_ids,
        attention_mask=torch.cat([prompt_mask[index], own_mask], dim=1),  # (N, P + C)
        position_ids=positions,
        use_cache=True,
        **{CACHE_KWARG: cache},
    ).last_hidden_state  # (N, C, H)
    states = torch.cat([out.last_hidden_state[:, -1][index].unsqueeze(1), hidden], dim=1)  # (N, 1 + C, H)
    return states, completion_ids, lengths


def sequence_logps(model: torch.nn.Module, batch: SequenceBatch, *, chunk_size: int = 2048) -> torch.Tensor:
    """(N,) summed completion log-probs."""
    return completion_logps(model, batch, chunk_size=chunk_size).sum(dim=1)


# -------------------------------------------------------------------- reference cache


def model_fingerprint(name_or_path: str, precision: str) -> str:
    """Identity of a reference model: its files' names, sizes and times, and the precision."""
    h = hashlib.sha256(precision.encode())
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        h.update(str(path.resolve()).encode())
        for f in sorted(path.iterdir()):
            if f.suffix in (".safetensors", ".json"):
                stat = f.stat()
                h.update(f"{f.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    else:
        h.update(name_or_path.encode())
    return h.hexdigest()[:24]


class ReferenceCache:
    """Per-token reference log-probs on disk, keyed by model fingerprint and sequence content.

    Each ``flush`` writes the entries added since the last one as a new safetensors
    shard (temporary name, then rename), so concurrent readers never see half a file.
    Without a directory it is an in-memory cache for one run.
    """

    def __init__(self, cache_dir: Path | None, fingerprint: str):
        self.dir = Path(cache_dir) / fingerprint if cache_dir is not None else None
        self.entries: dict[str, torch.Tensor] = {}
        self.new: dict[str, torch.Tensor] = {}
        if self.dir is not None and self.dir.is_dir():
            for shard in sorted(self.dir.glob("*.safetensors")):
                self.entries.update(load_file(shard))

    def get(self, key: str) -> torch.Tensor | None:
        return self.entries.get(key)

    def put(self, key: str, token_logps: torch.Tensor) -> None:
        value = token_logps.detach().float().cpu().contiguous()
        self.entries[key] = value
        self.new[key] = value

    def flush(self) -> None:
        if self.dir is None or not self.new:
            self.new = {}
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".shard-", suffix=".tmp", dir=self.dir)
        os.close(fd)
        save_file(self.new, tmp)
        os.replace(tmp, self.dir / f"{hashlib.sha256(''.join(sorted(self.new)).encode()).hexdigest()[:16]}.safetensors")
        self.new = {}


def autocast_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager[None]:
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def reference_logps(
    model: torch.nn.Module,
    sequences: Sequence[tuple[list[int], list[int]]],
    cache: ReferenceCache,
    *,
    pad_id: int,
    batch_size: int,
    precision: str,
    chunk_size: int = 2048,
    share_prompt: bool = True,
    on_batch: Callable[[int, int], None] | None = None,
) -> tuple[dict[str, torch.Tensor], int]:
    """Per-token reference log-probs for each (prompt, completion), from the cache or computed.

    With ``share_prompt`` the completions still to compute are grouped by prompt and each
    prompt runs once for all of them (as the training step does); ``batch_size`` counts
    completions. Returns the log-probs by ``sequence_key`` and how many sequences were
    computed (the rest came from the cache). New entries are flushed to disk.
    """
    out: dict[str, torch.Tensor] = {}
    todo: dict[str, tuple[list[int], list[int]]] = {}  # the sequences to compute, by key
    for prompt, completion in sequences:
        key = sequence_key(prompt, completion)
        cached = cache.get(key)
        if cached is not None:
            out[key] = cached
        else:
            todo[key] = (prompt, completion)
    keys, pending = list(todo), list(todo.values())
    total = len(pending)
    was_training = model.training
    model.eval()
    done = 0
    try:
        with reference_mode(model), autocast_context(precision, next(model.parameters()).device):
            for idx in prompt_batches(pending, batch_size, share_prompt=share_prompt):
                logps = grouped_logps(
                    model, [pending[i] for i in idx], pad_id=pad_id, share_prompt=share_prompt, chunk_size=chunk_size
                )  # (n, Tc)
                for row, i in enumerate(idx):
                    cache.put(keys[i], logps[row, : len(pending[i][1])])
                    out[keys[i]] = cache.get(keys[i])  # type: ignore[assignment]
                done += len(idx)
                if on_batch is not None:
                    on_batch(done, total)
    finally:
        model.train(was_training)
    cache.flush()
    return out, total


@contextlib.contextmanager
def evaluation(model: torch.nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def padded_from_keys(values: dict[str, torch.Tensor], keys: Sequence[str], width: int | None = None) -> torch.Tensor:
    """Stack per-token tensors of different lengths into (N, Tc), zero padded."""
    width = max(v.shape[0] for v in (values[k] for k in keys)) if width is None else width
    out = torch.zeros(len(keys), width)
    for i, k in enumerate(keys):
        v = values[k]
        out[i, : v.shape[0]] = v
    return out


def completion_logprob_sums(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: Sequence[tuple[list[dict[str, str]], str]],
    *,
    batch_size: int = 8,
) -> list[float]:
    """The model's summed log-prob of each (prompt messages, completion text), in the order given."""
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sums: list[float] = []
    with evaluation(model):
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            prompts = [encode_prompt(tokenizer, messages) for messages, _ in chunk]
            completions = [encode_completion(tokenizer, text) for _, text in chunk]
            batch = collate_sequences(prompts, completions, pad_id)
            batch = SequenceBatch(
                input_ids=batch.input_ids.to(device),
                attention_mask=batch.attention_mask.to(device),
                prompt_lengths=batch.prompt_lengths.to(device),
                completion_lengths=batch.completion_lengths.to(device),
            )
            sums += sequence_logps(model, batch).tolist()  # (N,) per chunk
    return sums
