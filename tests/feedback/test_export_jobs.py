"""Background export files start only with POST .../exports/; GET .../export/ only ever streams."""

import json

import pytest
from django.conf import settings
from rest_framework.test import APIClient

from feedback.models import Membership
from feedback.services.exports import export_job_get
from tests.factories import MembershipFactory, ProjectFactory, UserFactory
from tests.feedback.export_helpers import make_prompt, rank

pytestmark = pytest.mark.django_db

JOBS = "/api/v1/projects/zeta/exports/"


@pytest.fixture
def manager():
    project = ProjectFactory(slug="zeta")
    annotator = MembershipFactory(project=project, user=UserFactory(username="rater")).user
    for _ in range(2):
        prompt, (a, b, c) = make_prompt(project, k=3)
        rank(annotator, prompt, [[a], [b], [c]])
    return MembershipFactory(project=project, role=Membership.Role.MANAGER).user


def api(user) -> APIClient:
    client = APIClient()
    client.force_authenticate(user)
    return client


def jobs_written() -> list[str]:
    exports = settings.EXPORTS_DIR
    return sorted(p.name for p in exports.iterdir()) if exports.exists() else []


@pytest.mark.parametrize("query", ["file=parquet", "file=jsonl&format=grpo", "file="])
def test_get_with_a_file_is_a_400_that_points_to_post_and_starts_nothing(manager, queue, query):
    response = api(manager).get(f"/api/v1/projects/zeta/export/?{query}")

    assert response.status_code == 400
    assert response.json() == {
        "file": [f"GET only streams JSONL: to build a file, POST the options to {JOBS}"],
    }
    assert jobs_written() == [] and queue.sent == []


def test_post_starts_a_job_with_the_options_and_answers_202(manager, queue, django_capture_on_commit_callbacks):
    body = {"file": "parquet", "format": "dpo", "pairs": "adjacent", "min_agreement": 0.5, "annotators": [manager.pk]}
    with django_capture_on_commit_callbacks(execute=True):
        response = api(manager).post(JOBS, body, format="json")

    assert response.status_code == 202
    job = response.json()
    assert job["status"] == "queued" and job["file_type"] == "parquet" and job["download_url"] is None
    assert response["Location"] == job["status_url"] == f"/api/v1/exports/{job['id']}/"
    assert jobs_written() == [job["id"]] and queue.args("export_file_task") == [(job["id"],)]
    assert export_job_get(job_id=job["id"]).options == {
        "format": "dpo",
        "pairs": "adjacent",
        "min_agreement": 0.5,
        "annotators": [manager.pk],
    }


def test_a_posted_job_is_built_by_the_worker_and_downloads(manager, django_capture_on_commit_callbacks):
    client = api(manager)
    with django_capture_on_commit_callbacks(execute=True):  # huey runs the task at once in tests
        job = client.post(JOBS, {"file": "jsonl", "format": "grpo"}, format="json").json()

    status = client.get(job["status_url"]).json()
    assert status["status"] == "succeeded" and status["rows"] == 2
    lines = b"".join(client.get(status["download_url"]).streaming_content).splitlines()
    assert [json.loads(line)["annotators"] for line in lines] == [1, 1]


@pytest.mark.parametrize(
    "body, field, message",
    [
        ({}, "file", "This field is required."),
        ({"file": "zip"}, "file", '"zip" is not a valid choice.'),
        ({"file": "parquet", "format": "xml"}, "format", "must be one of dpo, grpo, judgements, battles, not 'xml'"),
        ({"file": "parquet", "min_agreement": 2}, "min_agreement", "must be between 0 and 1"),
        ({"file": "parquet", "min_agreement": True}, "min_agreement", "True is not a number"),
        ({"file": "parquet", "conversational": 1}, "conversational", "1 is not a boolean"),
        ({"file": "parquet", "split_seed": 0}, "split_seed", "0 is not a string"),
        ({"file": "jsonl", "split_seed": "a\x00"}, "split_seed", "must not hold a NUL character or a lone surrogate"),
        ({"file": "jsonl", "writers": ["\ud800"]}, "writers", "must not hold a NUL character or a lone surrogate"),
        ({"file": "parquet", "annotators": ["x"]}, "annotators", "must be a list of ids"),
        ({"file": "parquet", "annotators": [0]}, "annotators", None),
    ],
)
def test_bad_job_options_are_a_400_naming_the_field_and_start_nothing(manager, queue, body, field, message):
    # sent as ASCII JSON, the way a client escapes a lone surrogate
    response = api(manager).post(JOBS, json.dumps(body), content_type="application/json")

    assert response.status_code == 400
    errors = response.json()
    assert list(errors) == [field]
    if message is not None:
        assert errors[field] == [message]
    assert jobs_written() == [] and queue.sent == []


@pytest.mark.parametrize("who, status", [("annotator", 403), ("outsider", 404)])
def test_only_managers_may_start_a_job(manager, queue, who, status):
    users = {
        "annotator": Membership.objects.get(project__slug="zeta", user__username="rater").user,
        "outsider": MembershipFactory(project=ProjectFactory(), role=Membership.Role.MANAGER).user,
    }

    assert api(users[who]).post(JOBS, {"file": "parquet"}, format="json").status_code == status
    assert jobs_written() == [] and queue.sent == []


def test_the_export_page_starts_files_only_from_its_post_form(client, manager, queue):
    client.force_login(manager)

    page = client.get("/projects/zeta/export/", {"action": "parquet", "format": "dpo"}).content.decode()

    assert jobs_written() == [] and queue.sent == []
    form = page[page.index('<form method="post" action="/projects/zeta/export/"') :]
    form = form[: form.index("</form>")]
    assert 'name="csrfmiddlewaretoken"' in form
    assert 'name="action" value="parquet"' in form and 'name="action" value="jsonl"' in form
