"""Preference examples -> token ids -> padded batches.

Rules, in the order they are applied:

1. A prompt is a string (one user turn) or a list of ``{role, content}`` messages ending
   with a user turn. It goes through the tokenizer's chat template with the assistant
   generation prompt. A completion is a string, or a message list whose assistant turns
   are joined (the conversational export); EOS is appended to every completion.
2. Prompts are never cut: cutting a conversation changes what the annotator judged.
   An example whose prompt alone is longer than ``max_prompt_length`` tokens is dropped
   and counted.
3. Completions are cut at the end so that prompt + completion fits in ``max_length``
   (a cut completion loses its EOS). An empty completion is one token long: its EOS.
4. Masks come from lengths, never from ``ids != pad``: the default model pads with EOS.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

Messages = list[dict[str, str]]


class DataFormatError(ValueError):
    """An input file or example is not in the expected format; the message names where."""


# ---------------------------------------------------------------------------- reading


def read_records(path: Path) -> list[dict[str, Any]]:
    """Read a JSONL or Parquet file into a list of dicts."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path}: no such file")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except Exception as exc:  # pyarrow raises several unrelated types for a bad file
            raise DataFormatError(f"{path}: not a readable Parquet file ({exc})") from exc
    records = []
    with path.open(encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataFormatError(f"{path}, line {line_no}: invalid JSON ({exc.msg})") from exc
            if not isinstance(record, dict):
                raise DataFormatError(f"{path}, line {line_no}: expected a JSON object")
            record["_line"] = line_no
            records.append(record)
    if not records:
        raise DataFormatError(f"{path}: no examples")
    return records


def _where(record: dict[str, Any], index: int) -> str:
    return f"line {record['_line']}" if "_line" in record else f"example {index}"


def prompt_messages(prompt: Any, where: str = "example") -> Messages:
    """A prompt as a message list ending with a user turn."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
        for m in prompt:
            if m.get("role") not in ("system", "user", "assistant") or not isinstance(m.get("content"), str):
                raise DataFormatError(f"{where}: field 'prompt': each message needs a role and string content")
        if prompt[-1]["role"] != "user":
            raise DataFormatError(f"{where}: field 'prompt': the last message must be a user turn")
        return [{"role": m["role"], "content": m["content"]} for m in prompt]
    raise DataFormatError(f"{where}: field 'prompt': expected a string or a non-empty list of messages")


def completion_text(completion: Any, where: str, field_name: str) -> str:
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict) and isinstance(completion.get("text"), str):
        return completion["text"]
    if isinstance(completion, list) and all(isinstance(m, dict) for m in completion):
        parts = [m.get("content") for m in completion if m.get("role", "assistant") == "assistant"]
        if all(isinstance(p, str) for p in parts):
            return "\n".join(parts)  # type: ignore[arg-type]
    raise DataFormatError(f"{where}: field '{field_name}': expected a string or assistant messages")


def prompt_key(prompt: Any) -> str:
    """A stable identity for a prompt, used to split train and held-out data by prompt."""
    return hashlib.sha256(json.dumps(prompt, sort_keys=True).encode()).hexdigest()[:16]


def split_by_prompt(
    records: Sequence[dict[str, Any]], eval_fraction: float, *, seed: int = 0
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split examples so that every prompt lands wholly in train or wholly in eval."""
    keys = sorted({prompt_key(r.get("prompt")) for r in records})
    random.Random(seed).shuffle(keys)
    n_eval = round(len(keys) * eval_fraction)
    if eval_fraction > 0 and len(keys) > 1:
        n_eval = min(max(n_eval, 1), len(keys) - 1)
    eval_keys = set(keys[:n_eval])
    train = [r for r in records if prompt_key(r.get("prompt")) not in eval_keys]
    held_out = [r for r in records if prompt_key(r.get("prompt")) in eval_keys]
    return train, held_out


# ------------------------------------------------------------------------- rewards


def rewards_from_ranks(ranks: Sequence[float]) -> list[float]:
    """One annotator's ranking (1 = best, ties share a rank) -> rewards ``(K - place) / (K - 1)``.

    Tied completions share the mean of the places they occupy, so the rule holds for
    both competition (1, 1, 3) and dense (1, 1, 2) tie numbering.
    """
    k = len(ranks)
    if k < 2:
        return [0.0] * k
    order = sorted(range(k), key=lambda i: ranks[i])
    places = [0.0] * k
    i = 0
    while i < k:
        j = i
        while j + 1 < k and ranks[order[j + 1]] == ranks[order[i]]:
            j += 1
        mean_place = (i + 1 + j + 1) / 2
        for t in range(i, j + 1):
            places[order[t]] = mean_place
        i = j + 1
    return [(k - p) / (k - 1) for p in places]


def group_rewards(record: dict[str, Any], k: int, where: str) -> list[float]:
    """Rewards of a group: given ``rewards``, else the mean over annotators of rewards from ``ranks``."""
    if record.get("rewards") is not None:
        rewards = record["rewards"]
        if not (isinstance(rewards, list) and len(rewards) == k and all(_is_number(r) for r in rewards)):
            raise DataFormatError(f"{where}: field 'rewards': expected {k} numbers")
        return [float(r) for r in rewards]
    ranks = record.get("ranks")
    if ranks is None:
        raise DataFormatError(f"{where}: a group needs 'rewards' or 'ranks'")
    rankings = ranks if ranks and isinstance(ranks[0], list) else [ranks]
    per_annotator = []
    for ranking in rankings:
        if not (isinstance(ranking, list) and len(ranking) == k and all(_is_number(r) for r in ranking)):
            raise DataFormatError(f"{where}: field 'ranks': expected {k} numbers per ranking")
        per_annotator.append(rewards_from_ranks(ranking))
    return [sum(col) / len(col) for col in zip(*per_annotator, strict=True)]


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


# ---------------------------------------------------------------------- tokenizing


@dataclass
class PairExample:
    prompt_ids: list[int]
    chosen_ids: list[int]  # ends with EOS unless cut
    rejected_ids: list[int]
    weight: float
    prompt_key: str
    margin: float = 0.0  # how far the chosen side should win by (a reward model's Bradley-Terry margin)


@dataclass
class GroupExample:
    prompt_ids: list[int]
    completion_ids: list[list[int]]
    rewards: list[float]
    prompt_key: str
    rankings: list[list[float]]  # one per annotator (1 = best, ties equal), or ranks from the rewards


@dataclass
class TokenizedData:
    examples: list[Any]
    dropped_long_prompt: int = 0  # prompt alone longer than max_prompt_length
    dropped_equal_rewards: int = 0  # groups with nothing to learn from (all rewards equal)
    truncated: int = 0  # examples with at least one completion cut to fit max_length


def encode_prompt(tokenizer: PreTrainedTokenizerBase, messages: Messages) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]  # type: ignore[index,arg-type]


def encode_completion(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
    return [*ids, tokenizer.eos_token_id]  # type: ignore[list-item]


def tokenize_pairs(
    records: Sequence[dict[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int,
    max_prompt_length: int,
) -> TokenizedData:
    """Pairs (``prompt``, ``chosen``, ``rejected``, optional ``weight``) -> token ids."""
    out = TokenizedData(examples=[])
    for index, record in enumerate(records):
        where = _where(record, index)
        for name in ("prompt", "chosen", "rejected"):
            if name not in record:
                raise DataFormatError(f"{where}: missing field '{name}' (is this a DPO pairs file?)")
        messages = prompt_messages(record["prompt"], where)
        weight = record.get("weight")
        if weight is not None and not (_is_number(weight) and weight >= 0):
            raise DataFormatError(f"{where}: field 'weight': expected a non-negative number")
        margin = record.get("margin")
        if margin is not None and not (_is_number(margin) and math.isfinite(margin)):
            raise DataFormatError(f"{where}: field 'margin': expected a finite number")
        prompt_ids = encode_prompt(tokenizer, messages)
        if len(prompt_ids) > max_prompt_length:
            out.dropped_long_prompt += 1
            continue
        room = max_length - len(prompt_ids)
        chosen = encode_completion(tokenizer, completion_text(record["chosen"], where, "chosen"))
        rejected = encode_completion(tokenizer, completion_text(record["rejected"], where, "rejected"))
        if len(chosen) > room or len(rejected) > room:
            out.truncated += 1
        out.examples.append(
            PairExample(
                prompt_ids=prompt_ids,
                chosen_ids=chosen[:room],
                rejected_ids=rejected[:room],
                weight=1.0 if weight is None else float(weight),
                prompt_key=prompt_key(record["prompt"]),
                margin=0.0 if margin is None else float(margin),
            )
        )
    return out


def tokenize_groups(
    records: Sequence[dict[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int,
    max_prompt_length: int,
) -> TokenizedData:
    """Groups (``prompt``, ``completions``, ``rewards`` or ``ranks``) -> token ids and rewards."""
    out = TokenizedData(examples=[])
    for index, record in enumerate(records):
        where = _where(record, index)
        for name in ("prompt", "completions"):
            if name not in record:
                raise DataFormatError(f"{where}: missing field '{name}' (is this a GRPO groups file?)")
        messages = prompt_messages(record["prompt"], where)
        completions = record["completions"]
        if not isinstance(completions, list) or len(completions) < 2:
            raise DataFormatError(f"{where}: field 'completions': expected a list of at least 2")
        rewards = group_rewards(record, len(completions), where)
        if max(rewards) - min(rewards) < 1e-8:
            out.dropped_equal_rewards += 1
            continue
        prompt_ids = encode_prompt(tokenizer, messages)
        if len(prompt_ids) > max_prompt_length:
            out.dropped_long_prompt += 1
            continue
        room = max_length - len(prompt_ids)
        encoded = [
            encode_completion(tokenizer, completion_text(c, where, f"completions[{i}]"))
            for i, c in enumerate(completions)
        ]
        if any(len(c) > room for c in encoded):
            out.truncated += 1
        out.examples.append(
            GroupExample(
                prompt_ids=prompt_ids,
                completion_ids=[c[:room] for c in encoded],
                rewards=rewards,
                prompt_key=prompt_key(record["prompt"]),
                rankings=group_rankings(record, rewards, where),
            )
        )
    return out


def group_rankings(record: dict[str, Any], rewards: list[float], where: str) -> list[list[float]]:
    """The rankings of a group as given (``ranks``: one list, or one per annotator), else the rewards' order."""
    ranks = record.get("ranks")
    if ranks is None:
        return [[-r for r in rewards]]
    rankings = ranks if ranks and isinstance(ranks[0], list) else [ranks]
    for ranking in rankings:
        if not (isinstance(ranking, list) and len(ranking) == len(rewards) and all(_is_number(r) for r in ranking)):
            raise DataFormatError(f"{where}: field 'ranks': expected {len(rewards)} numbers per ranking")
    return [[float(r) for r in ranking] for ranking in rankings]


def pairs_from_groups(groups: Sequence[GroupExample]) -> list[PairExample]:
    """Every (better, worse) pair inside each group, for held-out preference accuracy."""
    pairs = []
    for g in groups:
        for i, ri in enumerate(g.rewards):
            for j, rj in enumerate(g.rewards):
                if ri > rj:
                    pairs.append(PairExample(g.prompt_ids, g.completion_ids[i], g.completion_ids[j], 1.0, g.prompt_key))
    return pairs


# ------------------------------------------------------------------------ batching


@dataclass
class SequenceBatch:
    """Prompt + completion sequences, right-padded.

    Row i holds ``prompt_lengths[i]`` prompt tokens followed by ``completion_lengths[i]``
    completion tokens, then padding.
    """

    input_ids: torch.Tensor  # (N, T)
    attention_mask: torch.Tensor  # (N, T) 1 on real tokens
    prompt_lengths: torch.Tensor  # (N,)
    completion_lengths: torch.Tensor  # (N,)

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


def collate_sequences(prompts: Sequence[list[int]], completions: Sequence[list[int]], pad_id: int) -> SequenceBatch:
    lengths = [len(p) + len(c) for p, c in zip(prompts, completions, strict=True)]
    width = max(lengths)
    input_ids = torch.full((len(lengths), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        input_ids[i, : lengths[i]] = torch.tensor(p + c, dtype=torch.long)
        attention_mask[i, : lengths[i]] = 1
    return SequenceBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        prompt_lengths=torch.tensor([len(p) for p in prompts], dtype=torch.long),
        completion_lengths=torch.tensor([len(c) for c in completions], dtype=torch.long),
    )


def collate_pairs(pairs: Sequence[PairExample], pad_id: int) -> SequenceBatch:
    """B pairs -> 2B sequences: rows 0..B-1 chosen, rows B..2B-1 rejected (one forward pass)."""
    prompts = [p.prompt_ids for p in pairs] * 2
    completions = [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]
    return collate_sequences(prompts, completions, pad_id)


def length_sorted_batches(
    lengths: Sequence[int], batch_size: int, *, seed: int, shuffle: bool = True
) -> list[list[int]]:
    """Indices in batches of similar length, to waste little padding.

    Indices are shuffled, cut into windows of 16 batches, sorted by length inside each
    window and batched; then the batch order is shuffled. With ``shuffle=False`` the
    whole set is sorted (evaluation).
    """
    indices = list(range(len(lengths)))
    if not shuffle:
        indices.sort(key=lambda i: lengths[i])
        return [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
    rng = random.Random(seed)
    rng.shuffle(indices)
    window = batch_size * 16
    batches: list[list[int]] = []
    for start in range(0, len(indices), window):
        chunk = sorted(indices[start : start + window], key=lambda i: lengths[i])
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


def sequence_key(prompt_ids: list[int], completion_ids: list[int]) -> str:
    """Content hash of one tokenized sequence (the reference log-prob cache key)."""
    h = hashlib.sha256()
    h.update(torch.tensor(prompt_ids, dtype=torch.int64).numpy().tobytes())
    h.update(b"|")
    h.update(torch.tensor(completion_ids, dtype=torch.int64).numpy().tobytes())
    return h.hexdigest()
