"""The shared training config: one help per field for both command lines, types named by field."""

import argparse
import math

import pytest

from training.__main__ import build_parser, config_from_args
from training.config import DPOConfig, GRPOConfig, add_config_arguments, config_from_mapping, config_options
from training.loss_types import DPO_LOSS_TYPES, GRPO_LOSS_TYPES


def test_both_algorithms_share_the_common_fields_and_their_checks():
    assert DPOConfig().max_prompt_length == 256 and GRPOConfig(max_length=100).max_prompt_length == 50
    assert DPOConfig(max_length=100, max_prompt_length=80).max_prompt_length == 80
    for config_class in (DPOConfig, GRPOConfig):
        with pytest.raises(ValueError, match="^lora_r must be at least 1$"):
            config_class(lora_r=0).validate()
        with pytest.raises(ValueError, match="^warmup_ratio must be a finite number, not nan$"):
            config_class(warmup_ratio=math.nan).validate()
        with pytest.raises(ValueError, match="^precision must be one of auto, bf16, fp32, not 'fp8'$"):
            config_class(precision="fp8").validate()


def test_config_from_mapping_names_the_field_and_stores_numbers_as_floats():
    config = config_from_mapping(GRPOConfig, {"epsilon_high": 1, "beta": 0})
    assert config.epsilon_high == 1.0 and isinstance(config.epsilon_high, float) and config.beta == 0.0
    with pytest.raises(ValueError, match="^unknown grpo setting 'label_smoothing'; known: "):
        config_from_mapping(GRPOConfig, {"label_smoothing": 0.1})
    with pytest.raises(ValueError, match="^seed is too large"):
        config_from_mapping(DPOConfig, {"seed": 2**64})
    with pytest.raises(ValueError, match="^save_every must not be negative$"):
        config_from_mapping(DPOConfig, {"save_every": -1})
    with pytest.raises(ValueError, match="^min_steps must not be negative$"):
        config_from_mapping(GRPOConfig, {"min_steps": -1})
    with pytest.raises(ValueError, match="^min_steps must be a whole number, not 1.5$"):
        config_from_mapping(DPOConfig, {"min_steps": 1.5})
    for text in ("cosine\x00", "\ud800"):
        with pytest.raises(ValueError, match="^lr_scheduler must not hold a NUL character or a lone surrogate$"):
            config_from_mapping(DPOConfig, {"lr_scheduler": text})


def test_a_field_in_both_configs_with_different_help_says_each():
    options = {o.name: o for o in config_options(DPOConfig, GRPOConfig)}
    beta = options["beta"].help
    assert beta.startswith("dpo: DPO β: strength") and "; grpo: weight of the k3 KL penalty" in beta
    assert options["epochs"].help == "passes over the training data"  # the same in both: said once
    assert options["loss_type"].choices == DPO_LOSS_TYPES + GRPO_LOSS_TYPES  # merged: each algorithm's, in order
    assert options["lora"].flags == ("--lora", "--full") and options["use_weights"].flags == (
        "--weights",
        "--no-weights",
    )


def test_options_left_out_are_none_without_defaults():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, config_options(DPOConfig), show_defaults=False)
    args = parser.parse_args(["--lr", "0.01", "--full"])
    given = {k: v for k, v in vars(args).items() if v is not None}
    assert given == {"learning_rate": 0.01, "lora": False}


def test_the_command_line_takes_each_config_field_with_its_default():
    args = build_parser().parse_args(["dpo", "--data", "d", "--model", "m", "--out", "o", "--no-weights"])
    assert config_from_args(args) == DPOConfig(use_weights=False)
    args = build_parser().parse_args(["grpo", "--data", "d", "--model", "m", "--out", "o", "--max-length", "300"])
    assert config_from_args(args) == GRPOConfig(max_length=300) and config_from_args(args).max_prompt_length == 150
