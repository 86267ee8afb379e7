"""A task whose stored data cannot be shown never locks an annotator in: it is skipped, and next-task moves on.

The bad rows are written directly, as data stored before import checks existed (or edited by hand) would be.
"""

import logging
import re

import pytest
from django.test import Client
from django.urls import reverse
from rest_framework.test import APIClient

from feedback.models import Assignment, Completion, Prompt
from tests.factories import CompletionFactory, MembershipFactory, ProjectFactory, PromptFactory, UserFactory

pytestmark = pytest.mark.django_db

HTMX = {"HTTP_HX_REQUEST": "true"}
LONE_SURROGATE = [{"role": "user", "content": "Hi \ud800 there"}]
# PostgreSQL refuses a lone surrogate in JSON, so no such prompt can be stored there to be skipped.
NO_SURROGATES_ON_POSTGRESQL = pytest.mark.sqlite_only("other databases cannot store a lone surrogate at all")
SURROGATE_REASON = (
    "Cannot be shown: the content of message 1 of the prompt holds a lone surrogate (\\ud800) at character 4."
)


def project_with(*messages_of_prompts, mode="ranking", k=3):
    """A project whose prompts (served in this order) have these messages, K completions each."""
    project = ProjectFactory(mode=mode, completions_per_prompt=k)
    prompts = []
    for messages in messages_of_prompts:
        prompt = PromptFactory(project=project, messages=messages)
        CompletionFactory.create_batch(k, prompt=prompt)
        prompts.append(prompt)
    user = UserFactory()
    MembershipFactory(user=user, project=project)
    return project, user, prompts


def good(n: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Question {n}?"}]


def api_next_task(project, user):
    client = APIClient()
    client.force_authenticate(user)
    return client.get(reverse("api:project-next-task", args=[project.slug]))


def shown_task_ids(html: str) -> list[int]:
    return [int(task_id) for task_id in re.findall(r'data-task-id="(\d+)"', html)]


@NO_SURROGATES_ON_POSTGRESQL
def test_the_api_skips_a_prompt_with_a_lone_surrogate_and_serves_the_next(caplog):
    project, user, (bad, fine) = project_with(LONE_SURROGATE, good(1))
    with caplog.at_level(logging.WARNING, logger="feedback.services.assignments"):
        response = api_next_task(project, user)
    assert response.status_code == 200
    assert response.json()["prompt"] == good(1)
    skipped = Assignment.objects.get(annotator=user, prompt=bad)
    assert (skipped.state, skipped.skip_reason, skipped.slot, skipped.annotator_slot) == (
        "skipped",
        SURROGATE_REASON,
        None,
        None,
    )
    [record] = [r for r in caplog.records if r.name == "feedback.services.assignments"]
    assert record.levelno == logging.WARNING
    assert f"(prompt {bad.pk})" in record.getMessage() and SURROGATE_REASON in record.getMessage()
    # the next call resumes the good task; the bad one is never served to this annotator again
    again = api_next_task(project, user)
    assert again.json()["task_id"] == response.json()["task_id"]
    assert Assignment.objects.filter(annotator=user).count() == 2


@NO_SURROGATES_ON_POSTGRESQL
def test_the_api_answers_204_when_the_only_task_left_cannot_be_shown():
    project, user, (bad,) = project_with(LONE_SURROGATE)
    assert api_next_task(project, user).status_code == 204
    assert Assignment.objects.get(annotator=user, prompt=bad).skip_reason == SURROGATE_REASON
    assert api_next_task(project, user).status_code == 204


@NO_SURROGATES_ON_POSTGRESQL
def test_a_lease_held_on_a_prompt_that_went_bad_is_skipped_not_renewed():
    project, user, (first, second) = project_with(good(1), good(2))
    stuck = api_next_task(project, user).json()["task_id"]
    Prompt.objects.filter(pk=first.pk).update(messages=LONE_SURROGATE)
    response = api_next_task(project, user)
    assert response.status_code == 200 and response.json()["prompt"] == good(2)
    assert Assignment.objects.get(pk=stuck).state == "skipped"


@pytest.mark.parametrize(
    ("messages", "reason"),
    [
        ({"role": "user", "content": "not a list"}, "the prompt's messages are not a list of turns"),
        ([], "the prompt's messages are not a list of turns"),
        (["just text"], "message 1 of the prompt is not a role and a content"),
        ([{"role": "user"}], "the content of message 1 of the prompt is not text"),
        (
            [{"role": "user", "content": "Hi"}, {"role": 7, "content": "x"}],
            "the role of message 2 of the prompt is not text",
        ),
    ],
)
def test_messages_that_are_not_turns_of_text_are_skipped_with_the_reason(messages, reason):
    project, user, (bad, _) = project_with(messages, good(1))
    response = api_next_task(project, user)
    assert response.status_code == 200 and response.json()["prompt"] == good(1)
    assert Assignment.objects.get(annotator=user, prompt=bad).skip_reason == f"Cannot be shown: {reason}."


def test_a_ranking_task_whose_completion_was_deleted_is_skipped():
    project, user, (first, second) = project_with(good(1), good(2))
    held = api_next_task(project, user).json()
    gone = held["completions"][1]["id"]
    Completion.objects.filter(pk=gone).delete()
    response = api_next_task(project, user)
    assert response.status_code == 200 and response.json()["prompt"] == good(2)
    skipped = Assignment.objects.get(pk=held["task_id"])
    assert skipped.skip_reason == f"Cannot be shown: completion {gone} of the task no longer exists."


@NO_SURROGATES_ON_POSTGRESQL
def test_the_annotate_page_and_its_prefetch_skip_tasks_that_cannot_be_shown():
    project, user, (bad, first, also_bad, second, third) = project_with(
        LONE_SURROGATE, good(1), LONE_SURROGATE, good(2), good(3)
    )
    client = Client()
    client.force_login(user)
    response = client.get(reverse("annotate", args=[project.slug]))
    assert response.status_code == 200
    current, prefetched = shown_task_ids(response.content.decode())
    leases = Assignment.objects.filter(annotator=user)
    assert (leases.get(pk=current).prompt, leases.get(pk=prefetched).prompt) == (first, second)
    assert set(leases.filter(state="skipped").values_list("prompt", flat=True)) == {bad.pk, also_bad.pk}
    # the page shows the prefetched task and asks for another: the next good one
    Prompt.objects.filter(pk=third.pk).update(messages=LONE_SURROGATE)
    response = client.get(reverse("annotate-next", args=[project.slug]), {"shown": prefetched}, **HTMX)
    assert response.status_code == 200
    [another] = shown_task_ids(response.content.decode())
    assert leases.get(pk=another).prompt == first  # the older lease, not the one on screen
    client.post(reverse("annotate-skip", args=[project.slug]), {"task_id": current})
    response = client.get(reverse("annotate-next", args=[project.slug]), {"shown": prefetched}, **HTMX)
    assert response.status_code == 200 and shown_task_ids(response.content.decode()) == []
    assert leases.get(prompt=third).skip_reason == SURROGATE_REASON
