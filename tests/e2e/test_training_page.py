"""A staff user retrains a project from its training page, watches the run go, and promotes the new version.

The run executes in a thread of the test process, standing in for the worker, so the page's
polling sees its progress move; each step waits a little so there is something to watch.
"""

import threading
import time

import pytest
from django.db import connection
from playwright.sync_api import expect

from feedback.models import ModelVersion, Project, TrainingRun
from feedback.services import training_runs
from feedback.services.training_runs import training_run_execute
from tests.e2e.conftest import log_in_as
from tests.factories import MembershipFactory, ProjectFactory, TrainingRunFactory, UserFactory
from tests.feedback.export_helpers import compare, make_prompt

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

CONFIG = {
    "epochs": 2,
    "min_steps": 0,
    "batch_size": 2,
    "max_length": 64,
    "max_prompt_length": 32,
    "eval_batch_size": 8,
    "save_every": 0,
    "learning_rate": 1e-3,
}
SECONDS_PER_STEP = 0.4


@pytest.fixture
def worker(monkeypatch, queue):
    """Queued runs execute in a background thread, writing their progress at every step."""
    threads = []

    def execute(run_id: int) -> None:
        try:
            training_run_execute(run_id=run_id, on_progress=lambda *_: time.sleep(SECONDS_PER_STEP))
        finally:
            connection.close()

    def enqueue(run_id: int) -> None:
        thread = threading.Thread(target=execute, args=(run_id,), daemon=True)
        threads.append(thread)
        thread.start()

    monkeypatch.setattr(training_runs, "PROGRESS_EVERY_SECONDS", 0.0)
    queue.run_with("training_run_task", enqueue)
    yield threads
    for thread in threads:
        thread.join(timeout=120)


def test_retrain_watch_the_run_then_promote(live_server, page, artifacts, worker, tiny_model_dir):
    project = ProjectFactory(
        slug="loop",
        name="Cats",
        mode=Project.Mode.PAIRWISE,
        completions_per_prompt=2,
        base_model=str(tiny_model_dir),
        max_new_tokens=6,
        training_config=CONFIG,
    )
    annotator = MembershipFactory(project=project).user
    for n in range(14):
        _, (good, bad) = make_prompt(project, k=2, text=f"Question {n}: tell me about cats")
        compare(annotator, good, bad, "a")
    UserFactory(username="boss", is_staff=True)
    violations = []
    page.on("pageerror", lambda error: violations.append(str(error)))
    page.on("console", lambda m: violations.append(m.text) if "Content Security Policy" in m.text else None)

    log_in_as(page, live_server, "boss")
    page.locator("tr", has_text="Cats").get_by_role("link", name="Training").click()
    expect(page.locator("h1")).to_have_text("Training · Cats")
    expect(page.get_by_text("No training runs yet.")).to_be_visible()

    page.select_option("#id_algorithm", "dpo")
    page.click("#retrain")
    expect(page.locator(".messages")).to_contain_text("is queued")
    run = TrainingRun.objects.get()
    assert run.trigger == "manual" and run.triggered_by.username == "boss"

    progress = page.locator("#run-progress")
    seen = set()
    deadline = time.monotonic() + 120
    while page.locator("#run-status").inner_text() != "succeeded":
        assert time.monotonic() < deadline, "the run did not finish"
        assert page.locator("#run-status").inner_text() in ("queued", "running", "succeeded")
        if progress.get_attribute("value") is not None:
            seen.add((int(progress.get_attribute("value")), int(progress.get_attribute("max"))))
        time.sleep(0.2)
    run.refresh_from_db()
    assert run.status == "succeeded", run.error
    assert any(0 < value < total for value, total in seen), f"no step between start and end was shown: {seen}"
    expect(progress).to_have_attribute("value", str(run.total_steps))
    expect(page.locator("#run-live")).not_to_have_attribute("hx-trigger", "every 2s")
    points = page.evaluate("Chart.getChart(document.getElementById('chart-loss')).data.datasets[0].data.length")
    assert points == run.total_steps

    version_row = page.locator(f"#version-{run.produced_version.pk}")  # shown once the run-ended event refreshed it
    expect(version_row).to_contain_text("v1")
    expect(page.locator(f"#run-row-{run.pk}")).to_contain_text("succeeded")
    version_row.get_by_role("button", name="Promote").click()
    expect(page.locator(".messages")).to_contain_text("v1 is now the active version")
    expect(page.locator(f"#version-{run.produced_version.pk}")).to_contain_text("active")
    assert ModelVersion.objects.get(is_active=True) == run.produced_version

    page.screenshot(path=str(artifacts / "training.png"), full_page=True)
    assert violations == []


def test_a_scheduled_run_shows_up_on_an_open_page(live_server, page):
    project = ProjectFactory(slug="sched", name="Dogs")
    UserFactory(username="boss", is_staff=True)
    log_in_as(page, live_server, "boss")
    page.goto(f"{live_server.url}/projects/sched/training/")
    expect(page.get_by_text("No training runs yet.")).to_be_visible()

    run = TrainingRunFactory(project=project, trigger=TrainingRun.Trigger.SCHEDULE)  # as the periodic task would
    expect(page.locator("#run-status")).to_have_text("queued", timeout=15_000)
    expect(page.locator(f"#run-row-{run.pk}")).to_contain_text("Schedule")

    TrainingRun.objects.filter(pk=run.pk).update(status=TrainingRun.Status.CANCELLED)
    expect(page.locator("#run-status")).to_have_text("cancelled")
