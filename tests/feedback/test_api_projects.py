"""The project API: who may call each endpoint, what it answers, and how it refuses bad input."""

import json

import pytest
from huey.contrib.djhuey import HUEY
from rest_framework.test import APIClient

from feedback.models import Membership, Prompt
from feedback.services.exports import export_job_get
from tests.factories import (
    CompletionFactory,
    MembershipFactory,
    ModelVersionFactory,
    ProjectFactory,
    UserFactory,
)
from tests.feedback.export_helpers import fast_password_hashing, make_prompt, rank

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _fast_hashing(settings):
    fast_password_hashing(settings)


@pytest.fixture
def huey_immediate():
    HUEY.immediate = True
    yield HUEY
    HUEY.immediate = False


@pytest.fixture
def world(staff_user):
    project = ProjectFactory(slug="alpha")
    other = ProjectFactory(slug="beta")
    annotator = MembershipFactory(project=project, user=UserFactory(username="ann")).user
    outsider = MembershipFactory(project=other, user=UserFactory(username="out")).user
    manager = MembershipFactory(project=project, user=UserFactory(username="boss"), role=Membership.Role.MANAGER).user
    prompt, completions = make_prompt(project, k=3)
    rank(annotator, prompt, [[completions[0]], [completions[1]], [completions[2]]])
    version = ModelVersionFactory(project=project)
    return {
        "project": project,
        "version": version,
        "prompt": prompt,
        "users": {
            "anonymous": None,
            "annotator": annotator,
            "outsider": outsider,
            "manager": manager,
            "staff": staff_user,
        },
    }


def client_for(user) -> APIClient:
    client = APIClient()
    if user is not None:
        client.force_login(user)
    return client


READ = {"anonymous": 401, "annotator": 200, "outsider": 404, "manager": 200, "staff": 200}
MANAGE = {"anonymous": 401, "annotator": 403, "outsider": 404, "manager": 200, "staff": 200}


@pytest.mark.parametrize("who", list(READ))
@pytest.mark.parametrize(
    "url, expected",
    [
        ("/api/v1/projects/alpha/", READ),
        ("/api/v1/projects/alpha/prompts/", READ),
        ("/api/v1/projects/alpha/completions/", READ),
        ("/api/v1/projects/alpha/model-versions/", READ),
        ("/api/v1/projects/alpha/export/?format=dpo", MANAGE),
    ],
)
def test_read_permissions(world, who, url, expected):
    response = client_for(world["users"][who]).get(url)
    assert response.status_code == expected[who]


@pytest.mark.parametrize("who", list(READ))
def test_project_list_shows_only_your_projects(world, who):
    response = client_for(world["users"][who]).get("/api/v1/projects/")
    if who == "anonymous":
        assert response.status_code == 401 and response["WWW-Authenticate"] == "Token"
        return
    slugs = {p["slug"]: p["role"] for p in response.json()["results"]}
    expected = {
        "annotator": {"alpha": "annotator"},
        "outsider": {"beta": "annotator"},
        "manager": {"alpha": "manager"},
        "staff": {"alpha": "manager", "beta": "manager"},
    }[who]
    assert slugs == expected


@pytest.mark.parametrize("who", list(READ))
def test_prompt_import_permissions(world, who):
    body = {"records": [{"prompt": "Fresh question?", "completions": ["One.", "Two."]}]}
    response = client_for(world["users"][who]).post("/api/v1/projects/alpha/prompts/", body, format="json")
    expected = {"anonymous": 401, "annotator": 403, "outsider": 404, "manager": 201, "staff": 201}[who]
    assert response.status_code == expected
    imported = Prompt.objects.filter(messages__0__content="Fresh question?").count()
    assert imported == (1 if expected == 201 else 0)
    if expected == 201:
        assert response.json() == {"prompts": 1, "completions": 2}


@pytest.mark.parametrize("who", list(READ))
def test_export_job_permissions(world, who, huey_immediate, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        started = client_for(world["users"]["manager"]).post(
            "/api/v1/projects/alpha/exports/", {"file": "parquet"}, format="json"
        )
    assert started.status_code == 202
    job = started.json()
    client = client_for(world["users"][who])
    status = client.get(job["status_url"])
    download = client.get(f"/api/v1/exports/{job['id']}/download/")
    assert status.status_code == download.status_code == MANAGE[who]
    if MANAGE[who] == 200:
        assert status.json()["status"] == "succeeded" and status.json()["rows"] == 3
        assert download["Content-Type"] == "application/vnd.apache.parquet"
        assert b"".join(download.streaming_content)[:4] == b"PAR1"


def test_export_job_is_queued_until_the_worker_runs_it(world, django_capture_on_commit_callbacks):
    client = client_for(world["users"]["manager"])
    response = client.post("/api/v1/projects/alpha/exports/", {"file": "jsonl", "format": "grpo"}, format="json")
    job = response.json()
    assert response.status_code == 202 and job["status"] == "queued" and job["download_url"] is None
    not_ready = client.get(f"/api/v1/exports/{job['id']}/download/")
    assert not_ready.status_code == 409
    assert export_job_get(job_id=job["id"]).options["format"] == "grpo"


def test_unknown_export_job_is_404(world):
    client = client_for(world["users"]["staff"])
    assert client.get("/api/v1/exports/" + "0" * 32 + "/").status_code == 404
    assert client.get("/api/v1/exports/..%2F..%2Fetc/").status_code == 404


def test_streamed_export_is_jsonl(world):
    response = client_for(world["users"]["manager"]).get("/api/v1/projects/alpha/export/?format=dpo&pairs=adjacent")
    assert response.status_code == 200
    assert response["Content-Type"] == "application/jsonl"
    assert 'filename="alpha-dpo.jsonl"' in response["Content-Disposition"]
    lines = b"".join(response.streaming_content).decode().splitlines()
    assert len(lines) == 2
    assert {"prompt", "chosen", "rejected", "votes", "agreement", "weight"} <= set(json.loads(lines[0]))


@pytest.mark.parametrize(
    "query, field",
    [
        ("format=csv", "format"),
        ("pairs=most", "pairs"),
        ("min_agreement=2", "min_agreement"),
        ("min_agreement=high", "min_agreement"),
        ("created_from=yesterday", "created_from"),
        ("conversational=", "conversational"),
        ("split_seed=", "split_seed"),
        ("annotators=x", "annotators"),
        ("model_versions=9223372036854775808", "model_versions"),
        ("split=dev", "split"),
        ("test_fraction=1", "test_fraction"),
        ("file=parquet", "file"),
    ],
)
def test_export_refuses_bad_options(world, query, field):
    response = client_for(world["users"]["manager"]).get(f"/api/v1/projects/alpha/export/?{query}")
    assert response.status_code == 400
    assert field in response.json()


@pytest.mark.parametrize(
    "url",
    [
        "/api/v1/projects/alpha/prompts/?ordering=annotator__password",
        "/api/v1/projects/alpha/completions/?ordering=prompt__project__members__password",
        "/api/v1/projects/alpha/completions/?prompt=abc",
        "/api/v1/projects/alpha/completions/?ordering=",
        "/api/v1/projects/alpha/completions/?prompt=9223372036854775808",
    ],
)
def test_orderings_and_filters_are_allow_listed(world, url):
    response = client_for(world["users"]["staff"]).get(url)
    assert response.status_code == 400


def test_completion_list_filters_by_prompt_and_orders(world):
    prompt = world["prompt"]
    other, _ = make_prompt(world["project"], k=2)
    client = client_for(world["users"]["annotator"])
    page = client.get(f"/api/v1/projects/alpha/completions/?prompt={prompt.pk}&ordering=-id").json()
    ids = [c["id"] for c in page["results"]]
    assert page["count"] == 3 and ids == sorted(ids, reverse=True)
    assert {c["prompt"] for c in page["results"]} == {prompt.pk}
    CompletionFactory(prompt=other, text="<script>alert(1)</script>", html="")
    assert client.get("/api/v1/projects/alpha/completions/").json()["count"] == 6


def test_prompt_list_is_paginated(world, settings):
    for _ in range(55):
        make_prompt(world["project"], k=0)
    client = client_for(world["users"]["annotator"])
    first = client.get("/api/v1/projects/alpha/prompts/").json()
    assert first["count"] == 56 and len(first["results"]) == 50 and first["next"]
    assert len(client.get("/api/v1/projects/alpha/prompts/?page=2").json()["results"]) == 6
    for page in ("9", "0", "-1", "", "x"):
        assert client.get(f"/api/v1/projects/alpha/prompts/?page={page}").status_code == 404


@pytest.mark.parametrize(
    "body, problem",
    [
        ({"records": [{"prompt": ""}]}, {"line": 1, "field": "prompt", "message": "is empty"}),
        (
            {"records": [{"prompt": "ok"}, {"prompt": [{"role": "robot", "content": "x"}]}]},
            {"line": 2, "field": "prompt[0].role"},
        ),
        ({"records": [{"prompt": "ok", "id": "q1"}, {"prompt": "again", "id": "q1"}]}, {"line": 2, "field": "id"}),
        ({"records": [{"prompt": "ok", "completions": "one"}]}, {"line": 1, "field": "completions"}),
        ({"records": [{"prompt": "ok", "is_staff": True}]}, {"line": 1, "field": "is_staff"}),
    ],
)
def test_prompt_import_names_each_problem_and_imports_nothing(world, body, problem):
    before = Prompt.objects.count()
    response = client_for(world["users"]["manager"]).post("/api/v1/projects/alpha/prompts/", body, format="json")
    assert response.status_code == 400
    problems = response.json()["problems"]
    assert any(problem.items() <= p.items() for p in problems), problems
    assert Prompt.objects.count() == before


@pytest.mark.parametrize(
    "body, line",
    [
        ({}, 0),
        ({"records": []}, 0),
        ({"records": "not a list"}, 0),
        ([{"prompt": "bare list"}], 0),
        ({"records": [1, 2]}, 1),
    ],
)
def test_prompt_import_refuses_malformed_bodies(world, body, line):
    response = client_for(world["users"]["manager"]).post("/api/v1/projects/alpha/prompts/", body, format="json")
    assert response.status_code == 400
    assert response.json()["problems"][0]["line"] == line
    assert Prompt.objects.count() == 1


def test_prompt_import_refuses_non_json(world):
    client = client_for(world["users"]["manager"])
    response = client.post("/api/v1/projects/alpha/prompts/", "{not json", content_type="application/json")
    assert response.status_code == 400
    form = client.post("/api/v1/projects/alpha/prompts/", {"records": "x"}, format="multipart")
    assert form.status_code == 415


def test_model_versions_list(world):
    results = client_for(world["users"]["annotator"]).get("/api/v1/projects/alpha/model-versions/").json()["results"]
    assert len(results) == 1 and set(results[0]) == {
        "id",
        "name",
        "parent_version",
        "produced_by_run",
        "metrics",
        "kind",
        "is_active",
        "gate",
        "created_at",
    }
    assert results[0]["kind"] == "policy" and results[0]["gate"] == {}


def test_token_auth_works(world):
    from rest_framework.authtoken.models import Token

    token = Token.objects.create(user=world["users"]["annotator"])
    client = APIClient()
    assert client.get("/api/v1/projects/alpha/", HTTP_AUTHORIZATION=f"Token {token.key}").status_code == 200
    refused = client.get("/api/v1/projects/alpha/", HTTP_AUTHORIZATION="Token wrong")
    assert refused.status_code == 401 and refused["WWW-Authenticate"] == "Token"
    assert refused.json() == {"detail": "Invalid token."}


def test_api_docs_page_uses_local_assets_and_no_inline_script(client):
    response = client.get("/api/docs/")
    html = response.content.decode()
    assert response.status_code == 200
    assert "/static/vendor/swagger-ui/swagger-ui-bundle.js" in html and "/static/js/swagger-init.js" in html
    assert "<script>" not in html and "cdn" not in html.lower()
    assert "script-src 'self'" in response["Content-Security-Policy"]


def test_an_empty_date_range_exports_nothing(world):
    client = client_for(world["users"]["manager"])
    query = "created_from=2026-02-01T00:00Z&created_before=2026-01-01T00:00Z"
    response = client.get(f"/api/v1/projects/alpha/export/?{query}")
    assert response.status_code == 200 and b"".join(response.streaming_content) == b""


@pytest.mark.parametrize("who", list(READ))
def test_promote_permissions(world, who):
    version = world["version"]
    response = client_for(world["users"][who]).post(
        f"/api/v1/model-versions/{version.pk}/promote/", {"generate": False}, format="json"
    )
    assert response.status_code == MANAGE[who]
    version.refresh_from_db()
    assert version.is_active == (MANAGE[who] == 200)
    if MANAGE[who] == 200:
        assert response.json()["is_active"] is True


def test_promote_switches_the_active_version(world, django_capture_on_commit_callbacks):
    first = world["version"]
    second = ModelVersionFactory(project=world["project"])
    client = client_for(world["users"]["manager"])
    client.post(f"/api/v1/model-versions/{first.pk}/promote/", {"generate": False}, format="json")
    with django_capture_on_commit_callbacks() as callbacks:
        client.post(f"/api/v1/model-versions/{second.pk}/promote/", {}, format="json")
    first.refresh_from_db()
    second.refresh_from_db()
    assert (first.is_active, second.is_active) == (False, True)
    assert len(callbacks) == 1  # the next round of completions is queued


@pytest.mark.parametrize(
    "path, body, status",
    [
        ("{pk}", {"generate": "maybe"}, 400),
        ("{pk}", {"generate": 0}, 400),
        ("{pk}", "not json", 400),
        ("999999", {}, 404),
        ("abc", {}, 404),
        ("9223372036854775808", {}, 404),
    ],
)
def test_promote_refuses_bad_input(world, path, body, status):
    client = client_for(world["users"]["staff"])
    url = f"/api/v1/model-versions/{path.format(pk=world['version'].pk)}/promote/"
    if isinstance(body, str):
        response = client.post(url, body, content_type="application/json")
    else:
        response = client.post(url, body, format="json")
    assert response.status_code == status
    assert response["Content-Type"] == "application/json"
    world["version"].refresh_from_db()
    assert not world["version"].is_active
