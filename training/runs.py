"""What the algorithms' loops share: the setup of a run, precision, schedules, resumable checkpoints, evaluation.

A loop reads: ``policy = load_policy(...)`` (seed, model, device, precision, LoRA), tokenize its
own examples, ``policy.reference(...)`` (the cached reference pass), plan its steps,
``start_optimization(...)`` (optimizer, schedule, checkpoint resume), its own step, ``finish_run``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import load_file, save_file

from training.config import TrainConfig
from training.data import GroupExample, PairExample, length_sorted_batches, sequence_key
from training.lineage import base_model_of
from training.logprobs import (
    ReferenceCache,
    autocast_context,
    evaluation,
    grouped_logps,
    model_fingerprint,
    prompt_batches,
    reference_logps,
)
from training.models import (
    LoraSettings,
    apply_lora,
    atomic_directory,
    default_device,
    load_model,
    load_trainable_state_dict,
    save_model_dir,
    trainable_state_dict,
    tune_for_training,
)
from training.parallel import Ranks, join_processes

ProgressCallback = Callable[[int, int, dict[str, float]], None]


@dataclass
class TrainResult:
    out_dir: Path  # the finished model directory (not created when cancelled)
    metrics: dict[str, Any] = field(default_factory=dict)  # eval before/after, steps, seconds, counts
    cancelled: bool = False


@dataclass
class Policy:
    """The model a run trains, ready for its first step, and what its loop needs to know about it."""

    model: torch.nn.Module
    tokenizer: Any
    pad_id: int
    device: torch.device
    precision: str  # resolved: bf16 or fp32
    fingerprint: str  # identity of the reference (the base model at this precision)
    ranks: Ranks = field(default_factory=Ranks)  # this process among the run's processes (one by default)

    def reference(
        self, config: TrainConfig, sequences: Sequence[tuple[list[int], list[int]]], cache_dir: Path | None
    ) -> tuple[dict[str, torch.Tensor], int, float]:
        """Reference log-probs of each (prompt, completion): once, no grad, from the cache where this reference
        already saw the sequence. Returns (per-token log-probs by sequence key, how many were computed, seconds).

        Under several processes with a cache, the main process computes and writes what is missing and the
        others then read all of it from the cache; without a cache each process computes all of it."""
        started = time.perf_counter()
        with self.ranks.main_first() if cache_dir is not None else contextlib.nullcontext():
            ref, computed = reference_logps(
                self.model,
                sequences,
                ReferenceCache(cache_dir, self.fingerprint),
                pad_id=self.pad_id,
                batch_size=2 * config.eval_batch_size,
                precision=self.precision,
                chunk_size=config.logprob_chunk_size,
                share_prompt=config.share_prompt,
            )
        return ref, computed, time.perf_counter() - started


def load_policy(config: TrainConfig, model: str) -> Policy:
    """Seed, load the base model, pick the precision for its device, attach LoRA adapters and tune for training.

    With LoRA the reference is the same model with its adapters off, so no second copy is loaded.
    Under ``torchrun`` or ``accelerate launch`` it first joins the run's other processes (``training.parallel``).
    """
    ranks = join_processes()  # before the model is placed: on CUDA it picks this process's GPU
    torch.manual_seed(config.seed)
    policy: torch.nn.Module
    policy, tokenizer = load_model(model, device=default_device())
    device = next(policy.parameters()).device
    precision = resolve_precision(config.precision, device)
    if config.lora:
        policy = apply_lora(policy, LoraSettings(config.lora_r, config.lora_alpha, config.lora_dropout))
    tune_for_training(policy, precision=precision, bf16_frozen_base=config.lora and not config.merge_lora)
    return Policy(
        model=policy,
        tokenizer=tokenizer,
        pad_id=int(tokenizer.pad_token_id),  # type: ignore[arg-type]
        device=device,
        precision=precision,
        fingerprint=model_fingerprint(model, precision),
        ranks=ranks,
    )


class Optimization(NamedTuple):
    optimizer: torch.optim.Optimizer
    params: list[torch.nn.Parameter]  # the trainable ones, for gradient clipping
    scheduler: torch.optim.lr_scheduler.LambdaLR
    checkpoint: RunCheckpoint
    start_step: int  # 0, or the step a checkpoint of this same run reached


def start_optimization(
    config: TrainConfig,
    policy: Policy,
    *,
    total_steps: int,
    out_dir: Path,
    data_keys: Sequence[str],
    resume: bool,
) -> Optimization:
    """AdamW with warmup and the configured schedule, resumed from this run's checkpoint when there is one.

    A checkpoint belongs to one run: the same config, reference and training data (``data_keys``).
    """
    optimizer, params = make_optimizer(policy.model, lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_factor(config.lr_scheduler, int(config.warmup_ratio * total_steps), total_steps)
    )
    checkpoint = RunCheckpoint(out_dir, run_fingerprint(asdict(config), policy.fingerprint, data_keys), policy.ranks)
    start_step = checkpoint.load(policy.model, optimizer, scheduler) if resume else 0
    return Optimization(optimizer, params, scheduler, checkpoint, start_step)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` where the hardware has fast bf16 matrix units, else ``fp32``."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return "fp32"
    # Without these, PyTorch emulates bf16 matmuls on the CPU, which is far slower than fp32.
    return "bf16" if {"avx512_bf16", "amx_bf16"} & set(flags) else "fp32"


def lr_factor(schedule: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the peak learning rate at each optimizer step: linear warmup, then the schedule."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))  # cosine

    return factor


def make_optimizer(
    model: torch.nn.Module, *, lr: float, weight_decay: float
) -> tuple[torch.optim.Optimizer, list[torch.nn.Parameter]]:
    params = [p for p in model.parameters() if p.requires_grad]
    # The fused kernel does the same update in one pass over the parameters: on the CPU it is
    # about 7x faster than the default for a 135M-parameter model (0.10 s against 0.77 s a step).
    # Right on a GPU too (it began as a CUDA kernel), so both devices use it.
    fused = all(p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused), params


def step_plan(
    lengths: Sequence[int],
    batch_size: int,
    accumulation: int,
    epochs: int,
    seed: int,
    min_steps: int = 0,
    steps_per_batch: int = 1,
) -> list[list[list[int]]]:
    """All batches of a run: each a list of micro-batches of example indices, trained on ``steps_per_batch``
    optimizer steps (GRPO's iterations; one otherwise).

    ``epochs`` passes over the data, or as ``passes`` extends them to reach ``min_steps``.
    Deterministic given the seed, so a resumed run sees the same batches in the same order.
    """
    steps_per_epoch = math.ceil(math.ceil(len(lengths) / batch_size) / accumulation) * steps_per_batch
    epochs, stop = passes(steps_per_epoch, epochs, min_steps, steps_per_batch)
    micro = []
    for epoch in range(epochs):
        micro.extend(length_sorted_batches(lengths, batch_size, seed=seed * 1000 + epoch))
    return [micro[i : i + accumulation] for i in range(0, len(micro), accumulation)][:stop]


def passes(steps_per_epoch: int, epochs: int, min_steps: int, steps_per_batch: int) -> tuple[int, int | None]:
    """How many passes a plan makes, and after how many batches it stops (None: at the end).

    ``epochs`` passes, or, when they make fewer than ``min_steps`` optimizer steps, a small set passed
    over again until it reaches them and no further: the last pass stops partway. Whole passes would
    give a set of 23 steps a pass 69 steps for 48, and the steps past where a small preference is met
    only cost fluency (benchmarks/RESULTS.md, "Efficacy"). Offline plans and rollout plans alike.
    """
    if not 0 < steps_per_epoch * epochs < min_steps:
        return epochs, None
    return math.ceil(min_steps / steps_per_epoch), math.ceil(min_steps / steps_per_batch)


def run_fingerprint(config: dict[str, Any], model_fingerprint: str, keys: Sequence[str]) -> str:
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    h.update(model_fingerprint.encode())
    for k in keys:
        h.update(k.encode())
    return h.hexdigest()[:24]


class RunCheckpoint:
    """The resumable state of an unfinished run, beside its output directory.

    It lives in a hidden ``.<out_dir name>.checkpoint`` directory (written atomically),
    holds the trainable weights (safetensors), the optimizer and the step reached, and
    is only used by a run with the same config, base model and data. Under several processes
    every one reads it and the main one alone writes and discards it.
    """

    def __init__(self, out_dir: Path, fingerprint: str, ranks: Ranks | None = None):
        self.dir = Path(out_dir).parent / f".{Path(out_dir).name}.checkpoint"
        self.fingerprint = fingerprint
        self.ranks = ranks or Ranks()

    def load(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler
    ) -> int:
        state_file = self.dir / "state.json"
        if not state_file.is_file():
            return 0
        state = json.loads(state_file.read_text())
        if state.get("fingerprint") != self.fingerprint:
            return 0
        load_trainable_state_dict(model, load_file(self.dir / "weights.safetensors"))
        optimizer.load_state_dict(_optimizer_state_load(self.dir, state["optimizer"]))
        scheduler.load_state_dict(state["scheduler"])
        return int(state["step"])

    def save(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        step: int,
    ) -> None:
        if not self.ranks.main:
            self.ranks.barrier()  # the others go on once it is written
            return
        weights = {k: v.detach().contiguous() for k, v in trainable_state_dict(model).items()}
        with atomic_directory(self.dir) as tmp:
            save_file(_untie(weights), tmp / "weights.safetensors")
            state = {
                "fingerprint": self.fingerprint,
                "step": step,
                "scheduler": scheduler.state_dict(),
                "optimizer": _optimizer_state_save(optimizer, tmp),
            }
            (tmp / "state.json").write_text(json.dumps(state))
        self.ranks.barrier()

    def discard(self) -> None:
        if self.ranks.main:
            shutil.rmtree(self.dir, ignore_errors=True)


def _optimizer_state_save(optimizer: torch.optim.Optimizer, folder: Path) -> dict[str, Any]:
    """Write the optimizer's tensors with safetensors (no pickle); return the rest as JSON-able data."""
    state_dict = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in state_dict["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value.detach().contiguous()
            else:
                scalars.setdefault(str(index), {})[name] = value
    save_file(tensors, folder / "optimizer.safetensors")
    return {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _optimizer_state_load(folder: Path, saved: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, tensor in load_file(folder / "optimizer.safetensors").items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = tensor
    for index, values in saved["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    return {"state": state, "param_groups": saved["param_groups"]}


def _untie(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share storage (tied embeddings); store copies.
    seen: set[int] = set()
    out = {}
    for k, v in weights.items():
        ptr = v.data_ptr()
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out


def implicit_reward_metrics(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> dict[str, float | None]:
    """Held-out accuracy and mean margin of the implicit reward ``β·(log π − log π_ref)``; all (B,).

    A pair counts when the chosen side's implicit reward is higher; an exact tie counts half.
    It says how far the trained policy moved from its reference in the direction of the
    pairs, so it means something only after training: before, the policy is the reference
    and every margin is 0.
    """
    margin = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))  # (B,)
    if len(margin) == 0:  # None rather than NaN: metrics are stored as JSON
        return {"accuracy": None, "margin": None}
    accuracy = (margin > 0).float() + 0.5 * (margin == 0).float()
    return {"accuracy": float(accuracy.mean()), "margin": float(margin.mean())}


def logp_metrics(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    *,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
) -> dict[str, float | None]:
    """A model's own preference on held-out pairs, from its summed completion log-probs; all (B,).

    ``logp_accuracy``: share of pairs whose chosen completion is the more likely one;
    ``logp_accuracy_per_token``: the same with each side's log-prob divided by its length
    (so a short answer is not favoured for being short); ``logp_margin``: the mean of
    chosen minus rejected. The same numbers for the parent and the trained model compare them.
    """
    if len(chosen) == 0:
        return {"logp_accuracy": None, "logp_accuracy_per_token": None, "logp_margin": None, "pairs": 0}
    per_token = chosen / chosen_lengths.clamp(min=1) > rejected / rejected_lengths.clamp(min=1)  # (B,)
    return {
        "logp_accuracy": float((chosen > rejected).float().mean()),
        "logp_accuracy_per_token": float(per_token.float().mean()),
        "logp_margin": float((chosen - rejected).mean()),
        "pairs": len(chosen),
    }


def kendall_tau(scores: Sequence[float], rewards: Sequence[float]) -> float | None:
    """Kendall's tau-b between a model's scores and the human rewards of one group (ties in either allowed).

    None when either side is all ties (the coefficient is undefined)."""
    concordant = discordant = tied_scores = tied_rewards = 0
    n = len(scores)
    for i in range(n):
        for j in range(i + 1, n):
            ds, dr = scores[i] - scores[j], rewards[i] - rewards[j]
            if ds == 0 and dr == 0:
                tied_scores += 1
                tied_rewards += 1
            elif ds == 0:
                tied_scores += 1
            elif dr == 0:
                tied_rewards += 1
            elif (ds > 0) == (dr > 0):
                concordant += 1
            else:
                discordant += 1
    total = n * (n - 1) // 2
    denominator = math.sqrt((total - tied_scores) * (total - tied_rewards))
    return None if denominator == 0 else (concordant - discordant) / denominator


def evaluate_pairs(
    model: torch.nn.Module | None,
    pairs: Sequence[PairExample],
    ref: dict[str, torch.Tensor],
    *,
    groups: Sequence[GroupExample] = (),
    beta: float,
    pad_id: int,
    batch_size: int,
    precision: str,
    share_prompt: bool,
) -> dict[str, float | None]:
    """Held-out figures of a model on the same pairs: its own log-prob preference (``logp_metrics``) and,
    for a trained model, the implicit reward against the reference (``implicit_reward_metrics``).

    Each distinct (prompt, completion) runs once (GRPO's held-out pairs share their groups' completions),
    ``batch_size`` pairs' worth at a time, and with ``share_prompt`` each prompt once for its completions.

    ``model=None`` scores the parent, the model the run started from: it is the reference, so its
    log-probs are the reference pass's and no implicit reward is reported. With ``groups`` (GRPO's
    held-out groups, whose completions are the pairs'), ``kendall_tau`` is the mean over the groups of
    tau-b between the model's summed log-probs of the completions and the human rewards.
    """
    ref_chosen = torch.tensor([float(ref[sequence_key(p.prompt_ids, p.chosen_ids)].sum()) for p in pairs])  # (B,)
    ref_rejected = torch.tensor([float(ref[sequence_key(p.prompt_ids, p.rejected_ids)].sum()) for p in pairs])
    if model is None:
        chosen, rejected = ref_chosen, ref_rejected
    else:
        distinct = {
            sequence_key(p.prompt_ids, c): (p.prompt_ids, c) for p in pairs for c in (p.chosen_ids, p.rejected_ids)
        }
        keys, sequences = list(distinct), list(distinct.values())
        summed: dict[str, float] = {}
        with evaluation(model), autocast_context(precision, next(model.parameters()).device):
            for idx in prompt_batches(sequences, 2 * batch_size, share_prompt=share_prompt):
                logps = grouped_logps(model, [sequences[i] for i in idx], pad_id=pad_id, share_prompt=share_prompt)
                summed |= zip([keys[i] for i in idx], logps.sum(dim=1).float().tolist(), strict=True)
        chosen = torch.tensor([summed[sequence_key(p.prompt_ids, p.chosen_ids)] for p in pairs])  # (B,)
        rejected = torch.tensor([summed[sequence_key(p.prompt_ids, p.rejected_ids)] for p in pairs])  # (B,)
    metrics = logp_metrics(
        chosen,
        rejected,
        chosen_lengths=torch.tensor([len(p.chosen_ids) for p in pairs]),
        rejected_lengths=torch.tensor([len(p.rejected_ids) for p in pairs]),
    )
    if model is not None:
        metrics |= implicit_reward_metrics(chosen, rejected, ref_chosen, ref_rejected, beta)
    if groups:
        logp_by_key: dict[str, float] = {}
        for p, c, r in zip(pairs, chosen.tolist(), rejected.tolist(), strict=True):
            logp_by_key[sequence_key(p.prompt_ids, p.chosen_ids)] = c
            logp_by_key[sequence_key(p.prompt_ids, p.rejected_ids)] = r
        taus = [
            tau
            for g in groups
            if (tau := kendall_tau([logp_by_key[sequence_key(g.prompt_ids, c)] for c in g.completion_ids], g.rewards))
            is not None
        ]
        metrics["kendall_tau"] = sum(taus) / len(taus) if taus else None
        metrics["groups"] = len(taus)
    return metrics


def finish_run(
    *,
    algorithm: str,
    config: Any,
    policy: torch.nn.Module,
    tokenizer: Any,
    base_model: str,
    out_dir: Path,
    metrics: dict[str, Any],
    checkpoint: RunCheckpoint,
    cancelled: bool,
    evaluate_after: Callable[[], dict[str, Any]],
    started: float,
    extra_tensors: dict[str, dict[str, torch.Tensor]] | None = None,
    ranks: Ranks | None = None,
) -> TrainResult:
    """End a run: a cancelled one writes no model directory; a finished one is scored on the
    held-out pairs and saved with its config and metrics. Either way its checkpoint goes.
    Under several processes the main one alone scores and writes, and all return once it has."""
    ranks = ranks or Ranks()
    if cancelled or not ranks.main:
        metrics["seconds"] = time.perf_counter() - started
    else:
        metrics["eval_after"] = evaluate_after()
        metrics["seconds"] = time.perf_counter() - started
        save_model_dir(
            policy,  # type: ignore[arg-type]
            tokenizer,
            out_dir,
            base_model=base_model,
            config={
                "algorithm": algorithm,
                "base_model": base_model,
                "origin_model": base_model_of(base_model),
                **asdict(config),
            },
            metrics=metrics,
            merge_lora=config.merge_lora,
            extra_tensors=extra_tensors,
        )
    checkpoint.discard()
    ranks.barrier()
    return TrainResult(out_dir=out_dir, metrics=metrics, cancelled=cancelled)
