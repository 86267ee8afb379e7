"""The closed loop in one process: judgements -> run -> model version -> promotion -> new completions."""

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command
from django.db import connection
from django.utils import timezone

from feedback.models import Completion, ModelVersion, TrainingRun
from feedback.services import training_runs
from feedback.services.assignments import assignment_lease_next
from feedback.services.judgements import judgement_submit
from feedback.services.model_versions import model_version_promote
from feedback.services.training_runs import (
    TrainingRunError,
    training_run_cancel,
    training_run_execute,
    training_run_start,
    training_runs_reap,
    training_schedule_tick,
)
from tests.factories import (
    CompletionFactory,
    MembershipFactory,
    ProjectFactory,
    PromptFactory,
    TrainingRunFactory,
    UserFactory,
)

pytestmark = pytest.mark.django_db(transaction=True)
ROOT = Path(__file__).resolve().parents[2]

SMALL = {"epochs": 1, "batch_size": 4, "max_length": 64, "max_prompt_length": 32, "eval_batch_size": 8, "save_every": 0}


@pytest.fixture
def project(tiny_model_dir):
    return ProjectFactory(
        slug="loop",
        mode="pairwise",
        completions_per_prompt=2,
        base_model=str(tiny_model_dir),
        max_new_tokens=6,
        training_config=SMALL,
        auto_train_threshold=10,
    )


def judge_everything(project, annotator, prompts=12):
    """Prompts with a good and a bad answer, and the annotator's choice of the good one, through the services."""
    MembershipFactory(user=annotator, project=project)
    for i in range(prompts):
        prompt = PromptFactory(
            project=project, messages=[{"role": "user", "content": f"Question {i}: tell me about cats"}]
        )
        CompletionFactory(prompt=prompt, text="Cats are great.")
        CompletionFactory(prompt=prompt, text="No.")
    while (assignment := assignment_lease_next(project=project, annotator=annotator)) is not None:
        left, right = assignment.display_order
        good = Completion.objects.get(pk=left).text == "Cats are great."
        judgement_submit(
            project=project,
            annotator=annotator,
            task_id=assignment.pk,
            client_uuid=uuid.uuid4(),
            kind="pairwise",
            choice="a" if good else "b",
        )


def test_judgements_become_a_model_version_that_writes_the_next_completions(project):
    judge_everything(project, UserFactory())
    staff = UserFactory(is_staff=True)

    run = training_run_start(project=project, triggered_by=staff)  # huey immediate: runs at once
    run.refresh_from_db()

    assert run.status == "succeeded", run.error
    assert run.triggered_by == staff and run.trigger == "manual"
    assert run.data_counts["train"] + run.data_counts["held_out"] == 12
    assert len(run.data_hash) == 64
    assert run.step == run.total_steps > 0 and run.metrics and "loss" in run.metrics[-1]
    version = run.produced_version
    assert version.name == "v1" and version.parent is None and not version.is_active
    assert "eval_after" in version.metrics and "eval_before" in version.metrics
    weights = training_runs.settings.MODEL_VERSIONS_DIR / version.weights_path
    assert (weights / "config.json").is_file() and any(weights.glob("*.safetensors"))

    new_prompt = PromptFactory(project=project)
    model_version_promote(version=version)  # generation follows in the worker (immediate here)
    assert ModelVersion.objects.get(is_active=True) == version
    # the next round mixes the new version with the model it was trained from
    written = [(c.model_version, c.source_model) for c in new_prompt.completions.all()]
    assert sorted(written, key=str) == sorted([(version, ""), (None, project.base_model)], key=str)

    second = training_run_start(project=project, config={"epochs": 1})
    second.refresh_from_db()
    assert second.status == "succeeded" and second.parent_version == version
    assert second.produced_version.parent == version and second.produced_version.name == "v2"
    newest = PromptFactory(project=project)
    model_version_promote(version=second.produced_version)
    assert {c.model_version for c in newest.completions.all()} == {version, second.produced_version}
    model_version_promote(version=version, generate=False)  # roll back
    assert ModelVersion.objects.get(is_active=True) == version


def test_the_schedule_starts_a_run_only_after_enough_new_judgements(project):
    project.auto_train = True
    project.save()
    assert training_schedule_tick() == []  # nothing judged yet
    judge_everything(project, UserFactory())
    [run] = training_schedule_tick()
    run.refresh_from_db()
    assert run.status == "succeeded" and run.trigger == "schedule"
    assert training_schedule_tick() == []  # no new judgements since that run


def test_a_failing_run_is_failed_with_its_message_and_the_active_version_is_untouched(project, tmp_path):
    judge_everything(project, UserFactory())
    active = ModelVersion.objects.create(project=project, name="v0", weights_path="loop/missing", is_active=True)
    run = training_run_start(project=project)
    run.refresh_from_db()
    assert run.status == "failed" and "loop/missing" in run.error
    assert ModelVersion.objects.get(is_active=True) == active and ModelVersion.objects.count() == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"config": {"beta": -1}}, "beta must be positive"),
        ({"config": {"learning_rate": "fast"}}, "learning_rate must be a float"),
        ({"config": {"betta": 0.1}}, "unknown dpo setting 'betta'"),
        ({"algorithm": "ppo"}, "algorithm must be dpo or grpo"),
        ({"algorithm": "grpo"}, "GRPO trains on ranked groups"),
    ],
)
def test_bad_settings_are_refused_before_anything_is_written(project, kwargs, message):
    judge_everything(project, UserFactory(), prompts=2)
    with pytest.raises(TrainingRunError, match=message):
        training_run_start(project=project, **kwargs)
    assert not TrainingRun.objects.exists()


def test_nothing_to_train_on_is_a_clear_error(project):
    with pytest.raises(TrainingRunError, match="no pairs to train on"):
        training_run_start(project=project)


def test_only_one_run_at_a_time(project, huey_immediate):
    judge_everything(project, UserFactory(), prompts=3)
    huey_immediate.immediate = False  # keep the first run queued
    try:
        first = training_run_start(project=project)
        with pytest.raises(TrainingRunError, match="already queued or running"):
            training_run_start(project=project)
    finally:
        huey_immediate.immediate = True
    assert TrainingRun.objects.get() == first and first.status == "queued"


def test_cancel_a_queued_run_and_a_running_one(project, huey_immediate):
    judge_everything(project, UserFactory())
    huey_immediate.immediate = False
    try:
        queued = training_run_start(project=project)
    finally:
        huey_immediate.immediate = True
    assert training_run_cancel(run=queued).status == "cancelled"
    assert training_run_execute(run_id=queued.pk).status == "cancelled"  # the queued task does nothing

    huey_immediate.immediate = False
    try:
        running = training_run_start(project=project, config={"epochs": 3, "batch_size": 1})
    finally:
        huey_immediate.immediate = True

    def cancel_after_first_step(step, total, metrics):
        if step == 1:
            training_run_cancel(run=TrainingRun.objects.get(pk=running.pk))

    done = training_run_execute(run_id=running.pk, on_progress=cancel_after_first_step)
    assert done.status == "cancelled" and 1 <= done.step < done.total_steps
    assert not ModelVersion.objects.exists()
    with pytest.raises(TrainingRunError, match="already ended"):
        training_run_cancel(run=done)


def test_the_reaper_fails_runs_without_a_heartbeat(project, settings):
    settings.TRAINING_RUN_STALE_SECONDS = 60
    stale = TrainingRunFactory(
        project=project, status="running", heartbeat_at=timezone.now() - timezone.timedelta(minutes=5)
    )
    alive = TrainingRunFactory(status="running", heartbeat_at=timezone.now())
    assert training_runs_reap() == [stale.pk]
    stale.refresh_from_db()
    alive.refresh_from_db()
    assert stale.status == "failed" and "worker stopped" in stale.error and alive.status == "running"


def test_train_command_sync_and_its_errors(project, capsys):
    judge_everything(project, UserFactory())
    call_command("train", "loop", "--algorithm", "dpo", "--sync", "--epochs", "1", "--lr", "0.001")
    out = capsys.readouterr().out
    assert "succeeded: model version v1" in out and "held-out preference accuracy" in out
    run = TrainingRun.objects.get()
    assert run.trigger == "command" and run.config["learning_rate"] == 0.001
    with pytest.raises(CommandError, match="no project 'nope'"):
        call_command("train", "nope")
    with pytest.raises(CommandError, match="beta must be positive"):
        call_command("train", "loop", "--beta", "0")
    with pytest.raises(CommandError, match="must be a JSON object"):
        call_command("train", "loop", "--config", "[1]")


def wait_for(condition, *, seconds, what):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_worker_killed_mid_run_leaves_no_run_stuck_and_the_next_run_succeeds(project, settings):
    judge_everything(project, UserFactory())
    env = {
        **os.environ,
        "DATABASE_URL": f"sqlite:///{connection.settings_dict['NAME']}",
        "RANKWISE_DATA_DIR": str(settings.DATA_DIR),
        "RANKWISE_TRAINING_RUN_STALE_SECONDS": "2",
    }

    def manage(*args):
        return subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env=env, check=True, capture_output=True)

    log = (settings.DATA_DIR / "worker.log").open("ab")

    def worker():
        return subprocess.Popen(
            [sys.executable, "manage.py", "run_huey", "--flush-locks"], cwd=ROOT, env=env, stdout=log, stderr=log
        )

    manage("train", "loop", "--epochs", "500", "--batch-size", "1")  # queued for the worker
    run = TrainingRun.objects.get()
    first = worker()
    try:
        wait_for(lambda: TrainingRun.objects.get(pk=run.pk).step >= 1, seconds=120, what="the run to make progress")
    finally:
        first.kill()  # SIGKILL: no clean-up in the worker at all
        first.wait()
    run.refresh_from_db()
    assert run.status == "running"  # stuck, as huey will not re-run it

    time.sleep(2.5)  # the heartbeat goes stale
    second = worker()
    try:
        wait_for(lambda: TrainingRun.objects.get(pk=run.pk).status == "failed", seconds=60, what="the reaper")
        manage("train", "loop", "--epochs", "1")
        next_run = TrainingRun.objects.exclude(pk=run.pk).get()
        wait_for(
            lambda: TrainingRun.objects.get(pk=next_run.pk).status in ("succeeded", "failed"),
            seconds=120,
            what="the next run to end: " + (settings.DATA_DIR / "worker.log").read_text()[-3000:],
        )
    finally:
        second.terminate()
        second.wait(timeout=30)
    next_run.refresh_from_db()
    assert next_run.status == "succeeded", next_run.error + (settings.DATA_DIR / "worker.log").read_text()
    assert "worker stopped" in TrainingRun.objects.get(pk=run.pk).error
    assert not ModelVersion.objects.filter(produced_by_run=run).exists()
