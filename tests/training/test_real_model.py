import pytest

from training.dpo import DPOConfig, train_dpo
from training.generate import SamplingConfig, generate_completions
from training.models import load_model

PAIRS = [
    {
        "prompt": f"Name a fruit that is {colour}.",
        "chosen": f"A {fruit} is {colour}.",
        "rejected": "I don't know.",
    }
    for colour, fruit in [
        ("yellow", "banana"),
        ("red", "strawberry"),
        ("orange", "orange"),
        ("green", "lime"),
        ("purple", "plum"),
        ("blue", "blueberry"),
    ]
]


@pytest.mark.slow
def test_a_few_dpo_steps_on_the_default_model_then_save_reload_generate(tmp_path, real_model_dir):
    config = DPOConfig(batch_size=2, max_length=128, max_prompt_length=96, learning_rate=1e-4, min_steps=0)
    result = train_dpo(
        config,
        train_examples=PAIRS[:4],
        eval_examples=PAIRS[4:],
        model=str(real_model_dir),
        out_dir=tmp_path / "v1",
        cache_dir=tmp_path / "cache",
    )
    assert result.metrics["steps"] == 2
    before, after = result.metrics["eval_before"], result.metrics["eval_after"]
    assert after["logp_margin"] > before["logp_margin"]  # the parent's own margin, then the trained model's
    assert after["margin"] > 0 and "margin" not in before  # the implicit reward: after training only

    model, tokenizer = load_model(str(result.out_dir))
    [[sample]] = generate_completions(
        model,
        tokenizer,
        [[{"role": "user", "content": "What is the capital of France?"}]],
        k=1,
        sampling=SamplingConfig(temperature=0, max_new_tokens=12),
    )
    assert "Paris" in sample.text
