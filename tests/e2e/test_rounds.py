"""The loop turns once in the browser: judge, retrain, promote, and the new round's tasks arrive.

The training run executes in a thread of the test process, standing in for the worker; so does
the round the promotion queues, written by the real task with the tiny model's versions loaded
and a stand-in sampler whose answers are recognisable. The sampler holds the round's second
batch until the pages have shown the first one, so the round is watched while it is written.
"""

import re
import threading
import time

import pytest
from django.db import connection
from playwright.sync_api import expect

from feedback.models import (
    Assignment,
    Completion,
    ModelVersion,
    PairwiseJudgement,
    Project,
    Round,
    RoundPrompt,
    TrainingRun,
)
from feedback.services.training_runs import training_run_execute
from feedback.tasks import round_write_task
from tests.e2e.conftest import log_in_as
from tests.factories import CompletionFactory, MembershipFactory, ProjectFactory, PromptFactory, UserFactory

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

PROMPTS = 8
CONFIG = {
    "epochs": 1,
    "min_steps": 0,
    "batch_size": 2,
    "max_length": 64,
    "max_prompt_length": 32,
    "eval_batch_size": 8,
    "save_every": 0,
    "learning_rate": 1e-3,
}


def in_thread(target, *args, **kwargs) -> threading.Thread:
    """Run ``target`` as the worker would, in a thread with a database connection of its own."""

    def run() -> None:
        try:
            target(*args, **kwargs)
        finally:
            connection.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.fixture
def worker(queue):
    """Queued training runs execute in a background thread; queued rounds are only recorded."""
    threads = []
    queue.run_with("training_run_task", lambda run_id: threads.append(in_thread(training_run_execute, run_id=run_id)))
    yield queue
    for thread in threads:
        thread.join(timeout=120)


class HeldSampler:
    """Answers each conversation with a numbered fresh take on its question; the second batch waits for `go`."""

    def __init__(self) -> None:
        self.calls = 0
        self.go = threading.Event()
        self.lock = threading.Lock()
        self.written = 0

    def __call__(self, model, tokenizer, conversations, *, k, sampling, batch_size=64, progress=None):
        from training.generate import Sample

        with self.lock:
            self.calls += 1
            call = self.calls
        if call > 2:  # one call per writer per batch: the first batch's two are let through
            assert self.go.wait(timeout=60), "the test never let the round's second batch be written"
        samples = []
        for messages in conversations:
            question = messages[-1]["content"]
            row = []
            for _ in range(k):
                with self.lock:
                    self.written += 1
                    n = self.written
                row.append(Sample(text=f"Fresh take {n} on {question}", token_ids=(5, 6, 7), truncated=False))
            samples.append(row)
        return samples


def wait_for_db(check, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (value := check()) is not None:
            return value
        time.sleep(0.05)
    raise AssertionError("the database never showed the expected change")


def shown_task_id(page) -> int:
    return int(page.locator("#current form.task").get_attribute("data-task-id"))


def expect_a_task_of_round(page, number: int) -> Assignment:
    """The task on the page belongs to round ``number`` and shows that round's completions, and only those."""
    page.wait_for_selector("html.js #current form.task")
    assignment = Assignment.objects.select_related("round").get(pk=shown_task_id(page))
    assert assignment.round.number == number
    completions = Completion.objects.in_bulk(assignment.display_order)
    texts = [completions[pk].text for pk in assignment.display_order]
    assert len(texts) == 2 and all(text.startswith("Fresh take ") for text in texts), texts
    expect(page.locator("#current .completion .body")).to_have_text(texts)
    assert {completions[pk].round.number for pk in assignment.display_order} == {number}
    return assignment


def test_judge_retrain_promote_then_the_new_rounds_tasks_arrive(
    live_server, browser, page, artifacts, worker, tiny_model_dir, monkeypatch
):
    project = ProjectFactory(
        slug="loop",
        name="Cats",
        mode=Project.Mode.PAIRWISE,
        completions_per_prompt=2,
        base_model=str(tiny_model_dir),
        max_new_tokens=6,
        training_config=CONFIG,
    )
    for n in range(PROMPTS):
        prompt = PromptFactory(project=project, messages=[{"role": "user", "content": f"Question {n + 1}: why purr?"}])
        CompletionFactory(prompt=prompt, text=f"Cats purr when content ({n + 1}).")
        CompletionFactory(prompt=prompt, text=f"Cats are a kind of fish ({n + 1}).")
    MembershipFactory(user=UserFactory(username="ann"), project=project)
    UserFactory(username="boss", is_staff=True)
    errors = []

    # 1. The annotator judges every task of round 1 with the keyboard.
    annotating = browser.new_context(viewport={"width": 1280, "height": 900})
    ann = annotating.new_page()
    ann.set_default_timeout(10_000)
    ann.on("pageerror", lambda error: errors.append(f"annotate: {error}"))
    log_in_as(ann, live_server, "ann")
    row = ann.locator("tr", has_text="Cats")
    expect(row.locator("td").nth(5)).to_have_text(str(PROMPTS))  # left
    row.get_by_role("link", name="Start").click()
    ann.wait_for_selector("html.js #current form.task")
    expect(ann.locator("#count-left")).to_have_text(str(PROMPTS))
    for judged in range(1, PROMPTS + 1):
        ann.keyboard.press("1")
        expect(ann.locator("#current input[name=choice][value=a]")).to_be_checked()
        ann.keyboard.press("Enter")
        expect(ann.locator("#count-mine")).to_have_text(str(judged))
    expect(ann.locator("#current .all-done")).to_contain_text("All done")
    expect(ann.locator("#count-left")).to_have_text("0")
    wait_for_db(lambda: PairwiseJudgement.objects.count() == PROMPTS or None)
    assert set(PairwiseJudgement.objects.values_list("choice", "round__number")) == {("a", 1)}

    # 2. A staff user retrains on those judgements and promotes the version the run makes.
    page.on("pageerror", lambda error: errors.append(f"training: {error}"))
    log_in_as(page, live_server, "boss")
    page.goto(f"{live_server.url}/projects/loop/training/")
    expect(page.locator("#round-1 td").nth(3)).to_have_text("done")
    page.select_option("#id_algorithm", "dpo")
    page.click("#retrain")
    expect(page.locator(".messages")).to_contain_text("is queued")
    expect(page.locator("#run-status")).to_have_text("succeeded", timeout=180_000)
    run = TrainingRun.objects.get()
    assert run.status == "succeeded", run.error
    version = run.produced_version
    assert version.name == "v1" and version.parent is None

    version_row = page.locator(f"#version-{version.pk}")
    expect(version_row).to_contain_text("v1")
    version_row.get_by_role("button", name="Promote").click()
    expect(page.locator(".messages")).to_contain_text("v1 is now the active version")
    assert ModelVersion.objects.get(is_active=True) == version

    # 3. The promotion queued round 2, written by v1 and the model it was trained from, over every prompt.
    round_two = Round.objects.get(project=project, number=2)
    assert (round_two.status, round_two.writers, round_two.prompt_limit) == ("queued", ["v1", "base"], None)
    assert worker.args("round_write_task") == [(round_two.pk,)]
    cells = page.locator("#round-2 td")
    expect(cells.nth(1)).to_have_text("v1 + base")
    expect(cells.nth(3)).to_have_text("queued")

    # 4. The worker writes it; its first batch (two prompts) is committed, the rest waits.
    sampler = HeldSampler()
    monkeypatch.setattr("training.generate.generate_completions", sampler)
    writing = in_thread(round_write_task.call_local, round_two.pk)
    try:
        expect(cells.nth(3)).to_have_text("running")  # the rounds table polls while a round is open
        expect(cells.nth(4).locator("progress")).to_have_attribute("value", "2")
        expect(cells.nth(4).locator("progress")).to_have_attribute("max", str(PROMPTS))
        expect(cells.nth(4)).to_contain_text(f"2 / {PROMPTS}")

        # the annotator's projects page has work again, and its first task is one of round 2
        ann.goto(f"{live_server.url}/")
        row = ann.locator("tr", has_text="Cats")
        expect(row.locator("td").nth(5)).to_have_text("2")  # left: round 2's two written prompts
        row.get_by_role("link", name="Continue").click()
        first = expect_a_task_of_round(ann, 2)
        assert RoundPrompt.objects.filter(round=round_two).count() == 2  # no more than the first batch
        assert RoundPrompt.objects.filter(round=round_two, prompt_id=first.prompt_id).exists()
    finally:
        sampler.go.set()
        writing.join(timeout=60)
    assert not writing.is_alive()

    # 5. The round is written: the table says so and stops polling.
    expect(page.locator("#round-2 td")).to_have_text(
        ["2", "v1 + base", "Prompts whose latest round is oldest first", "done", f"{PROMPTS} / {PROMPTS}"]
        + [str(2 * PROMPTS), "0", round_two.created_at.strftime("%Y-%m-%d %H:%M")]
    )
    expect(page.locator("#rounds")).not_to_have_attribute("hx-trigger", "every 2s")
    round_two.refresh_from_db()
    written = Completion.objects.filter(round=round_two)
    assert (round_two.status, round_two.prompts_written, written.count()) == ("done", PROMPTS, 2 * PROMPTS)
    assert sorted(written.values_list("model_version__name", flat=True), key=str) == sorted(
        ["v1"] * PROMPTS + [None] * PROMPTS, key=str
    )
    assert set(written.values_list("prompt_id", flat=True)) == set(project.prompts.values_list("pk", flat=True))
    assert all(re.fullmatch(r"Fresh take \d+ on Question \d: why purr\?", c.text) for c in written)

    # 6. The annotator judges the new round's task; the next one is of round 2 too.
    ann.screenshot(path=str(artifacts / "rounds-annotate.png"), full_page=True)
    ann.keyboard.press("1")
    ann.keyboard.press("Enter")
    expect(ann.locator("#count-mine")).to_have_text(str(PROMPTS + 1))
    assert shown_task_id(ann) != first.pk
    expect_a_task_of_round(ann, 2)
    page.reload()
    expect(page.locator("#round-2 td").nth(6)).to_have_text("1")  # judged
    page.screenshot(path=str(artifacts / "rounds-training.png"), full_page=True)
    annotating.close()
    assert errors == []
