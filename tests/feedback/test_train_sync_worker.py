"""`manage.py train --sync` with a huey consumer running on the same queue: the command trains the run itself, once,
and the consumer never gets it; without --sync the same consumer takes the run.

Runs on huey's SQLite queue in the test's data dir, or on Redis when REDIS_URL is set (`make test-services`).
"""

import os
import signal
import subprocess
import sys

import pytest
from huey import Huey, SqliteHuey

from feedback.models import ModelVersion, TrainingRun
from tests.factories import ProjectFactory, UserFactory
from tests.feedback.test_training_runs import SMALL, judge_everything, wait_for
from tests.processes import ROOT, Consumer, database_url_for_subprocesses

pytestmark = pytest.mark.django_db(transaction=True)


def test_train_sync_trains_in_the_command_and_the_running_worker_never_takes_the_run(
    settings, tiny_model_dir, shared_queue
):
    project = ProjectFactory(
        slug="synced", mode="pairwise", completions_per_prompt=2, base_model=str(tiny_model_dir), training_config=SMALL
    )
    judge_everything(project, UserFactory(), prompts=4)
    env = {
        **os.environ,
        "DATABASE_URL": database_url_for_subprocesses(),
        "RANKWISE_DATA_DIR": str(settings.DATA_DIR),
        "RANKWISE_GENERATION_LOW_WATER": "0",  # the schedule's tick writes nothing for the project
    }
    # The queue the consumer and the commands share (this process's own huey runs tasks at once, in memory).
    queue = shared_queue or SqliteHuey(settings.HUEY["name"], filename=str(settings.DATA_DIR / "huey.sqlite3"))

    def manage(*args: str) -> str:
        done = subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr + consumer.log()[-3000:]
        return done.stdout

    consumer = Consumer("worker", env, settings.DATA_DIR)
    try:
        wait_for(
            lambda: consumer.ready() or consumer.process.poll() is not None,
            seconds=60,
            what="the consumer to start",
        )
        assert consumer.process.poll() is None, consumer.log()

        out = manage("train", "synced", "--sync", "--epochs", "1")

        run = TrainingRun.objects.get()
        assert f"Run {run.pk} succeeded: model version v1" in out and "Queued" not in out
        assert run.status == TrainingRun.Status.SUCCEEDED and run.trigger == TrainingRun.Trigger.COMMAND
        assert run.step == run.total_steps > 0
        assert list(ModelVersion.objects.values_list("name", "produced_by_run")) == [("v1", run.pk)]
        # The consumer ran all along, and nothing was queued for it to take or that it took.
        assert consumer.process.poll() is None, consumer.log()
        assert pending_runs(queue) == 0
        assert consumer.ran("training_run_task") == 0, consumer.log()

        # The positive control: the same project's run without --sync is queued and the consumer trains it.
        assert "Queued" in manage("train", "synced", "--epochs", "1")
        queued = TrainingRun.objects.exclude(pk=run.pk).get()
        wait_for(
            lambda: TrainingRun.objects.get(pk=queued.pk).status in ("succeeded", "failed"),
            seconds=120,
            what="the consumer to train the queued run: " + consumer.log()[-3000:],
        )
        queued.refresh_from_db()
        assert queued.status == TrainingRun.Status.SUCCEEDED, queued.error + consumer.log()[-3000:]
        # One worker thread takes tasks in order: a queued copy of the --sync run would have been taken first.
        assert consumer.ran("training_run_task") == 1, consumer.log()
        assert pending_runs(queue) == 0
        versions = ModelVersion.objects.order_by("name").values_list("name", "produced_by_run")
        assert list(versions) == [("v1", run.pk), ("v2", queued.pk)]
        assert TrainingRun.objects.get(pk=run.pk).finished_at < queued.started_at
    finally:
        if consumer.process.poll() is None:
            consumer.process.send_signal(signal.SIGINT)
        consumer.process.wait(timeout=60)


def pending_runs(queue: Huey) -> int:
    """Training runs waiting in the queue. A run that succeeds queues its side-by-side answers, which may wait there."""
    return sum(task.name.endswith("training_run_task") for task in queue.pending())
