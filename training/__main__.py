"""Command line: ``python -m training dpo|grpo --data FILE --model PATH --out DIR [options]``."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

from training.data import DataFormatError, read_records, split_by_prompt
from training.dpo import DPOConfig, train_dpo
from training.grpo import GRPOConfig, train_grpo
from training.losses import DPO_LOSS_TYPES, GRPO_LOSS_TYPES
from training.models import ModelLoadError

# (flag, config field, type, help) shared by both algorithms.
COMMON_OPTIONS: list[tuple[str, str, type, str]] = [
    ("--epochs", "epochs", int, "passes over the training data"),
    ("--lr", "learning_rate", float, "peak AdamW learning rate"),
    ("--weight-decay", "weight_decay", float, "AdamW decoupled weight decay"),
    ("--warmup-ratio", "warmup_ratio", float, "share of steps with a linear learning-rate warmup"),
    ("--batch-size", "batch_size", int, "examples per forward pass (DPO: pairs, GRPO: groups)"),
    ("--grad-accum", "gradient_accumulation", int, "forward passes per optimizer step"),
    ("--max-grad-norm", "max_grad_norm", float, "gradient clipping by global norm; 0 disables"),
    ("--max-length", "max_length", int, "prompt + completion tokens; completions are cut to fit"),
    ("--max-prompt-length", "max_prompt_length", int, "examples whose prompt alone is longer are dropped"),
    ("--lora-r", "lora_r", int, "LoRA rank"),
    ("--lora-alpha", "lora_alpha", int, "LoRA scaling numerator (updates scaled by alpha / r)"),
    ("--lora-dropout", "lora_dropout", float, "dropout on the LoRA input"),
    ("--eval-batch-size", "eval_batch_size", int, "pairs per forward pass for the reference and evaluation"),
    ("--save-every", "save_every", int, "optimizer steps between resumable checkpoints; 0 disables"),
    ("--seed", "seed", int, "seed for batch order and adapter initialisation"),
]
DPO_OPTIONS: list[tuple[str, str, type, str]] = [
    ("--beta", "beta", float, "DPO β: strength of the implicit KL constraint to the reference"),
    ("--label-smoothing", "label_smoothing", float, "assumed share of flipped labels (sigmoid and robust losses)"),
]
GRPO_OPTIONS: list[tuple[str, str, type, str]] = [
    ("--beta", "beta", float, "weight of the KL penalty to the reference; 0 disables it"),
    ("--epsilon", "epsilon", float, "lower clip range of the probability ratio"),
    ("--epsilon-high", "epsilon_high", float, "upper clip range (default: same as --epsilon)"),
    ("--num-iterations", "num_iterations", int, "optimizer steps per batch of groups (μ)"),
    ("--eval-beta", "eval_beta", float, "β of the implicit reward in held-out metrics"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training",
        description="Train a causal language model on human preferences with DPO or GRPO.",
    )
    sub = parser.add_subparsers(dest="algorithm", required=True, metavar="dpo|grpo")
    for name, config_cls, options, loss_types, summary in (
        ("dpo", DPOConfig, DPO_OPTIONS, DPO_LOSS_TYPES, "DPO on preference pairs (the `dpo` export)"),
        ("grpo", GRPOConfig, GRPO_OPTIONS, GRPO_LOSS_TYPES, "offline GRPO on ranked groups (the `grpo` export)"),
    ):
        defaults = config_cls()
        p = sub.add_parser(name, help=summary, description=summary)
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
        mode = p.add_mutually_exclusive_group()
        mode.add_argument(
            "--lora", dest="lora", action="store_true", default=True, help="train LoRA adapters (default)"
        )
        mode.add_argument("--full", dest="lora", action="store_false", help="full fine-tuning")
        p.add_argument("--merge-lora", action="store_true", help="save merged full weights instead of the adapter")
        p.add_argument(
            "--loss-type", choices=loss_types, default=defaults.loss_type, help="loss (default: %(default)s)"
        )
        p.add_argument(
            "--scheduler",
            dest="lr_scheduler",
            choices=("cosine", "linear", "constant"),
            default=defaults.lr_scheduler,
            help="learning-rate schedule after warmup (default: %(default)s)",
        )
        p.add_argument(
            "--precision",
            choices=("auto", "bf16", "fp32"),
            default=defaults.precision,
            help="auto: bf16 autocast where the hardware is fast at it, else fp32 (default: %(default)s)",
        )
        if isinstance(defaults, DPOConfig):
            p.add_argument(
                "--no-weights", dest="use_weights", action="store_false", help="ignore the pairs' `weight` field"
            )
        else:
            p.add_argument(
                "--advantage-scale",
                choices=("group", "none"),
                default=defaults.advantage_scale,
                help="divide advantages by the group's reward std (group) or only centre them (default: %(default)s)",
            )
        for flag, field_name, type_, help_text in COMMON_OPTIONS + options:
            default = getattr(defaults, field_name)
            p.add_argument(flag, dest=field_name, type=type_, default=default, help=f"{help_text} (default: {default})")
        p.add_argument(
            "--no-share-prompt",
            dest="share_prompt",
            action="store_false",
            help="run prompt + completion as whole sequences instead of sharing one prompt pass per example",
        )
        p.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def config_from_args(args: argparse.Namespace) -> DPOConfig | GRPOConfig:
    config_cls = DPOConfig if args.algorithm == "dpo" else GRPOConfig
    values: dict[str, Any] = {f.name: getattr(args, f.name) for f in fields(config_cls) if hasattr(args, f.name)}
    values["lora"] = args.lora
    values["merge_lora"] = args.merge_lora
    return config_cls(**values)


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

    bar = None
    if not args.quiet:
        from tqdm import tqdm

        bar = tqdm(total=0, unit="step", desc=args.algorithm)

    def progress(step: int, total: int, metrics: dict[str, float]) -> None:
        if bar is None:
            return
        bar.total = total
        bar.n = step
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_second']:.0f}", refresh=False)
        bar.refresh()

    train = train_dpo if args.algorithm == "dpo" else train_grpo
    try:
        result = train(
            config,  # type: ignore[arg-type]
            train_examples=train_records,
            eval_examples=eval_records,
            model=args.model,
            out_dir=args.out,
            cache_dir=args.cache_dir,
            progress=progress,
            resume=not args.no_resume,
        )
    except (DataFormatError, ModelLoadError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        if bar is not None:
            bar.close()

    print(summary(result.metrics, result.out_dir))
    return 0


def summary(metrics: dict[str, Any], out_dir: Path) -> str:
    before, after = metrics["eval_before"], metrics.get("eval_after", {})
    examples = metrics.get("train_pairs", metrics.get("train_groups"))
    kind = "pairs" if "train_pairs" in metrics else "groups"
    lines = [
        f"steps: {metrics['steps']}  time: {metrics['seconds']:.1f}s  "
        f"({metrics['tokens_per_second']:.0f} tokens/s training, precision {metrics['precision']})",
        f"trained on {examples} {kind}; dropped {metrics['dropped_long_prompt']} with a too-long prompt"
        + (f", {metrics['dropped_equal_rewards']} with equal rewards" if "dropped_equal_rewards" in metrics else ""),
        f"reference log-probs: {metrics['reference_computed']} computed, {metrics['reference_cached']} from cache",
    ]
    if before.get("pairs"):
        lines.append(
            f"held-out accuracy ({before['pairs']} pairs): {before['accuracy']:.3f} -> {after['accuracy']:.3f}; "
            f"margin {before['margin']:.4f} -> {after['margin']:.4f}"
        )
    else:
        lines.append("held-out accuracy: no held-out pairs")
    lines.append(f"model written to {out_dir}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
