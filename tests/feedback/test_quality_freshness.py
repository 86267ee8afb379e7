"""The unfiltered quality figures come from the cache with their freshness; stale ones say so and are recomputed."""

from __future__ import annotations

from datetime import timedelta

import pytest
from rest_framework.test import APIClient

from feedback.models import Assignment, Membership
from feedback.selectors import quality
from feedback.tasks import quality_figures_task
from tests.factories import AssignmentFactory, MembershipFactory, ProjectFactory, UserFactory
from tests.feedback.export_helpers import compare, make_prompt

pytestmark = pytest.mark.django_db

URL = "/api/v1/projects/fresh/quality/"


@pytest.fixture
def judged():
    project = ProjectFactory(slug="fresh", mode="pairwise", completions_per_prompt=2)
    people = [MembershipFactory(project=project, user=UserFactory(username=f"ann-{n}")).user for n in range(3)]
    for choices in (["a", "a", "a"], ["a", "b", "tie"]):
        _, (low, high) = make_prompt(project, k=2)
        for person, choice in zip(people, choices, strict=True):
            compare(person, low, high, choice)
    reviewer = MembershipFactory(project=project, role=Membership.Role.REVIEWER).user
    client = APIClient()
    client.force_login(reviewer)
    return {"project": project, "people": people, "client": client}


def _judge_again(judged) -> None:
    _, (low, high) = make_prompt(judged["project"], k=2)
    compare(judged["people"][0], low, high, "a")


@pytest.fixture
def passes(monkeypatch) -> list[int]:
    """Counts the full passes over the project's judgements."""
    counted: list[int] = []
    real = quality.project_quality

    def counting(**kwargs):
        counted.append(1)
        return real(**kwargs)

    monkeypatch.setattr(quality, "project_quality", counting)
    return counted


@pytest.fixture
def slow(monkeypatch) -> None:
    """As on a large project: a full pass is too slow to repeat inside a request."""
    monkeypatch.setattr(quality, "INLINE_SECONDS", 0.0)


def test_the_unfiltered_figures_are_computed_once_and_served_with_their_time(judged, passes):
    first = judged["client"].get(URL).json()
    second = judged["client"].get(URL).json()
    assert len(passes) == 1
    assert first == second
    assert first["judgements"] == 6 and first["stale"] is False and first["computed_at"]
    assert first["freshness"].startswith("Computed at ") and first["freshness"].endswith("from every judgement.")


def test_a_fast_project_is_recomputed_in_the_request_after_a_new_judgement(judged, passes):
    assert judged["client"].get(URL).json()["judgements"] == 6
    _judge_again(judged)
    body = judged["client"].get(URL).json()
    assert body["judgements"] == 7 and body["stale"] is False and len(passes) == 2


def test_a_slow_project_serves_the_cached_figures_marked_stale_and_queues_one_recompute(
    judged, passes, slow, queue, django_capture_on_commit_callbacks
):
    before = judged["client"].get(URL).json()
    _judge_again(judged)
    with django_capture_on_commit_callbacks(execute=True):
        stale = judged["client"].get(URL).json()
        again = judged["client"].get(URL).json()
    assert stale["judgements"] == 6 and stale["stale"] is True and again["stale"] is True
    assert stale["computed_at"] == before["computed_at"]
    assert "1 new judgement" in stale["freshness"] and "being computed" in stale["freshness"]
    assert queue.args("quality_figures_task") == [(judged["project"].pk,)]  # once, not per request
    assert len(passes) == 1

    quality_figures_task.call_local(judged["project"].pk)
    fresh = judged["client"].get(URL).json()
    assert fresh["judgements"] == 7 and fresh["stale"] is False and fresh["computed_at"] > before["computed_at"]


def test_new_skips_make_the_figures_stale(judged, slow, queue, django_capture_on_commit_callbacks):
    judged["client"].get(URL)
    AssignmentFactory(
        prompt=make_prompt(judged["project"], k=2)[0],
        annotator=judged["people"][1],
        state=Assignment.State.SKIPPED,
        slot=None,
        skip_reason="",
    )
    with django_capture_on_commit_callbacks(execute=True):
        body = judged["client"].get(URL).json()
    assert body["stale"] is True and "1 new skip" in body["freshness"]


def test_figures_older_than_the_maximum_age_are_stale(judged, slow, queue, monkeypatch):
    judged["client"].get(URL)
    monkeypatch.setattr(quality, "MAX_AGE", timedelta(0))
    body = judged["client"].get(URL).json()
    assert body["stale"] is True and "older than 0 minutes" in body["freshness"]


def test_filtered_figures_are_computed_for_the_request(judged, passes):
    judged["client"].get(URL)
    body = judged["client"].get(f"{URL}?metadata_key=topic&metadata_value=none").json()
    assert body["judgements"] == 0 and body["stale"] is False and body["freshness"] == "Computed for this request."
    assert len(passes) == 2


def test_the_page_and_one_annotators_figures_say_how_fresh_they_are(judged, slow, queue):
    body = judged["client"].get(URL).json()
    page = judged["client"].get("/projects/fresh/quality/").content.decode()
    assert body["freshness"] in page
    _judge_again(judged)
    page = judged["client"].get("/projects/fresh/quality/").content.decode()
    assert 'class="freshness stale"' in page and "1 new judgement" in page
    one = judged["client"].get(f"{URL}annotators/ann-0/")
    assert one["Quality-Stale"] == "true" and one["Quality-Computed-At"]
    assert one.json()["judgements"] == 2  # the cached figures, as the project's
