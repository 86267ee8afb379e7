"""huey tasks: thin; each loads by id and calls a service. Services queue them through feedback.queue."""

from django.conf import settings
from huey import crontab
from huey.contrib.djhuey import HUEY, db_periodic_task, db_task

from feedback.models import ModelVersion, Project, Round, TrainingRun
from feedback.queue import (
    generation_writing,
    release_dead_generations,
    release_lock,
    rounds_left_running,
    training_lock_name,
)
from feedback.selectors.models import reward_model_newest
from feedback.selectors.quality import quality_figures_refresh
from feedback.services.completion_scores import completion_scores_compute
from feedback.services.exports import export_job_run
from feedback.services.generation import completions_generate, generation_schedule_tick, round_write
from feedback.services.promotion_gate import promotion_gate_check, promotion_gate_tick
from feedback.services.side_by_side import side_by_side_write
from feedback.services.training_runs import training_run_execute, training_runs_reap, training_schedule_tick


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
def promotion_gate_task(project_id: int) -> None:
    project = Project.objects.filter(pk=project_id).first()
    if project is not None:  # deleted since
        promotion_gate_check(project=project)


@db_task()
def quality_figures_task(project_id: int) -> None:
    project = Project.objects.filter(pk=project_id).first()
    if project is not None:  # deleted since
        quality_figures_refresh(project=project)


@db_task()
def side_by_side_task(version_id: int) -> None:
    side_by_side_write(version_id=version_id)


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
        release_lock(training_lock_name(pk))


def _resume_rounds_left_running() -> None:
    # Queued again at every start-up and tick until a worker takes the lock: a second task finds the
    # round done (or being written under the lock) and writes nothing.
    for round in rounds_left_running():
        round_write_task(round.pk)


@db_periodic_task(crontab(minute=f"*/{settings.TRAINING_SCHEDULE_MINUTES}"))
def training_schedule_task() -> None:
    _reap_and_release()
    release_dead_generations()
    _resume_rounds_left_running()
    training_schedule_tick()
    promotion_gate_tick()
    generation_schedule_tick(low_water=settings.GENERATION_LOW_WATER, round_prompts=settings.GENERATION_ROUND_PROMPTS)


@HUEY.on_startup()
def release_dead_runs_on_startup() -> None:
    from django.db import connection

    _reap_and_release()
    release_dead_generations()  # a generation under way when a worker died left its lock behind
    _resume_rounds_left_running()  # and its round running: written again, from what it committed
    connection.close()
