"""Inputs that used to be a 500 are a 400 that names the problem, and change nothing."""

import pytest
from drf_spectacular.generators import SchemaGenerator
from rest_framework.test import APIClient

from feedback.models import Membership, ModelVersion, Prompt, TrainingRun
from tests.factories import MembershipFactory, ModelVersionFactory, ProjectFactory, TrainingRunFactory

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
    client = APIClient()
    client.force_login(staff_user)
    return {"client": client, "ids": {"slug": "alpha", "run_id": run.pk, "version_id": version.pk}}


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
        (f"/projects/loop/training/?run={HUGE}", 200),  # no such run: the newest is shown
        (f"/projects/loop/training/watch/?after={HUGE}", 204),
        (f"/projects/loop/annotate/next/?shown={HUGE}", 400),  # more than an id can be
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
