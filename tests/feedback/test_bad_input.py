"""Inputs that used to be a 500 are a 400 that names the problem, and change nothing."""

import re
import uuid

import pytest
from django.test import Client
from django.urls import reverse
from drf_spectacular.generators import SchemaGenerator
from rest_framework.test import APIClient

from feedback.models import Assignment, Membership, ModelVersion, PairwiseJudgement, Project, Prompt, TrainingRun
from tests.factories import (
    CompletionFactory,
    MembershipFactory,
    ModelVersionFactory,
    ProjectFactory,
    PromptFactory,
    TrainingRunFactory,
)

pytestmark = pytest.mark.django_db

SCHEMA = SchemaGenerator().get_schema(request=None, public=True)
# Every POST that reads a body (a cancel takes none and never parses one).
POSTS = sorted(path for path, operations in SCHEMA["paths"].items() if "requestBody" in operations.get("post", {}))
DEEP = "[" * 5000 + "]" * 5000
TOO_DEEP = {"detail": "JSON parse error - nested deeper than 64 levels."}


@pytest.fixture
def world(staff_user):
    project = ProjectFactory(slug="alpha")
    run = TrainingRunFactory(project=project, status=TrainingRun.Status.QUEUED)
    version = ModelVersionFactory(project=project)
    prompt = PromptFactory(project=project)
    client = APIClient()
    client.force_login(staff_user)
    ids = {
        "slug": "alpha",
        "run_id": run.pk,
        "version_id": version.pk,
        "prompt_id": prompt.pk,
        "username": staff_user.username,
        "item_key": "c1-2",
    }
    return {"client": client, "ids": ids}


def _snapshot():
    return (
        Prompt.objects.count(),
        list(TrainingRun.objects.values_list("pk", "status")),
        ModelVersion.objects.filter(is_active=True).count(),
    )


@pytest.mark.parametrize("path", POSTS)
def test_json_nested_thousands_deep_is_a_400_on_every_post(world, path):
    before = _snapshot()
    response = world["client"].post(path.format(**world["ids"]), DEEP, content_type="application/json")
    assert response.status_code == 400
    if path.endswith("/prompts/"):  # the import answers in its own shape, the problem as its body's
        problem = {"line": 0, "field": "body", "message": TOO_DEEP["detail"]}
        assert response.json() == {"detail": "Nothing was imported: the body is not JSON.", "problems": [problem]}
    else:
        assert response.json() == TOO_DEEP
    assert _snapshot() == before


def test_json_as_deep_as_the_limit_is_read(world):
    body = '{"algorithm": "dpo", "config": {"notes": ' + "[" * 62 + "]" * 62 + "}}"
    response = world["client"].post("/api/v1/projects/alpha/training-runs/", body, content_type="application/json")
    assert response.status_code == 409  # past the parser: refused because a run is already queued


@pytest.fixture
def member_client(client):
    project = ProjectFactory(slug="loop")
    TrainingRunFactory(project=project)
    client.force_login(MembershipFactory(project=project, role=Membership.Role.ANNOTATOR).user)
    return client


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("/projects/loop/training/?run=²", "run: expected the id of a run, a whole number"),
        ("/projects/loop/training/history/?run=²", "run: expected the id of a run, a whole number"),
        ("/projects/loop/training/?run=abc", "run: expected the id of a run, a whole number"),
        ("/projects/loop/training/watch/?after=²", "after: expected the id of the newest run shown, a whole number"),
        ("/projects/loop/annotate/next/?shown=²", "shown: expected the ids of the tasks on the page, whole numbers"),
    ],
)
def test_non_ascii_digits_in_a_query_are_a_400_naming_the_parameter(member_client, url, message):
    response = member_client.get(url)
    assert response.status_code == 400 and response.content.decode() == message


HUGE = "99999999999999999999999"


@pytest.mark.parametrize(
    ("url", "status"),
    [
        (f"/projects/loop/training/?run={HUGE}", 400),  # more digits than an id can have
        (f"/projects/loop/training/watch/?after={HUGE}", 400),
        (f"/projects/loop/annotate/next/?shown={HUGE}", 400),
        (f"/projects/loop/training/?run={'0' * 30}1", 200),  # a run's id, however many zeros lead it
        (f"/projects/loop/training/runs/{HUGE}/", 404),
    ],
)
def test_huge_numbers_in_pages_are_no_such_thing(member_client, url, status):
    assert member_client.get(url).status_code == status


@pytest.mark.parametrize(
    "url",
    [
        f"/api/v1/model-versions/{HUGE}/promote/",
        f"/api/v1/training-runs/{HUGE}/cancel/",
    ],
)
def test_huge_ids_in_api_urls_are_a_404(world, url):
    response = world["client"].post(url, {}, format="json")
    assert response.status_code == 404


@pytest.mark.parametrize(
    ("url", "status", "field"),
    [
        (f"/api/v1/projects/alpha/completions/?prompt={HUGE}", 400, "prompt"),
        (f"/api/v1/projects/alpha/completions/?model_version={HUGE}", 400, "model_version"),
        (f"/api/v1/projects/alpha/export/?annotators={HUGE}", 400, "annotators"),
        (f"/api/v1/projects/alpha/prompts/?page={HUGE}", 404, "detail"),
        (f"/api/v1/training-runs/{HUGE}/", 404, "detail"),
        ("/api/v1/projects/alpha/prompts/?page=²", 404, "detail"),
    ],
)
def test_huge_numbers_in_api_queries_are_refused_by_name(world, url, status, field):
    response = world["client"].get(url)
    assert response.status_code == status and field in response.json()


LONG = "9" * 5000  # more digits than int() reads at all
RUN = "run: expected the id of a run, a whole number"


@pytest.mark.parametrize(
    ("url", "status", "message"),
    [
        (f"/projects/loop/training/?run={LONG}", 400, RUN),
        (f"/projects/loop/training/history/?run={LONG}", 400, RUN),
        (
            f"/projects/loop/training/watch/?after={LONG}",
            400,
            "after: expected the id of the newest run shown, a whole number",
        ),
        (
            f"/projects/loop/annotate/next/?shown={LONG}",
            400,
            "shown: expected the ids of the tasks on the page, whole numbers",
        ),
        (f"/projects/loop/training/runs/{LONG}/", 404, None),
    ],
)
def test_numbers_of_thousands_of_digits_in_pages_are_not_ids(member_client, url, status, message):
    PromptFactory(project=Project.objects.get(slug="loop"))  # a task a prefetch would lease
    before = (Assignment.objects.count(), TrainingRun.objects.count())
    response = member_client.get(url)
    assert response.status_code == status
    if message is not None:
        assert response.content.decode() == message
    assert (Assignment.objects.count(), TrainingRun.objects.count()) == before


@pytest.mark.parametrize(
    ("url", "status", "body"),
    [
        (f"/api/v1/projects/alpha/prompts/?page={LONG}", 404, {"detail": "Invalid page."}),
        (f"/api/v1/training-runs/{LONG}/", 404, {"detail": "No such training run."}),
        (f"/api/v1/projects/alpha/completions/?prompt={LONG}", 400, None),
    ],
)
def test_numbers_of_thousands_of_digits_in_the_api_are_not_ids(world, url, status, body):
    before = _snapshot()
    response = world["client"].get(url)
    assert response.status_code == status
    if body is not None:
        assert response.json() == body
    assert _snapshot() == before


@pytest.mark.parametrize(
    ("action", "fields"),
    [("annotate-submit", {"choice": "a", "time_ms": "1000"}), ("annotate-skip", {"reason": "Cannot read it"})],
)
def test_a_shown_id_of_thousands_of_digits_is_refused_before_the_answer_is_stored(action, fields):
    project = ProjectFactory(slug="pairs", mode="pairwise", completions_per_prompt=2)
    for _ in range(2):
        CompletionFactory.create_batch(2, prompt=PromptFactory(project=project))
    client = Client()
    client.force_login(MembershipFactory(project=project, role=Membership.Role.ANNOTATOR).user)
    page = client.get(reverse("annotate", args=["pairs"])).content.decode()
    task_id = int(re.search(r'name="task_id" value="(\d+)"', page).group(1))
    before = list(Assignment.objects.values_list("pk", "state", "expires_at"))

    response = client.post(
        reverse(action, args=["pairs"]),
        {"task_id": task_id, "client_uuid": str(uuid.uuid4()), "shown": LONG, **fields},
        HTTP_HX_REQUEST="true",
    )

    assert response.status_code == 400
    assert response.content.decode() == "shown: expected the ids of the tasks on the page, whole numbers"
    assert not PairwiseJudgement.objects.exists()
    assert list(Assignment.objects.values_list("pk", "state", "expires_at")) == before
