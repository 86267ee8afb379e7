"""huey tasks: thin; each loads by id and calls a service."""

from huey.contrib.djhuey import db_task

from feedback.models import Project
from feedback.services.exports import export_job_run
from feedback.services.generation import completions_generate


@db_task()
def generate_completions_task(project_id: int, prompt_limit: int | None = None, k: int | None = None) -> int:
    project = Project.objects.get(pk=project_id)
    return completions_generate(project=project, prompt_limit=prompt_limit, k=k).completions


@db_task()
def export_file_task(job_id: str) -> None:
    export_job_run(job_id=job_id)
