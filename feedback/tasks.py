"""huey tasks: thin; each loads by id and calls a service."""

from django.conf import settings
from huey import crontab
from huey.contrib.djhuey import HUEY, db_periodic_task, db_task

from feedback.models import Project
from feedback.services.exports import export_job_run
from feedback.services.generation import completions_generate
from feedback.services.training_runs import training_run_execute, training_runs_reap, training_schedule_tick


@db_task()
def generate_completions_task(project_id: int, prompt_limit: int | None = None, k: int | None = None) -> int:
    project = Project.objects.get(pk=project_id)
    return completions_generate(project=project, prompt_limit=prompt_limit, k=k).completions


@db_task()
def export_file_task(job_id: str) -> None:
    export_job_run(job_id=job_id)


@db_task()
def training_run_task(run_id: int) -> None:
    from feedback.models import TrainingRun

    project_id = TrainingRun.objects.values_list("project_id", flat=True).get(pk=run_id)
    with HUEY.lock_task(f"training-project-{project_id}"):
        training_run_execute(run_id=run_id)


@db_periodic_task(crontab(minute=f"*/{settings.TRAINING_SCHEDULE_MINUTES}"))
def training_schedule_task() -> None:
    training_runs_reap()
    training_schedule_tick()


@HUEY.on_startup()
def reap_stale_runs_on_startup() -> None:
    from django.db import connection

    training_runs_reap()
    connection.close()
