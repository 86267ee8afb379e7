import pytest

from tests.training.synthetic import less_likely_groups, ranked_groups, split
from training.grpo import GRPOConfig, train_grpo


def tiny_config(**overrides) -> GRPOConfig:
    values = {
        "learning_rate": 1e-3,
        "min_steps": 0,
        "batch_size": 4,
        "warmup_ratio": 0.0,
        "max_length": 64,
        "max_prompt_length": 48,
        "lora_r": 8,
        "lora_alpha": 16,
        "precision": "fp32",
    }
    return GRPOConfig(**{**values, **overrides})


def test_grpo_makes_the_better_answer_the_more_likely_one(tmp_path, tiny_model_dir):
    # As in DPO: the parent's figures before, the trained policy's after; the implicit reward after only.
    train, held = split(less_likely_groups())
    kwargs = {"train_examples": train, "eval_examples": held, "model": str(tiny_model_dir)}
    result = train_grpo(tiny_config(learning_rate=1e-2, save_every=0), out_dir=tmp_path / "g1", **kwargs)
    before, after = result.metrics["eval_before"], result.metrics["eval_after"]
    assert before["pairs"] == after["pairs"] == len(held)
    assert before["logp_accuracy"] <= 0.25
    assert after["logp_accuracy"] >= 0.9
    # Kendall's tau between the model's log-probs and the human rewards, one per held-out group.
    assert before["groups"] == after["groups"] == len(held)
    assert before["kendall_tau"] < 0 < after["kendall_tau"]
    assert "accuracy" not in before and "accuracy" in after


def test_grpo_learns_a_human_ranking_on_held_out_prompts(tmp_path, tiny_model_dir):
    train, held = split(ranked_groups())
    seen = []
    result = train_grpo(
        tiny_config(),
        train_examples=train,
        eval_examples=held,
        model=str(tiny_model_dir),
        out_dir=tmp_path / "g1",
        progress=lambda step, total, m: seen.append(m),
    )
    m = result.metrics
    assert m["eval_after"]["accuracy"] >= 0.9
    assert m["eval_after"]["margin"] > 0
    # Each held-out group of 3 with rewards (0, 1, 0.75) gives 3 ordered pairs.
    assert m["eval_pairs"] == 3 * len(held)
    assert m["steps"] == len(seen) == 2 * -(-len(train) // 4)
    assert set(seen[-1]) >= {"loss", "kl", "clip_fraction", "advantage_abs_mean", "tokens_per_second"}
    assert seen[-1]["kl"] > 0
    assert (result.out_dir / "adapter_model.safetensors").is_file()


def test_second_iteration_clips_and_a_single_iteration_never_does(tmp_path, tiny_model_dir):
    train, held = split(ranked_groups(12))
    kwargs = {"train_examples": train, "eval_examples": held, "model": str(tiny_model_dir)}
    clip = {}
    for iterations in (1, 3):
        fractions = []
        train_grpo(
            tiny_config(num_iterations=iterations, learning_rate=1e-2, epsilon=0.05),
            out_dir=tmp_path / f"it{iterations}",
            progress=lambda step, total, m, f=fractions: f.append(m["clip_fraction"]),
            **kwargs,
        )
        clip[iterations] = fractions
    assert max(clip[1]) == 0.0  # ratio is exactly 1 on the pass that snapshots the old log-probs
    assert max(clip[3]) > 0.0


def test_equal_reward_groups_are_skipped_and_counted(tmp_path, tiny_model_dir):
    train, held = split(ranked_groups(12))
    ties = [{"prompt": "hello", "completions": ["yes", "no"], "ranks": [1, 1]}]
    result = train_grpo(
        tiny_config(),
        train_examples=train + ties,
        eval_examples=held,
        model=str(tiny_model_dir),
        out_dir=tmp_path / "g",
    )
    assert result.metrics["dropped_equal_rewards"] == 1
    assert result.metrics["train_groups"] == len(train)


def test_grpo_reference_cache_and_cancellation(tmp_path, tiny_model_dir):
    train, held = split(ranked_groups(12))
    kwargs = {"eval_examples": held, "model": str(tiny_model_dir), "cache_dir": tmp_path / "cache"}
    first = train_grpo(tiny_config(), train_examples=train, out_dir=tmp_path / "v1", **kwargs)
    assert first.metrics["reference_computed"] > 0
    out = tmp_path / "versions" / "v2"
    second = train_grpo(tiny_config(), train_examples=train, out_dir=out, should_stop=lambda: True, **kwargs)
    assert second.metrics["reference_computed"] == 0
    assert second.cancelled
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def test_grpo_rejects_nonsense_config():
    with pytest.raises(ValueError, match="num_iterations"):
        GRPOConfig(num_iterations=0).validate()
    with pytest.raises(ValueError, match="loss_type"):
        GRPOConfig(loss_type="ppo").validate()
