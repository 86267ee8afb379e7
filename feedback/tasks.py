"""huey tasks: thin; each loads by id and calls a service. Services queue them through feedback.queue."""

import time

from django.conf import settings
from django.core.cache import cache
from huey import crontab
from huey.contrib.djhuey import HUEY, db_periodic_task, db_task

from feedback.models import ModelVersion, Project, Round, TrainingRun
from feedback.queue import generation_lock_name, training_lock_name
from feedback.selectors.models import reward_model_newest
from feedback.services.completion_scores import completion_scores_compute
from feedback.services.exports import export_job_run
from feedback.services.generation import completions_generate, generation_schedule_tick, round_write
from feedback.services.training_runs import training_run_execute, training_runs_reap, training_schedule_tick


def _generation_heartbeat_key(project_id: int) -> str:
    return f"generation-heartbeat-project-{project_id}"


def _generation_beat(project_id: int) -> None:
    # In the shared cache (Redis, or files in the data dir), so every worker sees every heartbeat.
    cache.set(_generation_heartbeat_key(project_id), time.time(), timeout=None)


@db_task()
def generate_completions_task(
    project_id: int, prompt_limit: int | None = None, k: int | None = None, mix_previous: bool = False
) -> int:
    project = Project.objects.get(pk=project_id)
    with HUEY.lock_task(generation_lock_name(project_id)):  # one generation per project at a time
        _generation_beat(project_id)
        try:
            written = completions_generate(
                project=project,
                prompt_limit=prompt_limit,
                k=k,
                mix_previous=mix_previous,
                progress=lambda done, total: _generation_beat(project_id),
            ).completions
        finally:
            cache.delete(_generation_heartbeat_key(project_id))
    reward_model = reward_model_newest(project=project)
    if written and reward_model is not None:
        completion_scores_task(reward_model.pk)
    return written


@db_task()
def completion_scores_task(version_id: int) -> None:
    completion_scores_compute(version=ModelVersion.objects.get(pk=version_id))


def _release_dead_generations() -> None:
    """Free the generation lock of a project whose worker died: locked, with a heartbeat gone stale.

    A killed worker keeps its lock. Several workers share the locks, so one starting up must not free
    them all: a lock is freed only once no batch has beaten for TRAINING_RUN_STALE_SECONDS. A lock
    found without a heartbeat (taken a moment ago, or by a worker killed before its first beat)
    gets one now, which starts that clock.
    """
    stale_before = time.time() - settings.TRAINING_RUN_STALE_SECONDS
    for project_id in Project.objects.values_list("pk", flat=True):
        if not HUEY.is_locked(generation_lock_name(project_id)):
            continue
        beat = cache.get(_generation_heartbeat_key(project_id))
        if beat is None:
            cache.add(_generation_heartbeat_key(project_id), time.time(), timeout=None)
        elif beat < stale_before:
            _release_lock(generation_lock_name(project_id))
            cache.delete(_generation_heartbeat_key(project_id))


@db_task()
def round_write_task(round_id: int) -> int:
    project_id = Round.objects.filter(pk=round_id).values_list("project_id", flat=True).first()
    if project_id is None:
        return 0  # replaced by a newer request before a worker took it
    with HUEY.lock_task(generation_lock_name(project_id)):  # one generation per project at a time
        _generation_beat(project_id)
        try:
            written = round_write(
                round_id=round_id, progress=lambda done, total: _generation_beat(project_id)
            ).completions
        finally:
            cache.delete(_generation_heartbeat_key(project_id))
    reward_model = reward_model_newest(project=Project.objects.get(pk=project_id))
    if written and reward_model is not None:
        completion_scores_task(reward_model.pk)
    return written


@db_task()
def export_file_task(job_id: str) -> None:
    export_job_run(job_id=job_id)


@db_task()
def training_run_task(run_id: int) -> None:
    project_id = TrainingRun.objects.values_list("project_id", flat=True).get(pk=run_id)
    with HUEY.lock_task(training_lock_name(project_id)):
        training_run_execute(run_id=run_id)


def _reap_and_release() -> None:
    """Fail runs whose worker died and free the training locks of projects with nothing running.

    `run_huey --flush-locks` only knows the locks taken since the consumer started, and a
    killed worker keeps its lock, so the per-project names are released here. A run is guarded by
    the database as well (one queued or running run per project, a partial unique index), so a lock
    released while its run is still queued cannot let a second run of the project start.
    """
    training_runs_reap()
    idle = Project.objects.exclude(training_runs__status=TrainingRun.Status.RUNNING).values_list("pk", flat=True)
    for pk in idle:
        _release_lock(training_lock_name(pk))


def _release_lock(name: str) -> None:
    # Not HUEY.flush_locks(name): that also frees every lock this process has ever named, which with
    # several workers includes locks that another worker holds for a generation or a run under way.
    HUEY.lock_task(name).clear()


@db_periodic_task(crontab(minute=f"*/{settings.TRAINING_SCHEDULE_MINUTES}"))
def training_schedule_task() -> None:
    _reap_and_release()
    _release_dead_generations()
    training_schedule_tick()
    generation_schedule_tick(low_water=settings.GENERATION_LOW_WATER, round_prompts=settings.GENERATION_ROUND_PROMPTS)


@HUEY.on_startup()
def release_dead_runs_on_startup() -> None:
    from django.db import connection

    _reap_and_release()
    _release_dead_generations()  # a generation under way when a worker died left its lock behind
    # and its round running: a round no live worker holds the lock for is written again, from what it committed
    for round_id, project_id in Round.objects.filter(status=Round.Status.RUNNING).values_list("pk", "project_id"):
        if not HUEY.is_locked(generation_lock_name(project_id)):
            round_write_task(round_id)
    connection.close()
