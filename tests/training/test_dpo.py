import json

import pytest
import torch
from safetensors.torch import load_file

from tests.tiny_model import make_tiny_model_dir
from tests.training.synthetic import less_likely_pairs, preference_pairs, split
from training.data import tokenize_pairs
from training.dpo import DPOConfig, train_dpo
from training.logprobs import ReferenceCache, model_fingerprint, reference_logps
from training.models import load_model
from training.runs import evaluate_pairs


def tiny_config(**overrides) -> DPOConfig:
    values = {
        "learning_rate": 1e-3,
        "min_steps": 0,
        "batch_size": 8,
        "warmup_ratio": 0.0,
        "max_length": 64,
        "max_prompt_length": 48,
        "lora_r": 8,
        "lora_alpha": 16,
        "precision": "fp32",
    }
    return DPOConfig(**{**values, **overrides})


def test_dpo_makes_the_chosen_answer_the_more_likely_one(tmp_path, tiny_model_dir):
    # logp_accuracy, how often the chosen answer is the more likely one, is the model's own: the parent's
    # before, the trained policy's after. The implicit reward has no before (the policy is the reference).
    train, held = split(less_likely_pairs())
    kwargs = {"train_examples": train, "eval_examples": held, "model": str(tiny_model_dir)}
    result = train_dpo(tiny_config(learning_rate=1e-2, save_every=0), out_dir=tmp_path / "v1", **kwargs)
    before, after = result.metrics["eval_before"], result.metrics["eval_after"]
    assert before["pairs"] == after["pairs"] == len(held)
    assert before["logp_accuracy"] <= 0.25
    assert after["logp_accuracy"] >= 0.9
    assert after["logp_margin"] > before["logp_margin"]
    assert after["logp_accuracy_per_token"] >= before["logp_accuracy_per_token"]
    assert set(before) == {"logp_accuracy", "logp_accuracy_per_token", "logp_margin", "pairs"}
    assert set(after) == set(before) | {"accuracy", "margin"}


def test_before_is_the_parents_own_figures_and_differs_between_base_models(tmp_path, tiny_model_dir):
    train, held = split(preference_pairs())
    other_base = make_tiny_model_dir(tmp_path / "other", seed=1)
    before = {}
    for name, base in (("seed0", tiny_model_dir), ("seed1", other_base)):
        config = tiny_config(epochs=1, save_every=0)
        result = train_dpo(config, train_examples=train, eval_examples=held, model=str(base), out_dir=tmp_path / name)
        before[name] = result.metrics["eval_before"]
        # The same figures as the parent itself evaluated on the same pairs as a candidate would be.
        model, tokenizer = load_model(str(base))
        pairs = tokenize_pairs(held, tokenizer, max_length=64, max_prompt_length=48).examples
        ref, _ = reference_logps(
            model,
            [(p.prompt_ids, c) for p in pairs for c in (p.chosen_ids, p.rejected_ids)],
            ReferenceCache(None, "x"),
            pad_id=tokenizer.pad_token_id,
            batch_size=8,
            precision="fp32",
        )
        kwargs = {"beta": 0.1, "pad_id": tokenizer.pad_token_id, "batch_size": 8, "precision": "fp32"}
        kwargs["share_prompt"] = True
        scored = evaluate_pairs(model, pairs, ref, **kwargs)
        for figure in ("logp_accuracy", "logp_accuracy_per_token", "pairs"):
            assert before[name][figure] == scored[figure]
        assert before[name]["logp_margin"] == pytest.approx(scored["logp_margin"], abs=1e-4)
    assert before["seed0"]["logp_margin"] != pytest.approx(before["seed1"]["logp_margin"], abs=1e-3)


def test_dpo_lora_learns_a_human_preference_on_held_out_prompts(tmp_path, tiny_model_dir):
    train, held = split(preference_pairs())
    seen = []
    result = train_dpo(
        tiny_config(),
        train_examples=train,
        eval_examples=held,
        model=str(tiny_model_dir),
        out_dir=tmp_path / "v1",
        progress=lambda step, total, m: seen.append((step, total, m)),
    )
    m = result.metrics
    assert not result.cancelled
    assert m["eval_after"]["accuracy"] >= 0.9
    assert m["eval_after"]["margin"] > 0
    assert m["eval_pairs"] == len(held) and m["train_pairs"] == len(train)
    assert [s for s, _, _ in seen] == list(range(1, m["steps"] + 1))
    assert set(seen[-1][2]) >= {
        "loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "learning_rate",
        "tokens_per_second",
    }
    assert seen[-1][2]["loss"] < seen[0][2]["loss"]

    out = result.out_dir
    assert (out / "adapter_model.safetensors").is_file()
    assert json.loads((out / "training_config.json").read_text())["beta"] == 0.1
    assert json.loads((out / "metrics.json").read_text())["eval_after"] == m["eval_after"]

    # Round trip: the saved directory reloads as the trained policy.
    model, tokenizer = load_model(str(out))
    base, _ = load_model(str(tiny_model_dir))
    pairs = tokenize_pairs(held, tokenizer, max_length=64, max_prompt_length=48).examples
    ref, _ = reference_logps(
        base,
        [(p.prompt_ids, c) for p in pairs for c in (p.chosen_ids, p.rejected_ids)],
        ReferenceCache(None, "x"),
        pad_id=tokenizer.pad_token_id,
        batch_size=8,
        precision="fp32",
    )
    kwargs = {"beta": 0.1, "pad_id": tokenizer.pad_token_id, "batch_size": 8, "precision": "fp32"}
    again = evaluate_pairs(model, pairs, ref, **kwargs, share_prompt=True)
    assert again["accuracy"] == m["eval_after"]["accuracy"]
    assert again["margin"] == pytest.approx(m["eval_after"]["margin"], abs=1e-5)


def test_dpo_full_fine_tuning_learns_and_saves_full_weights(tmp_path, tiny_model_dir):
    train, held = split(preference_pairs())
    result = train_dpo(
        tiny_config(lora=False, learning_rate=5e-4),
        train_examples=train,
        eval_examples=held,
        model=str(tiny_model_dir),
        out_dir=tmp_path / "full",
    )
    assert result.metrics["eval_after"]["accuracy"] >= 0.9
    assert (result.out_dir / "model.safetensors").is_file()
    assert not (result.out_dir / "adapter_config.json").exists()
    load_model(str(result.out_dir))


@pytest.mark.parametrize(("loss_type", "smoothing"), [("ipo", 0.0), ("hinge", 0.0), ("robust", 0.1)])
def test_other_loss_types_train(tmp_path, tiny_model_dir, loss_type, smoothing):
    train, held = split(preference_pairs(12))
    result = train_dpo(
        tiny_config(loss_type=loss_type, label_smoothing=smoothing, epochs=2),
        train_examples=train,
        eval_examples=held,
        model=str(tiny_model_dir),
        out_dir=tmp_path / loss_type,
    )
    assert result.metrics["eval_after"]["margin"] > 0


def test_reference_cache_is_reused_by_the_next_periodic_run(tmp_path, tiny_model_dir):
    pairs = preference_pairs()
    train, held = split(pairs)
    cache = tmp_path / "cache"
    kwargs = {"model": str(tiny_model_dir), "cache_dir": cache, "eval_examples": held}
    first = train_dpo(tiny_config(), train_examples=train, out_dir=tmp_path / "r1", **kwargs)
    n_sequences = 2 * (len(train) + len(held))
    assert first.metrics["reference_computed"] == n_sequences
    assert first.metrics["reference_cached"] == 0

    new = [{"prompt": "Write a short poem about the sea.", "chosen": "The sea is good.", "rejected": "bad."}]
    second = train_dpo(tiny_config(), train_examples=train + new, out_dir=tmp_path / "r2", **kwargs)
    assert second.metrics["reference_computed"] == 2  # only the new pair's two sequences
    assert second.metrics["reference_cached"] == n_sequences

    fingerprint = model_fingerprint(str(tiny_model_dir), "fp32")
    assert len(list((cache / fingerprint).glob("*.safetensors"))) == 2


def test_cancelled_run_leaves_no_model_directory(tmp_path, tiny_model_dir):
    train, held = split(preference_pairs())
    calls = []

    def should_stop() -> bool:
        calls.append(1)
        return len(calls) > 2

    out = tmp_path / "versions" / "v2"
    result = train_dpo(
        tiny_config(save_every=1),
        train_examples=train,
        eval_examples=held,
        model=str(tiny_model_dir),
        out_dir=out,
        should_stop=should_stop,
    )
    assert result.cancelled
    assert not out.exists()
    assert list(out.parent.iterdir()) == []  # no checkpoint or temporary directory left behind either


class Interrupted(Exception):
    pass


def test_resume_after_an_interruption_matches_an_uninterrupted_run(tmp_path, tiny_model_dir):
    train, held = split(preference_pairs())
    kwargs = {"train_examples": train, "eval_examples": held, "model": str(tiny_model_dir)}
    reference = train_dpo(tiny_config(batch_size=4, save_every=0), out_dir=tmp_path / "straight", **kwargs)

    def crash_at_step_5(step, total, metrics):
        if step == 5:
            raise Interrupted

    out = tmp_path / "resumed"
    with pytest.raises(Interrupted):
        train_dpo(tiny_config(batch_size=4, save_every=2), out_dir=out, progress=crash_at_step_5, **kwargs)
    assert not out.exists()
    assert (tmp_path / ".resumed.checkpoint" / "state.json").is_file()

    resumed = train_dpo(tiny_config(batch_size=4, save_every=2), out_dir=out, **kwargs)
    assert resumed.metrics["resumed_from_step"] == 4
    assert not (tmp_path / ".resumed.checkpoint").exists()
    a = load_file(reference.out_dir / "adapter_model.safetensors")
    b = load_file(resumed.out_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)


def test_a_changed_config_does_not_resume_from_an_old_checkpoint(tmp_path, tiny_model_dir):
    train, held = split(preference_pairs(12))
    kwargs = {"train_examples": train, "eval_examples": held, "model": str(tiny_model_dir), "out_dir": tmp_path / "o"}

    def crash(step, total, metrics):
        if step == 3:
            raise Interrupted

    with pytest.raises(Interrupted):
        train_dpo(tiny_config(batch_size=2, save_every=2), progress=crash, **kwargs)
    result = train_dpo(tiny_config(batch_size=2, save_every=2, beta=0.2), **kwargs)
    assert result.metrics["resumed_from_step"] == 0


def test_held_out_prompts_seen_in_training_are_not_evaluated(tmp_path, tiny_model_dir):
    train, held = split(preference_pairs(12))
    result = train_dpo(
        tiny_config(),
        train_examples=train,
        eval_examples=held + train[:2],
        model=str(tiny_model_dir),
        out_dir=tmp_path / "o",
    )
    assert result.metrics["eval_pairs"] == len(held)
    assert result.metrics["eval_dropped_prompt_overlap"] == 2


def test_nonsense_config_is_rejected_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="label_smoothing has no effect"):
        train_dpo(
            DPOConfig(loss_type="hinge", label_smoothing=0.1),
            train_examples=[],
            eval_examples=[],
            model=str(tmp_path / "missing"),
            out_dir=tmp_path / "o",
        )


def test_held_out_pairs_of_one_group_run_each_completion_once(tiny_model_dir):
    from training.data import PairExample, collate_sequences, sequence_key
    from training.logprobs import completion_logps

    model, _ = load_model(str(tiny_model_dir))
    prompt, completions = [1, 40, 41, 42], [[70, 71, 2], [80, 2], [90, 91, 92, 2]]
    # The three pairs of a group of three (as GRPO's held-out pairs are), and a pair of another prompt.
    pairs = [PairExample(prompt, completions[i], completions[j], 1.0, "a") for i, j in ((0, 1), (0, 2), (1, 2))]
    pairs.append(PairExample([1, 50], [60, 2], [61, 62, 2], 1.0, "b"))
    sequences = [(p.prompt_ids, c) for p in pairs for c in (p.chosen_ids, p.rejected_ids)]
    whole = completion_logps(model, collate_sequences(*zip(*sequences, strict=True), pad_id=2)).sum(dim=1).detach()
    ref = {sequence_key(*s): torch.zeros(len(s[1])) for s in sequences}  # a reference of log-prob 0 everywhere
    rows: list[int] = []
    model.get_input_embeddings().register_forward_hook(lambda m, args, out: rows.append(out.shape[0]))
    kwargs = {"beta": 0.1, "pad_id": 2, "batch_size": 8, "precision": "fp32"}
    shared = evaluate_pairs(model, pairs, ref, **kwargs, share_prompt=True)
    assert rows == [2, 5]  # the two prompts once, then the five distinct completions
    rows.clear()
    alone = evaluate_pairs(model, pairs, ref, **kwargs, share_prompt=False)
    assert rows == [5]  # five distinct sequences, each whole
    margins = whole[0::2] - whole[1::2]  # chosen minus rejected, pair by pair
    for metrics in (shared, alone):
        assert metrics["pairs"] == 4
        assert metrics["logp_accuracy"] == float((margins > 0).float().mean())
        assert metrics["logp_margin"] == pytest.approx(float(margins.mean()), abs=1e-5)
