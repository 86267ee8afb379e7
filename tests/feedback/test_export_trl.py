"""Exported files load with `datasets` and train TRL's DPOTrainer as they are (needs the `bench` extra)."""

import math

import pytest
from django.core.management import call_command

from tests.factories import CompletionFactory, PromptFactory, UserFactory
from tests.feedback.export_helpers import fast_password_hashing, rank

datasets = pytest.importorskip("datasets")
trl = pytest.importorskip("trl")

pytestmark = pytest.mark.django_db


@pytest.fixture
def project(settings):
    fast_password_hashing(settings)
    from tests.factories import ProjectFactory

    project = ProjectFactory(slug="trl")
    one, two = UserFactory(), UserFactory()
    questions = ["How do I reverse a list in Python?", "What is the capital of France?", "Tell me about cats."]
    answers = ["Use reversed(xs) or xs[::-1].", "Paris is the capital of France.", "Cats are good.", "No."]
    for question in questions:
        prompt = PromptFactory(
            project=project,
            messages=[
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": question},
            ],
        )
        a, b, c, d = (CompletionFactory(prompt=prompt, text=text) for text in answers)
        rank(one, prompt, [[a], [b, c], [d]])
        rank(two, prompt, [[a], [b], [c], [d]])
    return project


@pytest.mark.parametrize("suffix", ["jsonl", "parquet"])
@pytest.mark.parametrize("conversational", [False, True], ids=["standard", "conversational"])
def test_dpo_trainer_trains_a_step_on_the_exported_file(project, tmp_path, suffix, conversational):
    from tests.tiny_model import make_tiny_model_dir

    out = tmp_path / f"dpo.{suffix}"
    call_command(
        "export_preferences",
        "trl",
        "--format",
        "dpo",
        *(["--conversational"] if conversational else []),
        "--out",
        str(out),
    )
    dataset = datasets.load_dataset("json" if suffix == "jsonl" else "parquet", data_files=str(out), split="train")
    assert len(dataset) > 0 and {"prompt", "chosen", "rejected"} <= set(dataset.column_names)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = make_tiny_model_dir(tmp_path / "model")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = trl.DPOConfig(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=2,
        max_steps=1,
        max_length=128,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        logging_steps=1,
    )
    trainer = trl.DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    result = trainer.train()
    assert result.global_step == 1
    assert math.isfinite(result.training_loss)  # neither NaN nor infinite
