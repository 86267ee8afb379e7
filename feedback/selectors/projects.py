from typing import Any

from django.contrib.auth.models import AnonymousUser, User
from django.db.models import Count, IntegerField, OuterRef, QuerySet, Subquery
from django.db.models.functions import Coalesce

from feedback.models import Completion, Project, Prompt, Round
from feedback.queue import generation_running
from feedback.selectors.access import projects_with_role


def project_list_for_user(*, user: User | AnonymousUser) -> QuerySet[Project]:
    """Projects the user may see (every project for staff), each with the user's ``role`` and its counts."""
    return (
        projects_with_role(user=user)
        .annotate(
            prompt_count=_count_per_project(Prompt.objects.all(), "project"),
            completion_count=_count_per_project(Completion.objects.all(), "prompt__project"),
        )
        .order_by("name")
    )


def _count_per_project(rows: QuerySet[Any], project_field: str) -> Coalesce:
    """The number of `rows` of each project, as a subquery (a join with DISTINCT counts would multiply the rows)."""
    counted = rows.filter(**{project_field: OuterRef("pk")}).order_by().values(project_field).annotate(n=Count("*"))
    return Coalesce(Subquery(counted.values("n"), output_field=IntegerField()), 0)


def generation_progress(*, project: Project) -> dict[str, int] | None:
    """While completions are being written or wait to be: how many prompts of the open round have theirs; else None.

    A round that has not chosen its prompts yet has none ready. Completions written outside a round
    (the worker holds the project's generation lock with no round open) count the prompts that have K.
    """
    open_round = project.rounds.filter(status__in=[Round.Status.QUEUED, Round.Status.RUNNING]).first()
    if open_round is not None:
        if open_round.prompts_total:
            return {"ready": open_round.prompts_written, "prompts": open_round.prompts_total}
        return {"ready": 0, "prompts": open_round.prompt_limit or project.prompts.count()}
    if not generation_running(project.pk):
        return None
    ready = project.prompts.annotate(n=Count("completions")).filter(n__gte=project.completions_per_prompt)
    return {"ready": ready.count(), "prompts": project.prompts.count()}
