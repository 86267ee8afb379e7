"""Template filters about a user's role in a project."""

from django import template
from django.contrib.auth.models import AbstractBaseUser, AnonymousUser

from feedback.models import Project
from feedback.selectors.access import user_manages_project

register = template.Library()


@register.filter
def manages(user: AbstractBaseUser | AnonymousUser, project: Project) -> bool:
    """Whether the user is a manager of the project (staff manage every project)."""
    return user_manages_project(user=user, project=project)
