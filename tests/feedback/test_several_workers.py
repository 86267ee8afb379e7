"""Two huey consumers in processes of their own on one Redis queue, as on two machines.

Each consumer has one worker thread (the settings' default), so a task that one is busy with can only
be run by the other. Runs in `make test-services`, where REDIS_URL is set.
"""

import os
import signal
import time

import pytest
from django.conf import settings
from django.db.models import Count

from feedback import tasks
from feedback.models import ModelVersion, Project, TrainingRun
from feedback.queue import generation_running
from feedback.selectors.preferences import PreferenceExportOptions
from feedback.services.exports import export_job_get, export_job_start
from feedback.services.training_runs import training_run_cancel, training_run_start
from tests.factories import ProjectFactory, PromptFactory, UserFactory
from tests.feedback.export_helpers import bulk_rankings
from tests.feedback.test_training_runs import SMALL, judge_everything
from tests.processes import Consumer, database_url_for_subprocesses

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(
        not settings.REDIS_URL, reason="several workers share a queue only on Redis (REDIS_URL is not set)"
    ),
]


def wait_for(condition, *, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.3)


def generated_completely(project: Project) -> bool:
    counts = project.prompts.annotate(n=Count("completions")).values_list("n", flat=True)
    return all(n >= project.completions_per_prompt for n in counts)


def test_two_consumers_share_the_work_keep_the_locks_and_survive_a_kill(
    settings, tiny_model_dir, shared_queue, huey_immediate
):
    huey_immediate.immediate = False  # this process enqueues on Redis; the consumers run the tasks
    settings.RANKWISE_MAX_TRAINING_EPOCHS = 500  # a run long enough to be killed in the middle
    trained = ProjectFactory(
        slug="trained", mode="pairwise", completions_per_prompt=2, base_model=str(tiny_model_dir), training_config=SMALL
    )
    judge_everything(trained, UserFactory())
    written = [
        ProjectFactory(completions_per_prompt=2, base_model=str(tiny_model_dir), max_new_tokens=4) for _ in range(2)
    ]
    for project in written:
        PromptFactory.create_batch(6, project=project)
    exported = ProjectFactory(slug="exported")
    bulk_rankings(exported, prompts=10_000, annotators=[UserFactory()])

    env = {
        **os.environ,
        "DATABASE_URL": database_url_for_subprocesses(),
        "REDIS_URL": settings.REDIS_URL,
        "RANKWISE_DATA_DIR": str(settings.DATA_DIR),
        "RANKWISE_TRAINING_RUN_STALE_SECONDS": "3",
        "RANKWISE_TRAINING_SCHEDULE_MINUTES": "1",  # the reaper's tick, on the minute
        "RANKWISE_MAX_TRAINING_EPOCHS": "500",
        "RANKWISE_GENERATION_LOW_WATER": "0",  # no generation but the ones this test asks for
    }
    consumers = [Consumer(name, env, settings.DATA_DIR) for name in ("first", "second")]
    logs = lambda: "\n".join(f"--- {c.name}\n{c.log()[-3000:]}" for c in consumers)  # noqa: E731
    try:
        # Two generations of one project, with both consumers free: one writes, the other finds it locked.
        first_project = written[0]
        tasks.generate_completions_task(first_project.pk)
        tasks.generate_completions_task(first_project.pk)
        wait_for(
            lambda: (
                sum(c.ran("generate_completions_task") for c in consumers) == 2
                and not generation_running(first_project.pk)
                and generated_completely(first_project)
            ),
            seconds=180,
            what="both generation tasks: " + logs(),
        )
        assert sorted(c.ran("generate_completions_task") for c in consumers) == [1, 1], logs()
        assert sum(c.log().count("unable to acquire lock generation-project-") for c in consumers) == 1, logs()
        per_prompt = first_project.prompts.annotate(n=Count("completions")).values_list("n", flat=True)
        assert list(per_prompt) == [2] * 6  # written once, not twice

        # A long run on one consumer; a large export and another generation go to the other meanwhile.
        run = training_run_start(
            project=trained, trigger=TrainingRun.Trigger.MANUAL, config={"epochs": 500, "batch_size": 1}
        )
        wait_for(lambda: TrainingRun.objects.get(pk=run.pk).step >= 1, seconds=180, what="the run to start: " + logs())
        (trainer,) = [c for c in consumers if c.ran("training_run_task") == 1]
        (other,) = [c for c in consumers if c is not trainer]
        job = export_job_start(
            project=exported, options=PreferenceExportOptions(format="dpo"), file_type="jsonl", requested_by_id=None
        )
        tasks.generate_completions_task(written[1].pk)
        wait_for(
            lambda: export_job_get(job_id=job.id).status == "succeeded" and generated_completely(written[1]),
            seconds=180,
            what="the export and the generation: " + logs(),
        )
        assert TrainingRun.objects.get(pk=run.pk).status == TrainingRun.Status.RUNNING
        assert (other.ran("export_file_task"), other.ran("generate_completions_task")) == (1, 2)
        assert export_job_get(job_id=job.id).rows == 60_000

        # The trainer is killed mid-run: the other consumer's reaper fails the run and frees its project.
        trainer.process.send_signal(signal.SIGKILL)
        trainer.process.wait()
        assert TrainingRun.objects.get(pk=run.pk).status == TrainingRun.Status.RUNNING
        wait_for(
            lambda: TrainingRun.objects.get(pk=run.pk).status == TrainingRun.Status.FAILED,
            seconds=150,
            what="the reaper on the other consumer: " + logs(),
        )
        assert "worker stopped" in TrainingRun.objects.get(pk=run.pk).error
        again = training_run_start(project=trained, trigger=TrainingRun.Trigger.MANUAL, config={"epochs": 1})
        wait_for(
            lambda: TrainingRun.objects.get(pk=again.pk).status in ("succeeded", "failed"),
            seconds=180,
            what="the next run: " + logs(),
        )
        again.refresh_from_db()
        assert again.status == TrainingRun.Status.SUCCEEDED, again.error + logs()
        assert other.ran("training_run_task") == 1
    finally:
        for consumer in consumers:
            if consumer.process.poll() is None:
                consumer.process.send_signal(signal.SIGINT)
        for consumer in consumers:
            consumer.process.wait(timeout=60)


def test_runs_of_one_project_started_at_once_on_two_consumers_never_both_run(
    settings, tiny_model_dir, shared_queue, huey_immediate
):
    """The schedule's tick on both consumers at once (each consumer's scheduler queues it) starts one run of a
    project due for training, and that run's task taken by the second consumer while the first trains it is
    refused by the project's training lock."""
    huey_immediate.immediate = False
    project = ProjectFactory(
        slug="due",
        mode="pairwise",
        completions_per_prompt=2,
        base_model=str(tiny_model_dir),
        training_config={**SMALL, "epochs": 500, "batch_size": 1},  # long enough to be running when asked twice
        auto_train=True,
        auto_train_threshold=1,
    )
    judge_everything(project, UserFactory())
    env = {
        **os.environ,
        "DATABASE_URL": database_url_for_subprocesses(),
        "REDIS_URL": settings.REDIS_URL,
        "RANKWISE_DATA_DIR": str(settings.DATA_DIR),
        "RANKWISE_MAX_TRAINING_EPOCHS": "500",
        "RANKWISE_GENERATION_LOW_WATER": "0",
    }
    consumers = [Consumer(name, env, settings.DATA_DIR) for name in ("first", "second")]
    logs = lambda: "\n".join(f"--- {c.name}\n{c.log()[-3000:]}" for c in consumers)  # noqa: E731
    runs = TrainingRun.objects.filter(project=project)
    try:
        wait_for(lambda: all(c.ready() for c in consumers), seconds=120, what="the consumers")
        tasks.training_schedule_task()
        tasks.training_schedule_task()
        wait_for(
            lambda: sum(c.ran("training_schedule_task") for c in consumers) >= 2 and runs.filter(step__gte=1).exists(),
            seconds=180,
            what="both ticks and the run: " + logs(),
        )
        (run,) = runs
        (trainer,) = [c for c in consumers if c.ran("training_run_task") == 1]
        (other,) = [c for c in consumers if c is not trainer]
        assert other.ran("training_schedule_task") >= 1, logs()  # both ticks ran, one on each consumer or in turn

        tasks.training_run_task(run.pk)  # the run's task again, as a retry would queue it: the free consumer takes it
        wait_for(lambda: other.ran("training_run_task") == 1, seconds=60, what="the second task: " + logs())
        wait_for(
            lambda: f"unable to acquire lock training-project-{project.pk}" in other.log(),
            seconds=30,
            what="the lock to refuse it: " + logs(),
        )
        run.refresh_from_db()
        assert run.status == TrainingRun.Status.RUNNING
        assert list(runs) == [run]

        training_run_cancel(run=run)
        wait_for(
            lambda: TrainingRun.objects.get(pk=run.pk).status == TrainingRun.Status.CANCELLED,
            seconds=120,
            what="the run to stop: " + logs(),
        )
        assert list(runs) == [run]
        assert not ModelVersion.objects.filter(project=project).exists()
        assert "Traceback" not in logs()
    finally:
        for consumer in consumers:
            if consumer.process.poll() is None:
                consumer.process.send_signal(signal.SIGINT)
        for consumer in consumers:
            consumer.process.wait(timeout=60)
