"""The home page counts the prompts that have their completions while the worker writes them."""

import pytest
from django.urls import reverse
from huey.contrib.djhuey import HUEY

from feedback.queue import generation_lock_name, generation_running
from tests.factories import CompletionFactory, MembershipFactory, ProjectFactory, PromptFactory

pytestmark = pytest.mark.django_db

HTMX = {"HTTP_HX_REQUEST": "true"}
REFRESHING = 'hx-trigger="every 5s"'


@pytest.fixture
def project():
    project = ProjectFactory(name="Birds", completions_per_prompt=2)
    for n in range(3):
        prompt = PromptFactory(project=project)
        for _ in range(2 if n == 0 else 1):
            CompletionFactory(prompt=prompt)
    return project


def test_while_completions_are_written_the_row_counts_them_and_the_table_refreshes(client, project):
    client.force_login(MembershipFactory(project=project).user)
    assert REFRESHING not in client.get(reverse("home")).content.decode()

    with HUEY.lock_task(generation_lock_name(project.pk)):
        assert generation_running(project.pk)
        page = client.get(reverse("home")).content.decode()
        assert REFRESHING in page and "writing completions: 1 of 3 prompts ready" in page
        CompletionFactory(prompt=project.prompts.order_by("id")[1])
        part = client.get(reverse("home"), **HTMX).content.decode()
        assert part.lstrip().startswith('<div id="projects"') and "<html" not in part
        assert "writing completions: 2 of 3 prompts ready" in part

    assert not generation_running(project.pk)
    done = client.get(reverse("home"), **HTMX).content.decode()
    assert REFRESHING not in done and "writing completions" not in done


def test_other_projects_writing_is_not_shown_to_a_non_member(client, project):
    outsider_project = ProjectFactory(name="Fish")
    client.force_login(MembershipFactory(project=outsider_project).user)
    with HUEY.lock_task(generation_lock_name(project.pk)):
        page = client.get(reverse("home")).content.decode()
    assert "Birds" not in page and REFRESHING not in page
