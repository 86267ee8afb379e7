"""The judgement API refuses rankings longer than any task before the service looks at their ids."""

import uuid

import pytest
from django.urls import reverse
from rest_framework.test import APIClient

from feedback.models import RankingJudgement
from tests.factories import CompletionFactory, MembershipFactory, ProjectFactory, PromptFactory, UserFactory

pytestmark = pytest.mark.django_db

TOO_LONG = "Ensure this field has no more than 16 elements."


@pytest.fixture
def leased():
    project = ProjectFactory(mode="ranking", completions_per_prompt=4)
    CompletionFactory.create_batch(4, prompt=PromptFactory(project=project))
    user = UserFactory()
    MembershipFactory(user=user, project=project)
    client = APIClient()
    client.force_authenticate(user)
    task = client.get(reverse("api:project-next-task", args=[project.slug])).json()
    return project, client, task


def post_ranking(project, client, task, ranking):
    body = {"task_id": task["task_id"], "client_uuid": str(uuid.uuid4()), "kind": "ranking", "ranking": ranking}
    return client.post(reverse("api:project-judgements", args=[project.slug]), body, format="json")


@pytest.mark.parametrize(
    ("ranking", "errors"),
    [
        ([[n] for n in range(1, 32_001)], {"ranking": [TOO_LONG]}),
        ([list(range(1, 32_001))], {"ranking": {"0": [TOO_LONG]}}),
        ([[n] for n in range(1, 18)], {"ranking": [TOO_LONG]}),
        ([[n] for n in range(1, 11)], {"ranking": ["The ranking has 10 groups; this task has 4 completions."]}),
    ],
    ids=["32000-groups", "32000-ids-in-one-group", "17-groups", "10-groups-for-4-completions"],
)
def test_a_ranking_longer_than_the_task_answers_400_naming_the_field(leased, ranking, errors):
    project, client, task = leased
    response = post_ranking(project, client, task, ranking)
    assert response.status_code == 400
    assert response.json() == errors
    assert not RankingJudgement.objects.exists()
    # the task is still open: a proper ranking of it is stored
    proper = post_ranking(project, client, task, [[c["id"]] for c in task["completions"]])
    assert proper.status_code == 201
