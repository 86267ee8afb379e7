import pytest

from tests.training.synthetic import preference_pairs, split
from training.config import OnlineGRPOConfig, RewardConfig
from training.grpo_online import train_grpo_online
from training.reward import train_reward

LENGTHS = {"max_length": 64, "max_prompt_length": 48, "precision": "fp32", "save_every": 0}


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory, tiny_model_dir):
    out = tmp_path_factory.mktemp("reward") / "rm"
    train_rows, eval_rows = split(preference_pairs())
    config = RewardConfig(**LENGTHS, epochs=3, batch_size=8, learning_rate=3e-3)
    train_reward(config, train_examples=train_rows, eval_examples=eval_rows, model=str(tiny_model_dir), out_dir=out)
    return out


def test_online_grpo_raises_the_reward_of_fresh_samples_on_held_out_prompts(tmp_path, tiny_model_dir, reward_model_dir):
    train_rows, eval_rows = split(preference_pairs())
    config = OnlineGRPOConfig(
        **LENGTHS,
        reward_model=str(reward_model_dir),
        epochs=3,
        batch_size=8,
        learning_rate=3e-2,
        num_iterations=1,
        max_new_tokens=12,
        warmup_ratio=0.0,
        eval_samples=32,  # held-out prompts x 32 samples: a standard error near 0.03 against gains near 0.1
        eval_batch_size=64,
    )
    steps = []
    result = train_grpo_online(
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
    assert max(m["kl"] for m in steps) < 0.5
    assert {"reward", "kl", "response_length", "loss"} <= set(steps[-1])
    assert (tmp_path / "policy" / "adapter_model.safetensors").is_file()


def test_online_grpo_refuses_to_start_without_a_reward_model(tmp_path, tiny_model_dir):
    with pytest.raises(ValueError, match="reward_model is required: train one first"):
        train_grpo_online(
            OnlineGRPOConfig(**LENGTHS),
            train_examples=preference_pairs(),
            eval_examples=[],
            model=str(tiny_model_dir),
            out_dir=tmp_path / "policy",
        )
    assert not (tmp_path / "policy").exists()


def test_a_reward_model_with_another_tokenizer_is_refused(tmp_path, tiny_model_dir, reward_model_dir):
    import shutil

    from transformers import AutoTokenizer

    other = tmp_path / "other-rm"
    shutil.copytree(reward_model_dir, other)
    tokenizer = AutoTokenizer.from_pretrained(str(other))
    tokenizer.add_tokens(["<|extra|>"])
    tokenizer.save_pretrained(str(other))
    with pytest.raises(Exception, match="uses another tokenizer than the policy"):
        train_grpo_online(
            OnlineGRPOConfig(**LENGTHS, reward_model=str(other)),
            train_examples=preference_pairs(),
            eval_examples=[],
            model=str(tiny_model_dir),
            out_dir=tmp_path / "policy",
        )


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("num_generations", 1, "num_generations must be at least 2"),
        ("temperature", 0.0, "temperature must be positive"),
        ("top_p", 1.5, r"top_p must be in \(0, 1\]"),
        ("max_new_tokens", 0, "max_new_tokens must be at least 1"),
    ],
)
def test_values_out_of_range_name_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        OnlineGRPOConfig(**{field: value}).validate()


def test_online_grpo_shares_each_prompt_among_its_group_with_the_same_numbers(
    tmp_path, tiny_model_dir, reward_model_dir
):
    train_rows, eval_rows = split(preference_pairs())
    runs = {}
    for share in (True, False):
        config = OnlineGRPOConfig(
            **LENGTHS,
            reward_model=str(reward_model_dir),
            batch_size=4,
            max_new_tokens=8,
            min_steps=2,
            epochs=1,
            eval_samples=1,
            share_prompt=share,
        )
        steps = []
        train_grpo_online(
            config,
            train_examples=train_rows[:8],
            eval_examples=eval_rows[:4],
            model=str(tiny_model_dir),
            out_dir=tmp_path / str(share),
            progress=lambda step, total, metrics, steps=steps: steps.append(metrics),
        )
        runs[share] = steps[:2]  # one rollout batch: its two iterations
    for shared, whole in zip(runs[True], runs[False], strict=True):
        assert shared["response_length"] == whole["response_length"]  # the same samples
        for name in ("reward", "loss", "kl"):
            assert shared[name] == pytest.approx(whole[name], abs=1e-5)
    assert runs[True][1]["kl"] > 0  # the second iteration moved away from the reference


def test_rollouts_train_on_the_ids_the_policy_sampled(tiny_model_dir, reward_model_dir):
    from training.generate import SamplingConfig, generate_completions
    from training.models import load_model
    from training.rollouts import load_scorer, sample_and_score

    model, tokenizer = load_model(str(tiny_model_dir))
    scorer = load_scorer(str(reward_model_dir), tokenizer, str(tiny_model_dir), model.device)
    prompts = ["Tell me about cats.", "Explain rivers please."]
    sampling = SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=12, seed=3)
    drawn = generate_completions(
        model, tokenizer, [[{"role": "user", "content": p}] for p in prompts], k=3, sampling=sampling
    )
    samples = sample_and_score(
        model, scorer, tokenizer, prompts, k=3, sampling=sampling, batch_size=8, precision="fp32", share_prompt=True
    )
    eos = tokenizer.eos_token_id
    # The random model writes byte pieces whose text encodes to other ids: these must not be what is trained on.
    assert any(tokenizer(s.text, add_special_tokens=False)["input_ids"] != list(s.token_ids) for g in drawn for s in g)
    assert samples.completions == [[*s.token_ids, *([] if s.truncated else [eos])] for g in drawn for s in g]
    assert samples.rewards.shape == (2, 3)


def test_a_lora_policy_samples_from_a_merged_copy_and_is_left_as_it_was(tiny_model_dir, reward_model_dir):
    import torch

    from training.generate import SamplingConfig, generate_completions
    from training.models import LoraSettings, apply_lora, is_lora, load_model, reference_mode, tune_for_training
    from training.rollouts import load_scorer, sample_and_score

    model, tokenizer = load_model(str(tiny_model_dir))
    policy = apply_lora(model, LoraSettings(4, 8, 0.0))
    tune_for_training(policy, precision="fp32", bf16_frozen_base=False)
    torch.manual_seed(0)
    for name, parameter in policy.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(0, 0.5)  # adapters that change what the model writes
    state = {name: tensor.clone() for name, tensor in policy.state_dict().items()}
    scorer = load_scorer(str(reward_model_dir), tokenizer, str(tiny_model_dir), policy.device)
    prompts = ["Tell me about cats.", "Explain rivers please.", "Describe a small boat."]
    conversations = [[{"role": "user", "content": p}] for p in prompts]
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=12)
    woven = generate_completions(policy.get_base_model(), tokenizer, conversations, k=1, sampling=greedy)
    with reference_mode(policy):
        without = generate_completions(policy.get_base_model(), tokenizer, conversations, k=1, sampling=greedy)
    samples = sample_and_score(
        policy, scorer, tokenizer, prompts, k=1, sampling=greedy, batch_size=8, precision="fp32", share_prompt=True
    )
    eos = tokenizer.eos_token_id
    assert woven != without  # the adapters decide what is written, so the copy carried them
    assert samples.completions == [[*s.token_ids, *([] if s.truncated else [eos])] for g in woven for s in g]
    assert is_lora(policy) and policy.get_base_model().config._attn_implementation == "eager"
    assert all(torch.equal(tensor, state[name]) for name, tensor in policy.state_dict().items())


def test_online_grpo_runs_in_bf16_with_the_lora_base_stored_in_bf16(tmp_path, tiny_model_dir, reward_model_dir):
    # The defaults where the CPU has bf16 units: rollouts sample from a base whose frozen weights are bf16.
    train_rows, eval_rows = split(preference_pairs())
    config = OnlineGRPOConfig(
        **{**LENGTHS, "precision": "bf16"},
        reward_model=str(reward_model_dir),
        batch_size=2,
        num_iterations=1,
        max_new_tokens=6,
        eval_samples=1,
    )
    result = train_grpo_online(
        config,
        train_examples=train_rows[:2],
        eval_examples=eval_rows[:2],
        model=str(tiny_model_dir),
        out_dir=tmp_path / "policy",
    )
    assert result.metrics["precision"] == "bf16"
    assert result.metrics["steps"] == 1
    assert result.metrics["eval_after"]["reward"] is not None
