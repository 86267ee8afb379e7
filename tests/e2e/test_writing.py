"""A newcomer arriving while the worker writes the first completions: the page waits, then shows the task."""

import pytest
from huey.contrib.djhuey import HUEY
from playwright.sync_api import expect

from feedback.queue import generation_lock_name
from tests.e2e.conftest import log_in_as
from tests.factories import CompletionFactory, MembershipFactory, ProjectFactory, PromptFactory, UserFactory

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def test_the_annotate_page_waits_for_the_first_completions_then_shows_them(live_server, page, artifacts):
    project = ProjectFactory(name="Demo", mode="ranking", completions_per_prompt=2)
    first, _ = PromptFactory.create_batch(2, project=project)
    MembershipFactory(user=UserFactory(username="ann"), project=project)
    log_in_as(page, live_server, "ann")

    with HUEY.lock_task(generation_lock_name(project.pk)):
        page.reload()
        expect(page.locator("tr", has_text="Demo")).to_contain_text("Waiting for completions")
        page.goto(f"{live_server.url}/projects/{project.slug}/annotate/")
        expect(page.locator("#current")).to_contain_text("Completions are being written")
        expect(page.locator("#current")).to_contain_text("0 of 2 prompts ready")
        page.screenshot(path=str(artifacts / "annotate-while-writing.png"))

        # the worker commits the first prompt's completions: the page picks them up by itself
        CompletionFactory(prompt=first, text="Sparrows sing at dawn.")
        CompletionFactory(prompt=first, text="Crows are clever.")
        expect(page.locator("html.js #current form.task")).to_contain_text("Sparrows sing at dawn.")

        # judged, with the second prompt still being written: the page waits again, never "All done"
        page.keyboard.press("Enter")
        expect(page.locator("#current")).to_contain_text("1 of 2 prompts ready")
        expect(page.locator("#current")).not_to_contain_text("All done")

    # the writing has ended and nothing is left: the next poll reloads the page into "All done"
    expect(page.locator("#current")).to_contain_text("All done")
