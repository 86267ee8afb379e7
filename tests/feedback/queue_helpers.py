"""Leasing and judging through the services, for the task queue and judgement tests."""

import uuid

from feedback.models import Assignment, Project
from feedback.services.assignments import assignment_lease_next
from feedback.services.judgements import JudgementSubmission, SubmittedJudgement, judgement_submit
from tests.factories import CompletionFactory, ProjectFactory, PromptFactory


def make_project(*, mode: str = "ranking", prompts: int = 3, k: int = 4, overlap: int = 1, **kwargs) -> Project:
    project = ProjectFactory(mode=mode, completions_per_prompt=k, overlap=overlap, **kwargs)
    for _ in range(prompts):
        prompt = PromptFactory(project=project)
        CompletionFactory.create_batch(k, prompt=prompt)
    return project


def lease(project: Project, annotator, **kwargs) -> Assignment | None:
    """The lease of the annotator's next task, or None."""
    task = assignment_lease_next(project=project, annotator=annotator, **kwargs)
    return None if task is None else task.assignment


def submit(*, project: Project, annotator, **fields) -> SubmittedJudgement:
    return judgement_submit(project=project, annotator=annotator, submission=JudgementSubmission(**fields))


def judge(project: Project, annotator, assignment: Assignment) -> SubmittedJudgement:
    """A valid judgement on the lease: A better, or the completions ranked in display order."""
    if project.mode == Project.Mode.PAIRWISE:
        extra = {"choice": "a"}
    else:
        extra = {"ranking": [[c] for c in assignment.display_order]}
    return submit(
        project=project,
        annotator=annotator,
        task_id=assignment.pk,
        client_uuid=uuid.uuid4(),
        kind=project.mode,
        **extra,
    )


def work_until_done(project: Project, annotator) -> list[Assignment]:
    done = []
    while (assignment := lease(project, annotator)) is not None:
        judge(project, annotator, assignment)
        done.append(assignment)
    return done
