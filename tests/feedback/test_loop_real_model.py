"""The closed loop with the real default model: judgements -> run -> version -> promotion -> its completions."""

import pytest

from feedback.models import ModelVersion, Project
from feedback.services.model_versions import model_version_promote
from feedback.services.training_runs import training_run_start
from tests.factories import PromptFactory, UserFactory
from tests.feedback.test_training_runs import judge_everything

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

FEW_STEPS = {
    "epochs": 1,
    "batch_size": 2,
    "max_length": 96,
    "max_prompt_length": 64,
    "eval_batch_size": 4,
    "learning_rate": 1e-4,
    "save_every": 0,
}


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
    judge_everything(project, UserFactory(), prompts=6)

    run = training_run_start(project=project, triggered_by=UserFactory(is_staff=True))  # the worker runs it at once
    run.refresh_from_db()
    assert run.status == "succeeded", run.error
    assert run.step == run.total_steps >= 2
    version = run.produced_version
    assert version.metrics["eval_after"]["pairs"] >= 1

    prompt = PromptFactory(project=project, messages=[{"role": "user", "content": "What colour is the sky?"}])
    model_version_promote(version=version)  # the next round is written by the new version and the base model
    assert ModelVersion.objects.get(is_active=True) == version
    written = list(prompt.completions.all())
    assert len(written) == 2 and all(c.text.strip() for c in written)
    assert {c.model_version for c in written} == {version, None}
