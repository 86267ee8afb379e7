"""Two rounds and two trainings on the same prompts with the real default model."""

import uuid

import pytest

from feedback.models import Completion, PairwiseJudgement, Project
from feedback.selectors.preferences import PreferenceExportOptions, preference_rows
from feedback.services.assignments import assignment_lease_next
from feedback.services.judgements import JudgementSubmission, judgement_submit
from feedback.services.model_versions import model_version_promote
from feedback.services.training_runs import training_run_start
from tests.factories import UserFactory
from tests.feedback.test_loop_real_model import FEW_STEPS
from tests.feedback.test_training_runs import judge_everything

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]


def test_a_second_round_by_the_new_version_is_judged_and_trained_on_with_the_first(real_model_dir):
    project = Project.objects.create(
        slug="rounds",
        name="Rounds",
        mode="pairwise",
        completions_per_prompt=2,
        base_model=str(real_model_dir),
        max_new_tokens=8,
        training_config=FEW_STEPS,
    )
    annotator = UserFactory()
    judge_everything(project, annotator, prompts=6)  # round 1: one pair per prompt, judged
    staff = UserFactory(is_staff=True)
    first_run = training_run_start(project=project, triggered_by=staff, test_fraction=0.3)
    first_run.refresh_from_db()
    assert first_run.status == "succeeded", first_run.error
    version = first_run.produced_version

    model_version_promote(version=version)  # huey runs the round at once: the new version and the base model

    second = project.rounds.get(number=2)
    assert (second.status, second.writers, second.prompts_written) == ("done", [version.name, "base"], 6)
    written = Completion.objects.filter(round=second)
    assert written.count() == 12 and all(c.text.strip() for c in written)
    for prompt in project.prompts.all():
        assert sorted(str(c.model_version) for c in written.filter(prompt=prompt)) == sorted([str(version), "None"])

    # the same annotator judges the same prompts again, now the new round's completions
    judged = 0
    while (task := assignment_lease_next(project=project, annotator=annotator)) is not None:
        assert {c.round_id for c in task.completions} == {second.pk}
        submission = JudgementSubmission(task_id=task.task_id, client_uuid=uuid.uuid4(), kind="pairwise", choice="a")
        judgement_submit(project=project, annotator=annotator, submission=submission)
        judged += 1
    assert judged == 6 and PairwiseJudgement.objects.filter(round=second).count() == 6

    second_run = training_run_start(project=project, triggered_by=staff, test_fraction=0.3)
    second_run.refresh_from_db()
    assert second_run.status == "succeeded", second_run.error
    assert second_run.parent_version == version
    assert second_run.data_counts["train"] + second_run.data_counts["held_out"] == 12  # both rounds' pairs
    rows = preference_rows(project=project, options=PreferenceExportOptions(format="dpo"))
    assert sorted(row["round"] for row in rows) == [1] * 6 + [2] * 6
