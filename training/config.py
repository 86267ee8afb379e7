"""Training configs: one dataclass per algorithm on a shared base, every field with a default and a help line.

The help of each field is its metadata, so ``python -m training`` and the app's ``train``
command both build their options from here (``add_config_arguments``) and it is written once.
``config_from_mapping`` builds a config from untyped values (JSON from a form, the API or a
command's ``--config``) and names the field of any value of the wrong type. No torch here:
the web process imports this module.
"""

from __future__ import annotations

import argparse
import math
import types
from collections.abc import Mapping, Sequence
from dataclasses import Field, dataclass, field, fields
from typing import Any, ClassVar, TypeVar, get_type_hints

from training.loss_types import DPO_LOSS_TYPES, DPO_LOSSES, DPO_SMOOTHED_LOSS_TYPES, GRPO_LOSS_TYPES

SCHEDULERS = ("cosine", "linear", "constant")
LEARNING_RATE_HELP = "peak AdamW learning rate (LoRA; use ~5e-7..5e-6 for full fine-tuning)"
MIN_STEPS_HELP = "optimizer steps at least: a small set is passed over again until it reaches them, and no further"
PRECISIONS = ("auto", "bf16", "fp32")
LARGEST_INT = 2**63 - 1  # what the database's JSON and torch's seeds hold


def option(default: Any, help: str, *, flags: tuple[str, ...] = (), choices: Sequence[str] = ()) -> Any:
    """A config field; ``flags`` overrides the command-line spelling (a flag, or for a bool the (on, off) pair)."""
    return field(default=default, metadata={"help": help, "flags": flags, "choices": tuple(choices)})


@dataclass
class TrainConfig:
    """What every algorithm's loop shares: optimisation, lengths, LoRA, precision, checkpoints."""

    # Whether its loop splits each batch over the processes of torchrun or accelerate launch (not a setting).
    data_parallel: ClassVar[bool] = False
    learning_rate: float = option(5e-5, LEARNING_RATE_HELP, flags=("--lr",))
    weight_decay: float = option(0.0, "AdamW decoupled weight decay")
    warmup_ratio: float = option(0.1, "share of steps with a linear learning-rate warmup")
    lr_scheduler: str = option(
        "cosine", "learning-rate schedule after warmup", flags=("--scheduler",), choices=SCHEDULERS
    )
    epochs: int = option(1, "passes over the training data")
    min_steps: int = option(0, MIN_STEPS_HELP)
    batch_size: int = option(4, "examples per forward pass")
    gradient_accumulation: int = option(1, "forward passes per optimizer step", flags=("--grad-accum",))
    max_grad_norm: float = option(1.0, "gradient clipping by global norm; 0 disables")
    max_length: int = option(512, "prompt + completion tokens; completions are cut to fit")
    max_prompt_length: int | None = option(
        None, "examples whose prompt alone is longer are dropped (default: half of max_length)"
    )
    lora: bool = option(
        True,
        "train LoRA adapters (the reference is the base with adapters off), or full fine-tuning",
        flags=("--lora", "--full"),
    )
    lora_r: int = option(16, "LoRA rank")
    lora_alpha: int = option(32, "LoRA scaling numerator (updates scaled by alpha / r)")
    lora_dropout: float = option(0.0, "dropout on the LoRA input")
    merge_lora: bool = option(False, "save merged full weights instead of the adapter")
    precision: str = option(
        "auto", "auto: bf16 autocast where the hardware is fast at it, else fp32", choices=PRECISIONS
    )
    eval_batch_size: int = option(8, "pairs per forward pass for the reference and evaluation")
    logprob_chunk_size: int = option(2048, "completion positions per chunk of the output projection")
    share_prompt: bool = option(True, "run each prompt once for all its completions (a shared KV cache)")
    save_every: int = option(50, "optimizer steps between resumable checkpoints; 0 disables")
    seed: int = option(0, "seed for batch order and adapter initialisation")

    def __post_init__(self) -> None:
        # The prompt's share follows the max_length the user gave, so setting only that never conflicts.
        if self.max_prompt_length is None and _is_int(self.max_length):
            self.max_prompt_length = self.max_length // 2

    def validate(self) -> None:
        """Raise ValueError naming the first field whose value is of the wrong type or makes no sense."""
        hints = get_type_hints(type(self))
        for f in fields(self):
            _check_type(f.name, getattr(self, f.name), hints[f.name])
        for name in (
            "epochs",
            "batch_size",
            "gradient_accumulation",
            "eval_batch_size",
            "lora_r",
            "logprob_chunk_size",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        for name in ("min_steps", "save_every", "seed", "weight_decay", "max_grad_norm"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        for f in fields(self):
            choices, value = f.metadata["choices"], getattr(self, f.name)
            if choices and value not in choices:
                raise ValueError(f"{f.name} must be one of {', '.join(choices)}, not {_shown(value)}")
        if self.learning_rate <= 0:
            raise ValueError("learning_rate must be positive")
        if self.lora_alpha <= 0:
            raise ValueError("lora_alpha must be positive")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError("lora_dropout must be in [0, 1)")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError("warmup_ratio must be in [0, 1)")
        assert self.max_prompt_length is not None  # set from max_length after init
        if not 0 < self.max_prompt_length < self.max_length:
            raise ValueError("max_prompt_length must be positive and smaller than max_length")
        if self.merge_lora and not self.lora:
            raise ValueError("merge_lora needs lora")


@dataclass
class DPOConfig(TrainConfig):
    data_parallel: ClassVar[bool] = True
    beta: float = option(0.1, "DPO β: strength of the implicit KL constraint; higher stays closer to the reference")
    loss_type: str = option("sigmoid", "DPO loss", choices=DPO_LOSS_TYPES)
    label_smoothing: float = option(
        0.0,
        "assumed share of flipped labels ("
        + ", ".join(f"{name}: {smoothed}" for name, smoothed in DPO_LOSSES.items() if smoothed)
        + ")",
    )
    use_weights: bool = option(
        True, "multiply each pair's loss by its `weight` (annotator agreement)", flags=("--weights", "--no-weights")
    )
    batch_size: int = option(4, "pairs per forward pass (twice as many sequences: chosen and rejected)")
    # Chosen by benchmarks/efficacy.py and defaults_sweep.py: one round of about 300 judgements moves what
    # the model writes (docs/DESIGN.md, "Training defaults").
    learning_rate: float = option(1.5e-4, LEARNING_RATE_HELP, flags=("--lr",))
    min_steps: int = option(48, MIN_STEPS_HELP)

    def validate(self) -> None:
        super().validate()
        if self.beta <= 0:
            raise ValueError("beta must be positive")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError("label_smoothing must be in [0, 0.5)")
        if self.label_smoothing and self.loss_type not in DPO_SMOOTHED_LOSS_TYPES:
            raise ValueError(f"label_smoothing has no effect with loss_type {self.loss_type!r}")


@dataclass
class GRPOConfig(TrainConfig):
    data_parallel: ClassVar[bool] = True
    beta: float = option(0.04, "weight of the k3 KL penalty to the frozen reference; 0 disables it")
    epsilon: float = option(0.2, "lower clip range of the probability ratio")
    epsilon_high: float | None = option(None, "upper clip range (DAPO clip-higher; default: same as epsilon)")
    loss_type: str = option("grpo", "how per-token losses are averaged", choices=GRPO_LOSS_TYPES)
    advantage_scale: str = option(
        "group",
        "group: divide advantages by the group's reward std; none: only centre them (Dr. GRPO)",
        choices=("group", "none"),
    )
    num_iterations: int = option(2, "optimizer steps per batch of groups (μ); more than 1 makes clipping matter")
    eval_beta: float = option(0.1, "β of the implicit reward in held-out metrics (comparable with DPO runs)")
    batch_size: int = option(2, "groups per forward pass (all K completions of each group together)")
    # Chosen by benchmarks/defaults_sweep.py, as DPO's (docs/DESIGN.md, "Training defaults").
    learning_rate: float = option(3e-4, LEARNING_RATE_HELP, flags=("--lr",))
    min_steps: int = option(48, MIN_STEPS_HELP)

    def validate(self) -> None:
        super().validate()
        if self.beta < 0:
            raise ValueError("beta must not be negative")
        if not 0 < self.epsilon < 1:
            raise ValueError("epsilon must be in (0, 1)")
        if self.epsilon_high is not None and self.epsilon_high <= 0:
            raise ValueError("epsilon_high must be positive")
        if self.num_iterations < 1:
            raise ValueError("num_iterations must be at least 1")
        if self.eval_beta <= 0:
            raise ValueError("eval_beta must be positive")


@dataclass
class RewardConfig(TrainConfig):
    batch_size: int = option(4, "pairs or ranked groups per forward pass (all their completions together)")
    learning_rate: float = option(
        1e-4, "peak AdamW learning rate of the adapters and the head (use ~1e-5 for full fine-tuning)", flags=("--lr",)
    )
    use_margin: bool = option(
        True,
        "subtract each pair's `margin` (when the data has one) inside the Bradley-Terry loss",
        flags=("--margin", "--no-margin"),
    )
    use_weights: bool = option(
        True, "multiply each pair's loss by its `weight` (annotator agreement)", flags=("--weights", "--no-weights")
    )
    center_rewards: float = option(
        0.0, "weight of a penalty on the squared mean reward, keeping scores centred on 0 (as TRL's coefficient)"
    )

    def validate(self) -> None:
        super().validate()
        if self.center_rewards < 0:
            raise ValueError("center_rewards must not be negative")


@dataclass
class OnlineGRPOConfig(GRPOConfig):
    data_parallel: ClassVar[bool] = False  # it samples at every step, in one process
    reward_model: str = option(
        "", "reward model directory (in the app: a reward version's name; empty: the project's newest)"
    )
    num_generations: int = option(4, "completions sampled per prompt at every step (the group size K)")
    temperature: float = option(1.0, "sampling temperature of the rollouts")
    top_p: float = option(1.0, "nucleus sampling of the rollouts")
    max_new_tokens: int = option(64, "longest rollout completion in tokens")
    eval_samples: int = option(2, "completions sampled per held-out prompt to measure the mean reward")
    batch_size: int = option(2, "prompts per rollout batch (each with num_generations completions)")
    # Offline GRPO's learning rate, inherited: at the shared 5e-5 an online run barely left the starting model
    # (benchmarks/RESULTS.md, "Online GRPO's learning rate"). Not its min_steps, measured on judged groups.
    min_steps: int = option(0, MIN_STEPS_HELP)

    def validate(self) -> None:
        super().validate()
        if self.num_generations < 2:
            raise ValueError("num_generations must be at least 2 (advantages compare completions of one prompt)")
        if self.temperature <= 0:
            raise ValueError("temperature must be positive")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        for name in ("max_new_tokens", "eval_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")


@dataclass
class PPOConfig(TrainConfig):
    reward_model: str = option(
        "", "reward model directory (in the app: a reward version's name; empty: the project's newest)"
    )
    batch_size: int = option(8, "prompts per rollout batch, one completion each")
    ppo_epochs: int = option(4, "optimizer steps on each rollout batch (epochs stays passes over the prompts)")
    kl_coef: float = option(0.05, "weight of the per-token KL penalty to the reference inside the reward")
    gamma: float = option(1.0, "discount of later rewards in GAE")
    lam: float = option(0.95, "GAE's λ: 1 is Monte Carlo returns, 0 one-step TD")
    cliprange: float = option(0.2, "clip range of the policy's probability ratio")
    cliprange_value: float = option(0.2, "clip range of the value head's change from the rollout's values")
    vf_coef: float = option(0.1, "weight of the value loss beside the policy loss")
    whiten_rewards: bool = option(
        True,
        "whiten the per-token rewards over the batch (mean kept)",
        flags=("--whiten-rewards", "--no-whiten-rewards"),
    )
    temperature: float = option(1.0, "sampling temperature of the rollouts")
    top_p: float = option(1.0, "nucleus sampling of the rollouts")
    max_new_tokens: int = option(64, "longest rollout completion in tokens")
    eval_samples: int = option(2, "completions sampled per held-out prompt to measure the mean reward")

    def validate(self) -> None:
        super().validate()
        for name in ("ppo_epochs", "max_new_tokens", "eval_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.kl_coef < 0:
            raise ValueError("kl_coef must not be negative")
        for name in ("gamma", "lam"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1]")
        for name in ("cliprange", "cliprange_value"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.vf_coef < 0:
            raise ValueError("vf_coef must not be negative")
        if self.temperature <= 0:
            raise ValueError("temperature must be positive")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")


Config = TypeVar("Config", bound=TrainConfig)


def config_from_mapping(config_class: type[Config], values: Mapping[str, Any]) -> Config:
    """A validated config from untyped values; ValueError names an unknown setting or the field of a bad value.

    A whole number is taken where a float goes (people write 1 for 1.0) and stored as a float.
    """
    known = {f.name for f in fields(config_class)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(
            f"unknown {_algorithm(config_class)} setting '{unknown[0]}'; known: {', '.join(sorted(known))}"
        )
    hints = get_type_hints(config_class)
    typed: dict[str, Any] = {}
    for name, value in values.items():
        _check_type(name, value, hints[name])
        typed[name] = float(value) if _base_type(hints[name]) is float and value is not None else value
    config = config_class(**typed)
    config.validate()
    return config


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _base_type(hint: Any) -> type:
    """``int`` for ``int | None``; the hint itself otherwise."""
    if isinstance(hint, types.UnionType):
        return next(t for t in hint.__args__ if t is not type(None))
    return hint


def _check_type(name: str, value: Any, hint: Any) -> None:
    if value is None and isinstance(hint, types.UnionType) and type(None) in hint.__args__:
        return
    kind = _base_type(hint)
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, not {_shown(value)}")
    elif kind is int:
        if not _is_int(value):
            raise ValueError(f"{name} must be a whole number, not {_shown(value)}")
        if abs(value) > LARGEST_INT:
            raise ValueError(f"{name} is too large (at most {LARGEST_INT})")
    elif kind is float:
        if not (_is_int(value) or isinstance(value, float)):
            raise ValueError(f"{name} must be a number, not {_shown(value)}")
        if (_is_int(value) and abs(value) > LARGEST_INT) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, not {_shown(value)}")
    elif kind is str:
        if not isinstance(value, str):
            raise ValueError(f"{name} must be a string, not {_shown(value)}")
        if "\x00" in value or not _encodes(value):  # configs are stored as JSON, which PostgreSQL keeps as UTF-8
            raise ValueError(f"{name} must not hold a NUL character or a lone surrogate")


def _encodes(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:  # a lone surrogate
        return False
    return True


def _shown(value: Any) -> str:
    if _is_int(value) and abs(value) > LARGEST_INT:
        return "a number that large"  # and repr() refuses ints of over 4,300 digits
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass(frozen=True)
class ConfigOption:
    """One config field as a command-line option, merged over the algorithms that have it."""

    name: str
    kind: type
    help: str
    flags: tuple[str, ...]  # a bool has two: the one that sets it, the one that clears it
    choices: tuple[str, ...]
    default: Any


def config_options(*config_classes: type[TrainConfig]) -> list[ConfigOption]:
    """The options of the given config classes; a field whose help differs says each algorithm's."""
    merged: dict[str, list[tuple[type[TrainConfig], Field[Any]]]] = {}
    for config_class in config_classes:
        for f in fields(config_class):
            merged.setdefault(f.name, []).append((config_class, f))
    options = []
    for name, owners in merged.items():
        hint = get_type_hints(owners[0][0])[name]
        kind = _base_type(hint)
        helps = list(dict.fromkeys(f.metadata["help"] for _, f in owners))
        if len(helps) > 1:
            helps = [f"{_algorithm(c)}: {f.metadata['help']}" for c, f in owners]
        first = owners[0][1]
        flag = "--" + name.replace("_", "-")
        default_flags = (flag, "--no-" + name.replace("_", "-")) if kind is bool else (flag,)
        choices = tuple(dict.fromkeys(c for _, f in owners for c in f.metadata["choices"]))
        options.append(
            ConfigOption(
                name=name,
                kind=kind,
                help="; ".join(helps),
                flags=first.metadata["flags"] or default_flags,
                choices=choices,
                default=first.default,
            )
        )
    return options


def _algorithm(config_class: type[TrainConfig]) -> str:
    return config_class.__name__.removesuffix("Config").lower()


def add_config_arguments(parser: argparse.ArgumentParser, options: list[ConfigOption], *, show_defaults: bool) -> None:
    """Add each option to ``parser`` (dest: the field name). Without ``show_defaults`` an option left out is None,
    so the caller can tell what was given."""
    for o in options:
        default = o.default if show_defaults else None
        if o.kind is bool:
            on, off = o.flags
            group = parser.add_mutually_exclusive_group()
            suffix = f" (default: {on if o.default else off})" if show_defaults else ""
            group.add_argument(on, dest=o.name, action="store_true", default=default, help=o.help + suffix)
            group.add_argument(off, dest=o.name, action="store_false", default=default, help=f"the opposite of {on}")
            continue
        suffix = f" (default: {o.default})" if show_defaults and o.default is not None else ""
        parser.add_argument(
            *o.flags, dest=o.name, type=o.kind, choices=o.choices or None, default=default, help=o.help + suffix
        )


def config_arguments(config: TrainConfig) -> list[str]:
    """The command-line options that give ``config`` back to ``python -m training`` (a None leaves its default)."""
    arguments = []
    for o in config_options(type(config)):
        value = getattr(config, o.name)
        if o.kind is bool:
            arguments.append(o.flags[0] if value else o.flags[1])
        elif value is not None:
            arguments += [o.flags[0], str(value)]
    return arguments
