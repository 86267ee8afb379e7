import uuid

import pytest
from django.db import IntegrityError, transaction

from feedback.models import Project, TrainingRun
from tests.conftest import PASSWORD
from tests.factories import (
    AssignmentFactory,
    CompletionFactory,
    ModelVersionFactory,
    PairwiseJudgementFactory,
    ProjectFactory,
    PromptFactory,
    RankingJudgementFactory,
    TrainingRunFactory,
    UserFactory,
)

pytestmark = pytest.mark.django_db


def test_a_second_pairwise_judgement_for_the_same_item_is_refused():
    judgement = PairwiseJudgementFactory()
    with pytest.raises(IntegrityError), transaction.atomic():
        PairwiseJudgementFactory(
            annotator=judgement.annotator, prompt=judgement.prompt, left=judgement.right, right=judgement.left
        )


def test_a_second_ranking_of_the_same_prompt_by_one_annotator_is_refused():
    judgement = RankingJudgementFactory()
    with pytest.raises(IntegrityError), transaction.atomic():
        RankingJudgementFactory(annotator=judgement.annotator, prompt=judgement.prompt)
    RankingJudgementFactory(prompt=judgement.prompt)  # another annotator may


def test_a_duplicate_client_uuid_is_refused():
    client_uuid = uuid.uuid4()
    RankingJudgementFactory(client_uuid=client_uuid)
    with pytest.raises(IntegrityError), transaction.atomic():
        RankingJudgementFactory(client_uuid=client_uuid)


def test_an_unknown_choice_is_refused_by_the_database():
    with pytest.raises(IntegrityError), transaction.atomic():
        PairwiseJudgementFactory(choice="maybe")


def test_a_pair_of_one_completion_with_itself_is_refused():
    completion = CompletionFactory()
    with pytest.raises(IntegrityError), transaction.atomic():
        PairwiseJudgementFactory(prompt=completion.prompt, left=completion, right=completion)


def test_two_active_versions_in_one_project_are_refused():
    project = ProjectFactory()
    ModelVersionFactory(project=project, is_active=True)
    ModelVersionFactory(project=project, is_active=False)
    with pytest.raises(IntegrityError), transaction.atomic():
        ModelVersionFactory(project=project, is_active=True)
    ModelVersionFactory(is_active=True)  # another project may have its own


def test_two_active_training_runs_in_one_project_are_refused():
    project = ProjectFactory()
    TrainingRunFactory(project=project, status=TrainingRun.Status.RUNNING)
    TrainingRunFactory(project=project, status=TrainingRun.Status.FAILED)
    with pytest.raises(IntegrityError), transaction.atomic():
        TrainingRunFactory(project=project, status=TrainingRun.Status.QUEUED)


def test_an_item_slot_is_leased_once_and_an_annotator_gets_an_item_once():
    prompt = PromptFactory()
    AssignmentFactory(prompt=prompt, slot=0)
    with pytest.raises(IntegrityError), transaction.atomic():
        AssignmentFactory(prompt=prompt, slot=0)
    first = AssignmentFactory(prompt=prompt, slot=1)
    with pytest.raises(IntegrityError), transaction.atomic():
        AssignmentFactory(prompt=prompt, annotator=first.annotator, slot=2)


def test_project_settings_out_of_range_are_refused():
    with pytest.raises(IntegrityError), transaction.atomic():
        ProjectFactory(completions_per_prompt=1)
    with pytest.raises(IntegrityError), transaction.atomic():
        ProjectFactory(mode="chaos")
    with pytest.raises(IntegrityError), transaction.atomic():
        ProjectFactory(top_p=0)
    assert Project.objects.count() == 0


def test_unique_external_ids_per_project_but_blank_ones_repeat():
    project = ProjectFactory()
    PromptFactory(project=project, external_id="q-1")
    PromptFactory(project=project, external_id="")
    PromptFactory(project=project, external_id="")
    with pytest.raises(IntegrityError), transaction.atomic():
        PromptFactory(project=project, external_id="q-1")
    PromptFactory(external_id="q-1")


def test_a_factory_user_can_log_in_with_the_factory_password(client):
    user = UserFactory()
    assert client.login(username=user.username, password=PASSWORD) is True
    assert client.get("/").status_code == 200
