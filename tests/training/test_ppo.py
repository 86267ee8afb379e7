import json
import shutil

import pytest
import torch

from tests.training.synthetic import preference_pairs, split
from training.__main__ import main
from training.config import PPOConfig, RewardConfig
from training.ppo import train_ppo
from training.reward import train_reward

LENGTHS = {"max_length": 64, "max_prompt_length": 48, "precision": "fp32", "save_every": 0}


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory, tiny_model_dir):
    out = tmp_path_factory.mktemp("reward") / "rm"
    train_rows, eval_rows = split(preference_pairs())
    config = RewardConfig(**LENGTHS, epochs=3, batch_size=8, learning_rate=3e-3)
    train_reward(config, train_examples=train_rows, eval_examples=eval_rows, model=str(tiny_model_dir), out_dir=out)
    return out


def test_ppo_raises_the_reward_of_fresh_samples_on_held_out_prompts(tmp_path, tiny_model_dir, reward_model_dir):
    train_rows, eval_rows = split(preference_pairs())
    config = PPOConfig(
        **LENGTHS,
        reward_model=str(reward_model_dir),
        epochs=8,  # one sample a prompt per pass: PPO needs more passes than GRPO's four a prompt to learn as much
        batch_size=8,
        learning_rate=3e-2,
        max_new_tokens=12,
        warmup_ratio=0.0,
        eval_samples=32,  # held-out prompts x 32 samples: a standard error near 0.03 against gains near 0.1
        eval_batch_size=64,
    )
    steps = []
    result = train_ppo(
        config,
        train_examples=train_rows,
        eval_examples=eval_rows,
        model=str(tiny_model_dir),
        out_dir=tmp_path / "policy",
        progress=lambda step, total, metrics: steps.append(metrics),
    )
    before, after = result.metrics["eval_before"], result.metrics["eval_after"]
    assert before["prompts"] == after["prompts"] == 22
    noise = (before["reward_stderr"] ** 2 + after["reward_stderr"] ** 2) ** 0.5
    assert after["reward"] - before["reward"] > 2 * noise  # the gain, not sampling luck: twice its standard error
    assert all(0 <= m["kl"] < 2.0 for m in steps)
    assert result.metrics["steps"] == len(steps) == 8 * 9 * 4  # epochs × rollout batches × ppo_epochs
    assert {"reward", "kl", "value_loss", "policy_loss", "response_length"} <= set(steps[-1])
    assert (tmp_path / "policy" / "adapter_model.safetensors").is_file()


def test_ppo_refuses_to_start_without_a_reward_model(tmp_path, tiny_model_dir):
    with pytest.raises(ValueError, match="reward_model is required: train one first"):
        train_ppo(
            PPOConfig(**LENGTHS),
            train_examples=preference_pairs(),
            eval_examples=[],
            model=str(tiny_model_dir),
            out_dir=tmp_path / "policy",
        )


def test_ppo_with_no_prompts_is_a_clear_error(tmp_path, tiny_model_dir, reward_model_dir):
    with pytest.raises(ValueError, match="no training prompts: the examples hold no 'prompt'"):
        train_ppo(
            PPOConfig(**LENGTHS, reward_model=str(reward_model_dir)),
            train_examples=[{"text": "no prompt here"}],
            eval_examples=[],
            model=str(tiny_model_dir),
            out_dir=tmp_path / "policy",
        )
    assert not (tmp_path / "policy").exists()


def reward_model_of_another_base(reward_model_dir, tiny_model_dir, folder):
    """The reward model as if trained on a copy of the tiny model: the same tokenizer, another base model."""
    other_base, reward = folder / "other-base", folder / "other-rm"
    shutil.copytree(tiny_model_dir, other_base)
    shutil.copytree(reward_model_dir, reward)
    config = json.loads((reward / "training_config.json").read_text())
    config.update(base_model=str(other_base), origin_model=str(other_base))
    (reward / "training_config.json").write_text(json.dumps(config))
    return other_base, reward


def test_a_saved_reward_model_records_its_base_model(reward_model_dir, tiny_model_dir):
    config = json.loads((reward_model_dir / "training_config.json").read_text())
    assert config["origin_model"] == str(tiny_model_dir.resolve())


def test_a_reward_model_of_another_base_is_refused_naming_both(tmp_path, tiny_model_dir, reward_model_dir, capsys):
    other_base, reward = reward_model_of_another_base(reward_model_dir, tiny_model_dir, tmp_path)
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in preference_pairs()))
    for algorithm in ("ppo", "grpo_online"):
        args = ["--data", str(data), "--reward-model", str(reward), "--model", str(tiny_model_dir)]
        code = main([algorithm, *args, "--out", str(tmp_path / algorithm), "--max-new-tokens", "4", "--quiet"])
        error = capsys.readouterr().err
        assert code == 1
        assert f"was trained on base model {other_base.resolve()}" in error
        assert f"the policy {tiny_model_dir} is of base model {tiny_model_dir.resolve()}" in error
        assert not (tmp_path / algorithm).exists()


def test_the_command_line_says_what_an_online_run_trained_on_and_how_its_held_out_rewards_moved(
    tmp_path, tiny_model_dir, reward_model_dir, capsys
):
    train, held_out = tmp_path / "train.jsonl", tmp_path / "held_out.jsonl"
    train_rows, eval_rows = split(preference_pairs())
    train.write_text("".join(json.dumps(row) + "\n" for row in train_rows[:6]))
    held_out.write_text("".join(json.dumps(row) + "\n" for row in eval_rows[:3]))
    for algorithm in ("ppo", "grpo_online"):
        args = ["--prompts", str(train), "--eval-data", str(held_out), "--reward-model", str(reward_model_dir)]
        args += ["--model", str(tiny_model_dir), "--max-new-tokens", "4", "--precision", "fp32", "--quiet"]
        assert main([algorithm, *args, "--out", str(tmp_path / algorithm)]) == 0
        text = capsys.readouterr().out
        metrics = json.loads((tmp_path / algorithm / "metrics.json").read_text())
        before, after = metrics["eval_before"], metrics["eval_after"]
        assert "trained on 6 prompts; dropped 0 with a too-long prompt" in text
        assert (
            f"held-out prompts (3), the reward model's mean score of fresh samples: {before['reward']:.3f} -> "
            f"{after['reward']:.3f}; their length {before['response_length']:.1f} -> "
            f"{after['response_length']:.1f} tokens"
        ) in text


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("ppo_epochs", 0, "ppo_epochs must be at least 1"),
        ("kl_coef", -0.1, "kl_coef must not be negative"),
        ("lam", 1.5, r"lam must be in \[0, 1\]"),
        ("gamma", -0.1, r"gamma must be in \[0, 1\]"),
        ("cliprange", 0.0, "cliprange must be positive"),
        ("cliprange_value", -1.0, "cliprange_value must be positive"),
        ("vf_coef", -1.0, "vf_coef must not be negative"),
    ],
)
def test_values_out_of_range_name_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        PPOConfig(**{field: value}).validate()


def test_ppo_runs_in_bf16_with_the_lora_base_stored_in_bf16(tmp_path, tiny_model_dir, reward_model_dir):
    # The defaults where the CPU has bf16 units: rollouts sample from a base whose frozen weights are bf16.
    train_rows, eval_rows = split(preference_pairs())
    config = PPOConfig(
        **{**LENGTHS, "precision": "bf16"},
        reward_model=str(reward_model_dir),
        batch_size=8,
        ppo_epochs=1,
        max_new_tokens=6,
        eval_samples=1,
    )
    result = train_ppo(
        config,
        train_examples=train_rows[:8],
        eval_examples=eval_rows[:2],
        model=str(tiny_model_dir),
        out_dir=tmp_path / "policy",
    )
    assert result.metrics["precision"] == "bf16"
    assert result.metrics["steps"] == 1
    assert result.metrics["eval_after"]["reward"] is not None


def test_a_rollout_runs_no_pass_of_the_policy_beyond_sampling(tmp_path, tiny_model_dir, reward_model_dir, monkeypatch):
    # The old log-probs and values are the batch's first update pass: one pass of the actor per PPO epoch.
    from training import ppo

    passes = []
    forward = ppo.PolicyWithValueHead.forward

    def counted(self, batch, chunk_size):
        passes.append(torch.is_grad_enabled())
        return forward(self, batch, chunk_size)

    monkeypatch.setattr(ppo.PolicyWithValueHead, "forward", counted)
    train_rows, _ = split(preference_pairs())
    steps = []
    result = train_ppo(
        PPOConfig(
            **LENGTHS,
            reward_model=str(reward_model_dir),
            batch_size=8,
            ppo_epochs=2,
            max_new_tokens=8,
            learning_rate=3e-2,
        ),
        train_examples=train_rows[:16],
        eval_examples=[],
        model=str(tiny_model_dir),
        out_dir=tmp_path / "policy",
        progress=lambda step, total, metrics: steps.append(metrics),
    )
    assert result.metrics["steps"] == 4  # two rollout batches of two epochs
    assert passes == [True, True, True, True]
    # Each batch's first epoch has its ratios exactly 1, the second batch's too, after the policy moved.
    assert [m["clip_fraction"] == 0.0 for m in steps] == [True, False, True, False]
    assert steps[2]["kl"] == steps[3]["kl"] > 0  # the KL to the reference of the policy that sampled the batch


def test_a_fully_fine_tuned_policy_samples_with_sdpa_and_trains_with_eager_attention(
    tiny_model_dir, reward_model_dir, monkeypatch
):
    from training import rollouts
    from training.generate import SamplingConfig
    from training.models import load_model, tune_for_training

    policy, tokenizer = load_model(str(tiny_model_dir))
    tune_for_training(policy, precision="fp32", bf16_frozen_base=False)
    scorer = rollouts.load_scorer(str(reward_model_dir), tokenizer, str(tiny_model_dir), policy.device)
    seen = []
    generate = rollouts.generate_completions

    def recorded(model, *args, **kwargs):
        seen.append((model is policy, model.config._attn_implementation))
        return generate(model, *args, **kwargs)

    monkeypatch.setattr(rollouts, "generate_completions", recorded)
    sampling = SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=4, seed=0)
    samples = rollouts.sample_and_score(
        policy,
        scorer,
        tokenizer,
        ["Tell me about cats."],
        k=2,
        sampling=sampling,
        batch_size=8,
        precision="fp32",
        share_prompt=True,
    )
    assert seen == [(True, "sdpa")]
    assert policy.config._attn_implementation == "eager"
    assert samples.rewards.shape == (1, 2)
