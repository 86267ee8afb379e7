"""The closed loop with the real default model: judgements -> run -> version -> promotion -> its completions."""

from dataclasses import replace

import pytest

from feedback.models import ModelVersion, Project
from feedback.selectors.preferences import PreferenceExportOptions, prompt_in_split
from feedback.services.model_versions import model_version_promote
from feedback.services.training_runs import training_run_start
from tests.factories import PromptFactory, UserFactory
from tests.feedback.test_training_runs import judge_everything

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

FEW_STEPS = {
    "epochs": 1,
    "min_steps": 0,
    "batch_size": 2,
    "max_length": 96,
    "max_prompt_length": 64,
    "eval_batch_size": 4,
    "learning_rate": 1e-4,
    "save_every": 0,
}


HELD_OUT = 0.3


def test_the_default_model_goes_round_the_loop(real_model_dir):
    project = Project.objects.create(
        slug="real",
        name="Real",
        mode="pairwise",
        completions_per_prompt=2,
        base_model=str(real_model_dir),
        max_new_tokens=8,
        training_config=FEW_STEPS,
    )
    # Prompts fall into the held-out part by a hash of their id: judge until both parts have enough.
    held_out_split = replace(PreferenceExportOptions(format="dpo", test_fraction=HELD_OUT), split="test")
    held_out: list[int] = []
    while not held_out or project.prompts.count() - len(held_out) < 4:  # two steps of two pairs
        judge_everything(project, UserFactory(), prompts=3, first=project.prompts.count())
        held_out = [
            pk
            for pk in project.prompts.values_list("pk", flat=True)
            if prompt_in_split(prompt_id=pk, options=held_out_split)
        ]

    run = training_run_start(project=project, triggered_by=UserFactory(is_staff=True), test_fraction=HELD_OUT)
    run.refresh_from_db()
    assert run.status == "succeeded", run.error
    assert run.step == run.total_steps >= 2
    version = run.produced_version
    assert version.metrics["eval_after"]["pairs"] == len(held_out)  # one pair per prompt with K = 2

    prompt = PromptFactory(project=project, messages=[{"role": "user", "content": "What colour is the sky?"}])
    model_version_promote(version=version)  # the next round is written by the new version and the base model
    assert ModelVersion.objects.get(is_active=True) == version
    written = list(prompt.completions.all())
    assert len(written) == 2 and all(c.text.strip() for c in written)
    assert {c.model_version for c in written} == {version, None}
