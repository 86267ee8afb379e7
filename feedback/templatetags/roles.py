"""Template filters about a user's role in a project."""

from django import template
from django.contrib.auth.models import AbstractBaseUser, AnonymousUser

from feedback.api.permissions import membership_role
from feedback.models import Membership, Project

register = template.Library()


@register.filter
def manages(user: AbstractBaseUser | AnonymousUser, project: Project) -> bool:
    """Whether the user is a manager of the project (staff manage every project)."""
    return membership_role(user=user, project=project) == Membership.Role.MANAGER
