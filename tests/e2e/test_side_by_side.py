"""After a run, a manager watching the training page sees the parent's and the new version's answers side by side.

The run and then its side-by-side answers are written in threads of the test process, standing in for
the worker; the page says the answers are being written, then shows them without a reload.
"""

import threading
import time

import pytest
from django.db import connection
from playwright.sync_api import expect

from feedback.models import Project, TrainingRun
from feedback.services.side_by_side import side_by_side_write
from feedback.services.training_runs import training_run_execute
from tests.e2e.conftest import log_in_as
from tests.factories import MembershipFactory, ProjectFactory, UserFactory
from tests.feedback.export_helpers import compare, make_prompt
from tests.feedback.test_training_runs import SMALL

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

CONFIG = {**SMALL, "learning_rate": 1e-3}


@pytest.fixture
def worker(queue):
    """Queued runs and side-by-side answers are written in background threads, the answers a little later."""
    threads = []

    def in_thread(work) -> None:
        def run(*args) -> None:
            def target() -> None:
                try:
                    work(*args)
                finally:
                    connection.close()

            thread = threading.Thread(target=target, daemon=True)
            threads.append(thread)
            thread.start()

        return run

    def side_by_side(version_id: int) -> None:
        time.sleep(2)  # long enough for the page to show that they are being written
        side_by_side_write(version_id=version_id)

    queue.run_with("training_run_task", in_thread(lambda run_id: training_run_execute(run_id=run_id)))
    queue.run_with("side_by_side_task", in_thread(side_by_side))
    yield threads
    for thread in threads:
        thread.join(timeout=120)


def test_the_answers_appear_on_the_training_page_after_a_run(live_server, page, artifacts, worker, tiny_model_dir):
    project = ProjectFactory(
        slug="loop",
        name="Cats",
        mode=Project.Mode.PAIRWISE,
        completions_per_prompt=2,
        base_model=str(tiny_model_dir),
        max_new_tokens=8,
        training_config=CONFIG,
    )
    annotator = MembershipFactory(project=project).user
    for n in range(30):
        _, (good, bad) = make_prompt(project, k=2, text=f"Question {n}: tell me about cats")
        compare(annotator, good, bad, "a")
    UserFactory(username="boss", is_staff=True)
    violations = []
    page.on("pageerror", lambda error: violations.append(str(error)))
    page.on("console", lambda m: violations.append(m.text) if "Content Security Policy" in m.text else None)

    log_in_as(page, live_server, "boss")
    page.goto(f"{live_server.url}/projects/loop/training/")
    page.click("#retrain")
    expect(page.locator("#side-by-side-status")).to_contain_text("Writing both models' answers", timeout=60_000)

    pairs = page.locator(".side-by-side-pair")
    expect(pairs.first).to_be_visible(timeout=60_000)
    version = TrainingRun.objects.get().produced_version
    stored = version.metrics["side_by_side"]
    assert stored["status"] == "done" and stored["pairs"]
    expect(pairs).to_have_count(len(stored["pairs"]))
    expect(page.locator("#side-by-side h3")).to_have_text("The base model and v1 side by side")
    expect(page.locator("#side-by-side-status")).to_contain_text("held-out prompt")
    for index, pair in enumerate(stored["pairs"]):
        shown = pairs.nth(index)
        expect(shown.locator(".turn-user .content")).to_have_text(pair["messages"][-1]["content"])
        expect(shown.locator(".parent-answer .body")).to_have_text(pair["parent_text"])
        expect(shown.locator(".candidate-answer .body")).to_have_text(pair["candidate_text"])
        expect(shown.locator(".candidate-answer .label")).to_have_text("v1")
    expect(page.locator("#side-by-side")).not_to_have_attribute("hx-trigger", "every 2s")

    page.screenshot(path=str(artifacts / "side-by-side.png"), full_page=True)
    assert violations == []
