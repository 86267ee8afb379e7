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
