import pytest

from tests.training.synthetic import preference_pairs, split
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
