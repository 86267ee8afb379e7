"""The quality API and page: the same figures, reviewers and managers only, bad filters named."""

from __future__ import annotations

import pytest
from rest_framework.test import APIClient

from feedback.models import Membership
from tests.factories import MembershipFactory, ProjectFactory, UserFactory
from tests.feedback.export_helpers import compare, make_prompt

pytestmark = pytest.mark.django_db


@pytest.fixture
def judged():
    project = ProjectFactory(slug="judged", mode="pairwise", completions_per_prompt=2)
    people = [MembershipFactory(project=project, user=UserFactory(username=f"ann-{n}")).user for n in range(3)]
    for choices in (["a", "a", "a"], ["a", "b", "tie"], ["b", "b", "a"]):
        _, (low, high) = make_prompt(project, k=2)
        for person, choice in zip(people, choices, strict=True):
            compare(person, low, high, choice)
    reviewer = MembershipFactory(project=project, role=Membership.Role.REVIEWER).user
    return {"project": project, "reviewer": reviewer, "annotator": people[0]}


def _client(user) -> APIClient:
    client = APIClient()
    client.force_login(user)
    return client


def test_the_api_gives_agreement_splits_and_annotators(judged):
    body = _client(judged["reviewer"]).get("/api/v1/projects/judged/quality/").json()
    assert body["mode"] == "pairwise" and body["judgements"] == 9 and body["filters"] == {}
    assert body["agreement"]["units"] == 3 and body["agreement"]["level"] == "nominal"
    assert isinstance(body["agreement"]["alpha"], float)
    assert (body["splits"]["unanimous"], body["splits"]["majority"], body["splits"]["no_majority"]) == (1, 1, 1)
    assert body["splits"]["most_split"][0]["votes"] == {"first": 1, "second": 1, "tie": 1}
    assert [a["username"] for a in body["annotators"]] == ["ann-0", "ann-1", "ann-2"]
    assert all((a["gold_accuracy"], a["gold_decisions"]) == (None, 0) for a in body["annotators"])  # no gold items
    assert body["gold"].startswith("Gold accuracy: the share of decisions on gold items")
    assert body["thresholds"]["too_fast_median_seconds"] == 4.0


def test_one_annotators_figures_match_the_projects(judged):
    client = _client(judged["reviewer"])
    everyone = client.get("/api/v1/projects/judged/quality/").json()["annotators"]
    one = client.get("/api/v1/projects/judged/quality/annotators/ann-2/").json()
    assert one == next(a for a in everyone if a["username"] == "ann-2")
    assert one["judgements"] == 3 and one["first_chosen"] == 2 and one["tie_rate"] == pytest.approx(1 / 3)
    assert client.get("/api/v1/projects/judged/quality/annotators/nobody/").status_code == 404


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("created_from=last+week", "created_from"),
        ("model_version=v404", "model_version"),
        ("metadata_value=python", "metadata_key"),
        ("ordering=alpha", "ordering"),
        ("model_version=", "model_version"),
    ],
)
def test_a_bad_filter_is_a_400_naming_the_field(judged, query, field):
    client = _client(judged["reviewer"])
    for url in ("/api/v1/projects/judged/quality/", "/api/v1/projects/judged/quality/annotators/ann-0/"):
        response = client.get(f"{url}?{query}")
        assert response.status_code == 400
        assert field in response.json()


@pytest.mark.parametrize("field", ["model_version", "metadata_key", "metadata_value"])
def test_a_nul_in_a_filter_is_a_400_naming_the_field(judged, field):
    query = {"metadata_key": "topic", "metadata_value": "python", field: "v1\x00"}
    response = _client(judged["reviewer"]).get("/api/v1/projects/judged/quality/", query)
    assert (response.status_code, response.json()) == (400, {field: ["must not hold a NUL character."]})


def test_filters_are_echoed_and_applied(judged):
    body = _client(judged["reviewer"]).get("/api/v1/projects/judged/quality/?created_from=2100-01-01").json()
    assert body["filters"] == {"created_from": "2100-01-01T00:00:00+00:00"}
    assert body["judgements"] == 0 and body["agreement"]["alpha"] is None


def test_an_annotator_cannot_see_the_figures_and_a_stranger_is_told_nothing(judged):
    annotator = _client(judged["annotator"])
    assert annotator.get("/api/v1/projects/judged/quality/").status_code == 403
    assert annotator.get("/api/v1/projects/judged/quality/annotators/ann-0/").status_code == 403
    assert annotator.get("/projects/judged/quality/").status_code == 403
    stranger = _client(UserFactory())
    assert stranger.get("/api/v1/projects/judged/quality/").status_code == 404
    assert stranger.get("/projects/judged/quality/").status_code == 404


def test_the_page_shows_the_same_figures_and_the_thresholds(judged):
    client = _client(judged["reviewer"])
    alpha = client.get("/api/v1/projects/judged/quality/").json()["agreement"]["alpha"]
    page = client.get("/projects/judged/quality/")
    html = page.content.decode()
    assert page.status_code == 200
    assert f"{alpha:.3f}" in html
    assert 'id="annotator-ann-2"' in html
    assert "below chance on gold when the 95 % interval" in html
    assert "too fast below a median of 4.0 s" in html


def test_the_page_names_a_bad_filter(judged):
    page = _client(judged["reviewer"]).get("/projects/judged/quality/?created_before=soon")
    assert page.status_code == 400
    assert "created_before:" in page.content.decode()


def test_the_page_says_when_there_is_not_enough_overlap():
    project = ProjectFactory(slug="lonely", mode="pairwise", completions_per_prompt=2)
    manager = MembershipFactory(project=project, role=Membership.Role.MANAGER).user
    _, (low, high) = make_prompt(project, k=2)
    compare(manager, low, high, "a")
    html = _client(manager).get("/projects/lonely/quality/").content.decode()
    assert "Not enough overlap" in html


def test_reviewers_and_managers_find_the_page_from_home(judged):
    assert "/projects/judged/quality/" in _client(judged["reviewer"]).get("/").content.decode()
    assert "/projects/judged/quality/" not in _client(judged["annotator"]).get("/").content.decode()
