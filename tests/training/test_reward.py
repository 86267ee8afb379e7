import json

import pytest
import torch

from tests.training.synthetic import preference_pairs, ranked_groups, split
from training.__main__ import main
from training.config import RewardConfig
from training.data import DataFormatError
from training.models import ModelLoadError
from training.reward import HEAD_FILE, load_reward_model, score_texts, train_reward

FAST = {
    "min_steps": 0,
    "max_length": 64,
    "max_prompt_length": 48,
    "learning_rate": 3e-3,
    "batch_size": 8,
    "precision": "fp32",
}


def train(tmp_path, model_dir, records, **overrides):
    train_rows, eval_rows = split(records)
    config = RewardConfig(**{**FAST, "epochs": 3, "save_every": 0, **overrides})
    return train_reward(
        config, train_examples=train_rows, eval_examples=eval_rows, model=str(model_dir), out_dir=tmp_path / "rm"
    )


def test_pairs_train_a_reward_model_to_high_held_out_accuracy(tmp_path, tiny_model_dir):
    result = train(tmp_path, tiny_model_dir, preference_pairs())
    before, after = result.metrics["eval_before"], result.metrics["eval_after"]
    assert before["pairs"] == after["pairs"] == 22
    assert before["accuracy"] < 0.9
    assert after["accuracy"] >= 0.9
    assert (tmp_path / "rm" / HEAD_FILE).is_file()
    assert json.loads((tmp_path / "rm" / "training_config.json").read_text())["algorithm"] == "reward"


def test_ranked_groups_train_a_reward_model_with_plackett_luce(tmp_path, tiny_model_dir):
    result = train(tmp_path, tiny_model_dir, ranked_groups())
    assert result.metrics["train_groups"] == 68
    assert result.metrics["eval_after"]["accuracy"] >= 0.9


def test_a_saved_reward_model_scores_as_it_did_in_training(tmp_path, tiny_model_dir):
    train(tmp_path, tiny_model_dir, preference_pairs())
    model, tokenizer = load_reward_model(tmp_path / "rm")
    good, bad = score_texts(model, tokenizer, ["Tell me about cats."] * 2, ["cats are good, yes.", "cats are bad, no."])
    assert good > bad
    assert not any(p.requires_grad for p in model.parameters())


def test_full_fine_tuning_saves_full_weights(tmp_path, tiny_model_dir):
    result = train(tmp_path, tiny_model_dir, preference_pairs(), lora=False, learning_rate=1e-3)
    assert result.metrics["eval_after"]["accuracy"] >= 0.9
    assert (tmp_path / "rm" / "model.safetensors").is_file()
    assert not (tmp_path / "rm" / "adapter_config.json").exists()


def test_a_margin_asks_for_a_wider_win(tmp_path, tiny_model_dir):
    rows = [{**r, "margin": 3.0} for r in preference_pairs()]
    with_margin = train(tmp_path / "a", tiny_model_dir, rows).metrics["eval_after"]["margin"]
    without = train(tmp_path / "b", tiny_model_dir, rows, use_margin=False).metrics["eval_after"]["margin"]
    assert with_margin > without


def test_a_bad_margin_names_its_line_and_field(tmp_path, tiny_model_dir):
    rows = [{**preference_pairs()[0], "margin": "wide", "_line": 3}]
    with pytest.raises(DataFormatError, match="line 3: field 'margin': expected a finite number"):
        train_reward(
            RewardConfig(**FAST), train_examples=rows, eval_examples=[], model=str(tiny_model_dir), out_dir=tmp_path
        )


def test_a_shared_prompt_pass_scores_and_trains_as_whole_sequences(tmp_path, tiny_model_dir):
    from training.models import load_model
    from training.reward import RewardModel, new_head

    lm, _ = load_model(str(tiny_model_dir))
    torch.manual_seed(0)
    model = RewardModel(lm, new_head(lm))
    # Prompts of different lengths, one with three completions in any order, completions of one token and more.
    sequences = [([1, 40, 41], [70, 2]), ([1, 50], [2]), ([1, 40, 41], [80, 81, 82, 2]), ([1, 40, 41], [90, 2])]
    scores = {}
    grads = {}
    for share in (True, False):
        model.zero_grad()
        scores[share] = model(sequences, pad_id=2, share_prompt=share)
        scores[share].pow(2).sum().backward()
        grads[share] = {n: p.grad.clone() for n, p in model.named_parameters()}
    torch.testing.assert_close(scores[True], scores[False], atol=1e-5, rtol=1e-5)
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, atol=1e-5, rtol=1e-4)

    shared = train(tmp_path / "a", tiny_model_dir, ranked_groups(), epochs=1).metrics["eval_after"]
    whole = train(tmp_path / "b", tiny_model_dir, ranked_groups(), epochs=1, share_prompt=False).metrics["eval_after"]
    assert shared["margin"] == pytest.approx(whole["margin"], abs=1e-4)


def test_a_model_directory_without_a_head_is_not_a_reward_model(tiny_model_dir):
    with pytest.raises(ModelLoadError, match=f"is not a reward model \\(no {HEAD_FILE}\\)"):
        load_reward_model(tiny_model_dir)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("center_rewards", -1.0, "center_rewards must not be negative"),
        ("batch_size", 0, "batch_size must be at least 1"),
    ],
)
def test_values_out_of_range_name_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        RewardConfig(**{field: value}).validate()


def test_a_stopped_run_writes_no_reward_model(tmp_path, tiny_model_dir):
    train_rows, eval_rows = split(preference_pairs())
    result = train_reward(
        RewardConfig(**FAST, save_every=0),
        train_examples=train_rows,
        eval_examples=eval_rows,
        model=str(tiny_model_dir),
        out_dir=tmp_path / "rm",
        should_stop=lambda: True,
    )
    assert result.cancelled and not (tmp_path / "rm").exists()


def test_a_run_killed_after_a_checkpoint_resumes_with_its_head(tmp_path, tiny_model_dir):
    train_rows, eval_rows = split(preference_pairs())
    config = RewardConfig(**FAST, save_every=2, epochs=2)
    kwargs = {"train_examples": train_rows, "eval_examples": eval_rows, "model": str(tiny_model_dir)}

    def die_at_step_three(step: int, total: int, metrics: dict) -> None:
        if step == 3:
            raise KeyboardInterrupt  # the worker dies after the checkpoint of step 2

    with pytest.raises(KeyboardInterrupt):
        train_reward(config, **kwargs, out_dir=tmp_path / "rm", progress=die_at_step_three)
    resumed = train_reward(config, **kwargs, out_dir=tmp_path / "rm")
    assert resumed.metrics["resumed_from_step"] == 2
    straight = train_reward(config, **kwargs, out_dir=tmp_path / "straight")
    head = load_reward_model(tmp_path / "rm")[0].head.weight
    assert torch.allclose(head, load_reward_model(tmp_path / "straight")[0].head.weight, atol=1e-5)
    assert straight.metrics["resumed_from_step"] == 0


def test_command_line_trains_a_reward_model(tmp_path, tiny_model_dir, capsys):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in preference_pairs()))
    args = ["--max-length", "64", "--lr", "3e-3", "--batch-size", "8", "--epochs", "3", "--quiet"]
    code = main(["reward", "--data", str(data), "--model", str(tiny_model_dir), "--out", str(tmp_path / "rm"), *args])
    assert code == 0
    text = capsys.readouterr().out
    after = text.split("held-out accuracy")[1].split(":")[1].split(";")[0].split("->")[1]
    assert float(after) >= 0.9
    assert "reference log-probs" not in text
