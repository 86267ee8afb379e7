"""huey tasks: thin; each loads by id and calls a service. Services queue them through feedback.queue."""

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

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


@contextmanager
def generation_writing(
    project_id: int, progress: Callable[[int, int], None] | None = None
) -> Iterator[Callable[[int, int], None]]:
    """Hold the project's generation lock, beating its heartbeat, while completions are written here.

    One generation per project at a time: the worker's tasks and `generate --sync` both write under
    it, so a round a live process is writing is never queued again by the schedule. Yields the
    progress callback to hand the writer (it beats, then calls ``progress``). Raises huey's
    TaskLockedException when another process holds the lock.
    """

    def beat(done: int, total: int) -> None:
        _generation_beat(project_id)
        if progress is not None:
            progress(done, total)

    with HUEY.lock_task(generation_lock_name(project_id)):
        _generation_beat(project_id)
        try:
            yield beat
        finally:
            cache.delete(_generation_heartbeat_key(project_id))


@db_task()
def generate_completions_task(
    project_id: int, prompt_limit: int | None = None, k: int | None = None, mix_previous: bool = False
) -> int:
    project = Project.objects.get(pk=project_id)
    with generation_writing(project_id) as progress:
        written = completions_generate(
            project=project, prompt_limit=prompt_limit, k=k, mix_previous=mix_previous, progress=progress
        ).completions
    reward_model = reward_model_newest(project=project)
    if written and reward_model is not None:
        completion_scores_task(reward_model.pk)
    return written


@db_task()
def completion_scores_task(version_id: int) -> None:
    completion_scores_compute(version=ModelVersion.objects.get(pk=version_id))


def _release_dead_generations(project_ids: list[int] | None = None) -> None:
    """Free the generation lock of a project whose worker died: locked, with a heartbeat gone stale.

    A killed worker keeps its lock. Several workers share the locks, so one starting up must not free
    them all: a lock is freed only once no batch has beaten for TRAINING_RUN_STALE_SECONDS. A lock
    found without a heartbeat (taken a moment ago, or by a worker killed before its first beat)
    gets one now, which starts that clock. Every project's, or those of ``project_ids``.
    """
    stale_before = time.time() - settings.TRAINING_RUN_STALE_SECONDS
    if project_ids is None:
        project_ids = list(Project.objects.values_list("pk", flat=True))
    for project_id in project_ids:
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
    with generation_writing(project_id) as progress:
        written = round_write(round_id=round_id, progress=progress).completions
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


def rounds_left_running(project_ids: list[int] | None = None) -> list[Round]:
    """Rounds marked running that no live process is writing: their project's generation lock is free.

    A stale lock (its holder killed) is freed first, so a round is found once its heartbeat has been
    silent for TRAINING_RUN_STALE_SECONDS. Writing such a round again resumes it from what it committed.
    """
    running = Round.objects.filter(status=Round.Status.RUNNING)
    if project_ids is not None:
        running = running.filter(project_id__in=project_ids)
    found = list(running.order_by("pk"))
    _release_dead_generations(sorted({round.project_id for round in found}))
    return [round for round in found if not HUEY.is_locked(generation_lock_name(round.project_id))]


def _resume_rounds_left_running() -> None:
    # Queued again at every start-up and tick until a worker takes the lock: a second task finds the
    # round done (or being written under the lock) and writes nothing.
    for round in rounds_left_running():
        round_write_task(round.pk)


@db_periodic_task(crontab(minute=f"*/{settings.TRAINING_SCHEDULE_MINUTES}"))
def training_schedule_task() -> None:
    _reap_and_release()
    _release_dead_generations()
    _resume_rounds_left_running()
    training_schedule_tick()
    generation_schedule_tick(low_water=settings.GENERATION_LOW_WATER, round_prompts=settings.GENERATION_ROUND_PROMPTS)


@HUEY.on_startup()
def release_dead_runs_on_startup() -> None:
    from django.db import connection

    _reap_and_release()
    _release_dead_generations()  # a generation under way when a worker died left its lock behind
    _resume_rounds_left_running()  # and its round running: written again, from what it committed
    connection.close()
