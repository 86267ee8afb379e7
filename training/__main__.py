"""Command line: ``python -m training dpo|grpo|reward --data FILE --model PATH --out DIR [options]``, and
``python -m training grpo_online|ppo --prompts FILE --reward-model DIR --model PATH --out DIR [options]``.

``--prompts`` (``--data`` is the same option) is any file of rows with a ``prompt``: a prompts file or an export;
only the distinct prompts are read.
dpo and grpo also run data-parallel under ``torchrun --nproc-per-node N -m training ...`` or
``accelerate launch --num_processes N -m training ...`` (see ``training.parallel``); the main
process alone shows progress, writes files and prints the summary.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from training.config import (
    DPOConfig,
    GRPOConfig,
    OnlineGRPOConfig,
    PPOConfig,
    RewardConfig,
    TrainConfig,
    add_config_arguments,
    config_options,
)
from training.data import DataFormatError, read_records, split_by_prompt
from training.dpo import train_dpo
from training.grpo import train_grpo
from training.grpo_online import train_grpo_online
from training.models import ModelLoadError
from training.parallel import join_processes, leave_processes
from training.ppo import train_ppo
from training.reward import train_reward

if TYPE_CHECKING:
    from training.runs import TrainResult

ALGORITHMS: dict[str, tuple[type[TrainConfig], Callable[..., TrainResult], str]] = {
    "dpo": (DPOConfig, train_dpo, "DPO on preference pairs (the `dpo` export)"),
    "grpo": (GRPOConfig, train_grpo, "offline GRPO on ranked groups (the `grpo` export)"),
    "reward": (RewardConfig, train_reward, "a reward model on pairs (the `dpo` export) or ranked groups (`grpo`)"),
    "grpo_online": (
        OnlineGRPOConfig,
        train_grpo_online,
        "online GRPO: samples from the policy scored by --reward-model, on any rows with a `prompt`",
    ),
    "ppo": (PPOConfig, train_ppo, "PPO against --reward-model with a value head and GAE, on any rows with a `prompt`"),
}
# The loops that split their batches over the processes of torchrun or accelerate launch.
DATA_PARALLEL = tuple(name for name, (config_class, _, _) in ALGORITHMS.items() if config_class.data_parallel)
# The loops that sample from the policy on prompts and score with a reward model.
ONLINE = ("grpo_online", "ppo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training",
        description="Train a causal language model on human preferences with DPO or GRPO, or a reward model.",
    )
    sub = parser.add_subparsers(dest="algorithm", required=True, metavar="|".join(ALGORITHMS))
    for name, (config_class, _, summary) in ALGORITHMS.items():
        p = sub.add_parser(name, help=summary, description=summary)
        if name in ONLINE:  # they read only the rows' prompts; --data is the same option under its older name
            p.add_argument(
                "--prompts",
                "--data",
                dest="data",
                metavar="FILE",
                type=Path,
                required=True,
                help="training prompts: rows with a `prompt` (a prompts file or any export), .jsonl or .parquet",
            )
        else:
            p.add_argument("--data", type=Path, required=True, help="training examples, .jsonl or .parquet")
        p.add_argument("--model", required=True, help="base model: a Hugging Face model directory or hub id")
        p.add_argument("--out", type=Path, required=True, help="directory to write the trained model to")
        p.add_argument("--eval-data", type=Path, help="held-out examples (default: split off --eval-fraction)")
        p.add_argument(
            "--eval-fraction",
            type=float,
            default=None,
            help="share of prompts held out for evaluation when --eval-data is not given (default 0.1)",
        )
        p.add_argument("--cache-dir", type=Path, help="directory for cached reference log-probs")
        p.add_argument("--no-resume", action="store_true", help="start over even if a checkpoint of this run exists")
        p.add_argument(
            "--progress-log",
            type=Path,
            help="append each step's figures to this file as JSON lines (step, total, metrics) for a program",
        )
        p.add_argument(
            "--stop-file",
            type=Path,
            help="stop before the next step once this file exists, writing no model (as a cancelled run)",
        )
        add_config_arguments(p, config_options(config_class), show_defaults=True)
        p.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    config_class = ALGORITHMS[args.algorithm][0]
    return config_class(**{f.name: getattr(args, f.name) for f in fields(config_class)})


def main(argv: list[str] | None = None) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-file loading bars would bury the training progress bar
    parser = build_parser()
    args = parser.parse_args(argv)
    config = config_from_args(args)
    try:
        config.validate()
    except ValueError as exc:
        parser.error(str(exc))
    if args.eval_data is not None and args.eval_fraction is not None:
        parser.error("--eval-data and --eval-fraction cannot be used together")
    eval_fraction = 0.1 if args.eval_fraction is None else args.eval_fraction
    if not 0 <= eval_fraction < 1:
        parser.error("--eval-fraction must be in [0, 1)")

    try:
        records = read_records(args.data)
        if args.eval_data is not None:
            train_records, eval_records = records, read_records(args.eval_data)
        else:
            train_records, eval_records = split_by_prompt(records, eval_fraction, seed=config.seed)
    except DataFormatError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    ranks = join_processes()
    if ranks.parallel and args.algorithm not in DATA_PARALLEL:
        parser.error(f"{args.algorithm} runs in one process; only {' and '.join(DATA_PARALLEL)} run in several")
    bar = None
    if not args.quiet and ranks.main:
        from tqdm import tqdm

        bar = tqdm(total=0, unit="step", desc=args.algorithm)

    def progress(step: int, total: int, metrics: dict[str, float]) -> None:
        if args.progress_log is not None:
            with args.progress_log.open("a") as log:
                log.write(json.dumps({"step": step, "total": total, "metrics": metrics}) + "\n")
        if bar is None:
            return
        bar.total = total
        bar.n = step
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_second']:.0f}", refresh=False)
        bar.refresh()

    train = ALGORITHMS[args.algorithm][1]
    try:
        result = train(
            config,
            train_examples=train_records,
            eval_examples=eval_records,
            model=args.model,
            out_dir=args.out,
            cache_dir=args.cache_dir,
            progress=progress,
            should_stop=None if args.stop_file is None else args.stop_file.exists,
            resume=not args.no_resume,
        )
    except (DataFormatError, ModelLoadError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        if bar is not None:
            bar.close()
        leave_processes()

    if ranks.main:
        if result.cancelled:
            print(f"stopped: {args.stop_file} appeared; no model written")
        else:
            print(summary(result.metrics, result.out_dir))
    return 0


def summary(metrics: dict[str, Any], out_dir: Path) -> str:
    before, after = metrics["eval_before"], metrics.get("eval_after", {})
    kind = next(k for k in ("pairs", "groups", "prompts") if f"train_{k}" in metrics)
    examples = metrics[f"train_{kind}"]
    lines = [
        f"steps: {metrics['steps']}  time: {metrics['seconds']:.1f}s  "
        f"({metrics['tokens_per_second']:.0f} tokens/s training, precision {metrics['precision']})",
        f"trained on {examples} {kind}; dropped {metrics['dropped_long_prompt']} with a too-long prompt"
        + (f", {metrics['dropped_equal_rewards']} with equal rewards" if "dropped_equal_rewards" in metrics else ""),
    ]
    if "reference_computed" in metrics:  # the reward model has no reference
        lines.append(
            f"reference log-probs: {metrics['reference_computed']} computed, {metrics['reference_cached']} from cache"
        )
    if before.get("pairs") and "logp_accuracy" in after:
        lines.append(
            f"held-out accuracy ({before['pairs']} pairs), parent -> trained, chosen answer more likely: "
            f"{_figure(before['logp_accuracy'])} -> {_figure(after['logp_accuracy'])}; "
            f"per token {_figure(before['logp_accuracy_per_token'])} -> {_figure(after['logp_accuracy_per_token'])}; "
            f"log-prob margin {_figure(before.get('logp_margin'))} -> {_figure(after.get('logp_margin'))}"
        )
        if "kendall_tau" in after:
            lines.append(
                f"Kendall tau with the human ranks ({after['groups']} groups): "
                f"{_figure(before.get('kendall_tau'))} -> {_figure(after['kendall_tau'])}"
            )
        lines.append(f"implicit-reward accuracy {_figure(after['accuracy'])}, margin {_figure(after['margin'])}")
    elif before.get("pairs"):  # the reward model's own accuracy and margin
        lines.append(
            f"held-out accuracy ({before['pairs']} pairs): {before['accuracy']:.3f} -> {after['accuracy']:.3f}; "
            f"margin {before['margin']:.4f} -> {after['margin']:.4f}"
        )
    elif before.get("prompts"):  # an online run: the reward model's score of fresh samples
        lines.append(
            f"held-out prompts ({before['prompts']}), the reward model's mean score of fresh samples: "
            f"{before['reward']:.3f} -> {after['reward']:.3f}; their length "
            f"{before['response_length']:.1f} -> {after['response_length']:.1f} tokens"
        )
    else:
        lines.append(f"held-out figures: no held-out {'prompts' if kind == 'prompts' else 'pairs'}")
    lines.append(f"model written to {out_dir}")
    return "\n".join(lines)


def _figure(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


if __name__ == "__main__":
    sys.exit(main())
