"""While the worker writes completions, the annotate and home pages say so and update themselves."""

import pytest
from django.test import Client
from django.urls import reverse
from huey.contrib.djhuey import HUEY

from feedback.models import Round
from feedback.queue import generation_lock_name
from tests.factories import (
    CompletionFactory,
    MembershipFactory,
    ProjectFactory,
    PromptFactory,
    RoundFactory,
    UserFactory,
)

pytestmark = pytest.mark.django_db

HTMX = {"HTTP_HX_REQUEST": "true"}
POLLING = 'hx-trigger="every 3s"'


@pytest.fixture
def project():
    project = ProjectFactory(name="Birds", mode="ranking", completions_per_prompt=2)
    PromptFactory.create_batch(2, project=project)
    return project


@pytest.fixture
def client(project):
    user = UserFactory()
    MembershipFactory(user=user, project=project, role="annotator")
    client = Client()
    client.force_login(user)
    return client


def test_the_annotate_page_waits_for_completions_being_written_and_reloads_when_a_task_is_ready(client, project):
    url = reverse("annotate", args=[project.slug])
    with HUEY.lock_task(generation_lock_name(project.pk)):
        page = client.get(url).content.decode()
        assert "Completions are being written" in page and "0 of 2 prompts ready" in page
        assert POLLING in page and "All done" not in page

        waiting = client.get(url, **HTMX)
        assert waiting.status_code == 200 and "HX-Refresh" not in waiting
        part = waiting.content.decode()
        assert part.lstrip().startswith('<section class="card writing"') and "<html" not in part

        first = project.prompts.order_by("id").first()
        CompletionFactory.create_batch(2, prompt=first, text="Sparrows sing at dawn.")
        ready = client.get(url, **HTMX)
        assert (ready.status_code, ready["HX-Refresh"], ready.content) == (200, "true", b"")
        page = client.get(url).content.decode()
        assert "Sparrows sing at dawn." in page
        # the card shown after the last task, while the rest are still written, waits too
        assert "1 of 2 prompts ready" in page and "All done" not in page


def test_when_nothing_is_written_any_more_the_page_says_all_done_and_stops_polling(client, project):
    url = reverse("annotate", args=[project.slug])
    page = client.get(url).content.decode()
    assert "All done" in page and POLLING not in page and "being written" not in page
    # a card left polling from before the writing ended reloads into that page
    response = client.get(url, **HTMX)
    assert (response.status_code, response["HX-Refresh"]) == (200, "true")


def test_the_home_page_never_says_complete_while_completions_are_being_written(client, project):
    with HUEY.lock_task(generation_lock_name(project.pk)):
        page = client.get(reverse("home")).content.decode()
    assert "Waiting for completions" in page and "Complete" not in page
    assert "writing completions: 0 of 2 prompts ready" in page and 'hx-trigger="every 5s"' in page
    page = client.get(reverse("home")).content.decode()
    assert "Complete" in page and "Waiting for completions" not in page


def test_the_counts_follow_the_open_round_not_the_completions_of_earlier_rounds(client, project):
    for prompt in project.prompts.all():
        CompletionFactory.create_batch(2, prompt=prompt)
    later = RoundFactory(project=project, status=Round.Status.QUEUED)
    home = client.get(reverse("home")).content.decode()
    assert "writing completions: 0 of 2 prompts ready" in home and "Complete" not in home

    Round.objects.filter(pk=later.pk).update(status=Round.Status.RUNNING, prompts_total=2, prompts_written=1)
    home = client.get(reverse("home")).content.decode()
    assert "writing completions: 1 of 2 prompts ready" in home

    Round.objects.filter(pk=later.pk).update(status=Round.Status.DONE, prompts_written=2)
    home = client.get(reverse("home")).content.decode()
    assert "writing completions" not in home and "Waiting for completions" not in home


@pytest.mark.parametrize("mode", ["ranking", "pairwise"])
def test_an_answer_cut_by_the_length_limit_is_marked(mode):
    project = ProjectFactory(mode=mode, completions_per_prompt=2, max_new_tokens=192)
    prompt = PromptFactory(project=project)
    cut = {"temperature": 0.8, "top_p": 0.95, "max_new_tokens": 192, "new_tokens": 192, "truncated": True}
    CompletionFactory(prompt=prompt, text="A long answer that goes on", generation_params=cut)
    CompletionFactory(prompt=prompt, text="Short.", generation_params={**cut, "new_tokens": 3, "truncated": False})
    user = UserFactory()
    MembershipFactory(user=user, project=project, role="annotator")
    client = Client()
    client.force_login(user)
    page = client.get(reverse("annotate", args=[project.slug])).content.decode()
    assert page.count("cut at 192 tokens") == 1
    marked = page.index("cut at 192 tokens")
    assert page.rfind("A long answer that goes on", 0, marked) > page.rfind("Short.", 0, marked)
