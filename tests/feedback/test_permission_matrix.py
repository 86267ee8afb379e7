"""Every page and API endpoint, for every kind of caller, answers exactly the status in the table below.

The URLs come from the resolver, so a new page or endpoint without a row here fails the test. The
API's rows are also held against the generated schema: the operation documents exactly the 401 and
403 it answers (403 also on writes, for a session without its CSRF token), every 404 it answers, and the
429 that any operation gives an address that keeps sending wrong tokens.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import pytest
from django.db import transaction
from django.urls import URLPattern, URLResolver, get_resolver
from drf_spectacular.generators import SchemaGenerator
from rest_framework.test import APIClient

from feedback.models import Membership, TrainingRun
from feedback.selectors.preferences import PreferenceExportOptions
from feedback.services.exports import export_job_start
from feedback.services.throttling import token_failure_record
from tests.factories import (
    CompletionFactory,
    MembershipFactory,
    ModelVersionFactory,
    ProjectFactory,
    PromptFactory,
    TrainingRunFactory,
    UserFactory,
)
from tests.feedback.export_helpers import compare

pytestmark = pytest.mark.django_db

WHO = ("anonymous", "annotator", "reviewer", "other manager", "manager", "staff")


def members(ok: int) -> dict[str, int]:
    """Any member of the project (and staff) gets `ok`; a manager of another project is told it does not exist."""
    return {"annotator": ok, "reviewer": ok, "other manager": 404, "manager": ok, "staff": ok}


def managers(ok: int) -> dict[str, int]:
    return {"annotator": 403, "reviewer": 403, "other manager": 404, "manager": ok, "staff": ok}


def reviewers(ok: int) -> dict[str, int]:
    return {"annotator": 403, "reviewer": ok, "other manager": 404, "manager": ok, "staff": ok}


def everyone(ok: int) -> dict[str, int]:
    return dict.fromkeys(WHO[1:], ok)


@dataclass
class Cell:
    method: str
    expected: dict[str, int]  # for the signed-in callers; the anonymous one is in `anonymous`
    query: str = ""
    anonymous: int | None = None  # None: 302 to the login page for a page, 401 for the API
    kwargs: dict[str, str] = field(default_factory=dict)


# url name -> the request and its answers. Writes carry no valid body: a member's request gets past the
# access check to the form or serializer (400), or does the harmless thing it asks for.
TABLE: dict[str, Cell] = {
    "healthz": Cell("get", everyone(200), anonymous=200),
    "login": Cell("get", everyone(200), anonymous=200),
    "logout": Cell("post", everyone(302), anonymous=302),
    "admin:index": Cell("get", {**everyone(302), "staff": 200}),
    "api-schema": Cell("get", everyone(200), anonymous=200),
    "api-docs": Cell("get", everyone(200), anonymous=200),
    "home": Cell("get", everyone(200)),
    "annotate": Cell("get", members(200)),
    "annotate-next": Cell("get", members(200)),
    "annotate-submit": Cell("post", members(400)),
    "annotate-skip": Cell("post", members(400)),
    "export": Cell("get", managers(200)),
    "quality": Cell("get", reviewers(200)),
    "quality-annotator-exclusion": Cell("post", managers(302)),
    "review": Cell("get", reviewers(200)),
    "review-item": Cell("get", reviewers(200)),
    "review-verdict": Cell("post", reviewers(400)),
    "review-undo": Cell("post", reviewers(400)),
    "models": Cell("get", reviewers(200)),
    "models-evaluate": Cell("post", managers(400)),
    "training": Cell("get", members(200)),
    "training-history": Cell("get", members(200)),
    "training-watch": Cell("get", members(200), query="?after=0"),  # the queued run is newer
    "training-retrain": Cell("post", managers(302)),
    "training-settings": Cell("post", managers(400)),
    "training-run-live": Cell("get", members(200)),
    "training-run-cancel": Cell("post", managers(302)),
    "training-version-promote": Cell("post", managers(302)),
    "training-side-by-side": Cell("get", managers(200)),
    "training-rounds": Cell("get", members(200)),
    "training-round-new": Cell("post", managers(302)),
    "api:projects": Cell("get", everyone(200)),
    "api:project": Cell("get", members(200)),
    "api:project-prompts": Cell("get", members(200)),
    "api:project-prompts POST": Cell("post", managers(400)),
    "api:project-completions": Cell("get", members(200)),
    "api:project-prompt-gold": Cell("post", managers(400)),
    "api:project-model-versions": Cell("get", members(200)),
    "api:project-model-version-side-by-side": Cell("get", managers(200)),
    "api:project-next-task": Cell("get", members(200)),
    "api:project-judgements": Cell("post", members(400)),
    "api:project-export": Cell("get", managers(200), query="?format=dpo"),
    "api:project-exports": Cell("post", managers(400)),
    "api:model-version-promote": Cell("post", managers(200)),
    "api:project-quality": Cell("get", reviewers(200)),
    "api:project-quality-annotator": Cell("get", reviewers(200)),
    "api:project-annotator-exclude": Cell("post", managers(200)),
    "api:project-annotator-include": Cell("post", managers(200)),
    "api:project-review": Cell("get", reviewers(200)),
    "api:project-review-item": Cell("get", reviewers(200)),
    "api:project-review-verdict": Cell("post", reviewers(400)),
    "api:project-review-undo": Cell("post", reviewers(400)),
    "api:project-rounds": Cell("get", members(200)),
    "api:project-rounds POST": Cell("post", managers(202)),
    "api:project-evaluations": Cell("post", managers(400)),
    "api:project-leaderboard": Cell("get", reviewers(200)),
    "api:project-training-runs": Cell("get", members(200)),
    "api:project-training-runs POST": Cell("post", managers(409)),
    "api:training-run": Cell("get", members(200)),
    "api:training-run-cancel": Cell("post", managers(200)),
    "api:export-job": Cell("get", managers(200)),
    "api:export-download": Cell("get", managers(409)),
}


def _patterns(resolvers: list[Any], prefix: str = "", namespace: str = "") -> dict[str, str]:
    """url name (with its namespace) -> the route, for every named pattern the project serves."""
    routes: dict[str, str] = {}
    for entry in resolvers:
        if isinstance(entry, URLResolver):
            inner = f"{namespace}{entry.namespace}:" if entry.namespace else namespace
            if inner == "admin:":  # Django's admin checks is_staff itself; its front door stands for it
                routes["admin:index"] = prefix + str(entry.pattern)
                continue
            routes |= _patterns(entry.url_patterns, prefix + str(entry.pattern), inner)
        elif isinstance(entry, URLPattern) and entry.name:
            routes[namespace + entry.name] = prefix + str(entry.pattern)
    return routes


ROUTES = _patterns(get_resolver().url_patterns)


def test_every_url_has_a_row():
    named = {name.split(" ")[0] for name in TABLE}
    assert set(ROUTES) == named


@pytest.fixture
def world(staff_user, settings, tiny_model_dir):
    settings.BASE_MODEL = str(tiny_model_dir)  # /healthz answers 200 only with a base model on disk
    project = ProjectFactory(slug="alpha", mode="pairwise", completions_per_prompt=2)
    other = ProjectFactory(slug="beta")
    pairs = [CompletionFactory.create_batch(2, prompt=PromptFactory(project=project)) for _ in range(2)]
    users = {"anonymous": None, "staff": staff_user}
    for who, where, role in [
        ("annotator", project, Membership.Role.ANNOTATOR),
        ("reviewer", project, Membership.Role.REVIEWER),
        ("manager", project, Membership.Role.MANAGER),
        ("other manager", other, Membership.Role.MANAGER),
    ]:
        users[who] = MembershipFactory(project=where, role=role, user=UserFactory()).user
    left, right = pairs[0]
    compare(users["annotator"], left, right, "a")  # an item for the review pages
    version = ModelVersionFactory(project=project, metrics={"side_by_side": {"status": "queued"}})
    run = TrainingRunFactory(project=project, status=TrainingRun.Status.QUEUED)
    job = export_job_start(project=project, options=PreferenceExportOptions(), file_type="jsonl", requested_by_id=None)
    ids = {
        "slug": "alpha",
        "run_id": str(run.pk),
        "version_id": str(version.pk),
        "version_name": version.name,
        "job_id": job.id,
        "username": users["annotator"].username,
        "prompt_id": str(project.prompts.first().pk),
        "item_key": f"c{left.pk}-{right.pk}",
    }
    return {"users": users, "ids": ids}


def _path(name: str, ids: dict[str, str]) -> str:
    route = ROUTES[name.split(" ")[0]]
    return "/" + re.sub(r"<(?:\w+:)?(\w+)>", lambda m: ids[m.group(1)], route)


def _call(name: str, cell: Cell, user: Any, ids: dict[str, str]) -> int:
    client = APIClient()
    if user is not None:
        client.force_login(user)
    url = _path(name, ids) + cell.query
    if cell.method == "post":
        return client.post(url, {}, format="json" if name.startswith("api:") else None).status_code
    return client.get(url).status_code


def _expected(name: str, cell: Cell) -> dict[str, int]:
    anonymous = cell.anonymous or (401 if name.startswith("api:") else 302)
    return {"anonymous": anonymous, **cell.expected}


@pytest.mark.parametrize("name", TABLE)
def test_each_caller_gets_exactly_its_status(name, world, queue):
    cell = TABLE[name]
    observed = {}
    for who in WHO:
        with transaction.atomic():  # each caller meets the same world: what one changes is rolled back
            observed[who] = _call(name, cell, world["users"][who], world["ids"])
            transaction.set_rollback(True)
    assert observed == _expected(name, cell)


SCHEMA = SchemaGenerator().get_schema(request=None, public=True)


@pytest.mark.parametrize("name", [name for name in TABLE if name.startswith("api:")])
def test_the_schema_documents_exactly_the_refusals(name):
    cell = TABLE[name]
    path = "/" + re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", ROUTES[name.split(" ")[0]])
    documented = {int(code) for code in SCHEMA["paths"][path][cell.method]["responses"]}
    answered = set(_expected(name, cell).values())
    csrf = {403} if cell.method == "post" else set()
    assert documented & {401, 403} == (answered & {401, 403}) | csrf
    assert answered & {404} <= documented
    assert 429 in documented  # any operation, to an address that keeps sending wrong tokens (below)


@pytest.mark.parametrize("name", [name for name in TABLE if name.startswith("api:")])
def test_every_operation_answers_429_to_an_address_that_keeps_sending_wrong_tokens(name):
    for _ in range(21):
        token_failure_record(address="203.0.113.7")
    cell = TABLE[name]
    client = APIClient(HTTP_AUTHORIZATION="Token wrong", REMOTE_ADDR="203.0.113.7")
    # refused before they are looked up
    ids = {
        "slug": "alpha",
        "run_id": "1",
        "version_id": "1",
        "version_name": "v1",
        "job_id": "1",
        "username": "someone",
        "prompt_id": "1",
        "item_key": "c1-2",
    }
    response = getattr(client, cell.method)(_path(name, ids) + cell.query)
    assert response.status_code == 429
    assert response.json()["detail"].startswith("Too many failed token authentications from your address.")


def test_the_project_list_answers_the_404_it_documents(staff_user):
    client = APIClient()
    client.force_login(staff_user)
    response = client.get("/api/v1/projects/?page=2")  # past the last page
    assert response.status_code == 404 and response.json() == {"detail": "Invalid page."}
    assert "404" in SCHEMA["paths"]["/api/v1/projects/"]["get"]["responses"]
