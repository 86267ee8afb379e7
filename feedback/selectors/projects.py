from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.db.models import Count, QuerySet

from feedback.models import Project


def project_list_for_user(*, user: AbstractBaseUser | AnonymousUser) -> QuerySet[Project]:
    """Projects the user may see: every project for staff, their memberships otherwise."""
    if not user.is_authenticated:
        return Project.objects.none()
    projects = Project.objects.all() if user.is_staff else Project.objects.filter(memberships__user=user)
    return projects.annotate(
        prompt_count=Count("prompts", distinct=True),
        completion_count=Count("prompts__completions", distinct=True),
    ).order_by("name")


def generation_progress(*, project: Project) -> dict[str, int] | None:
    """While the worker writes completions for the project: how many of its prompts have their K; else None."""
    from feedback.tasks import generation_running

    if not generation_running(project.pk):
        return None
    ready = project.prompts.annotate(n=Count("completions")).filter(n__gte=project.completions_per_prompt)
    return {"ready": ready.count(), "prompts": project.prompts.count()}
