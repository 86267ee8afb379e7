"""Who may do what in a project through the API.

Staff manage every project; other users act through their Membership role in it. A
project the user cannot see answers 404 (its existence is not revealed); a project they
can see but where their role is too low answers 403.
"""

from __future__ import annotations

from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from rest_framework.exceptions import NotFound, PermissionDenied

from feedback.models import Membership, Project

User = AbstractBaseUser | AnonymousUser


def membership_role(*, user: User, project: Project) -> str | None:
    """The user's role in the project, "manager" for staff, None for non-members."""
    if not user.is_authenticated:
        return None
    if getattr(user, "is_staff", False):
        return Membership.Role.MANAGER
    return Membership.objects.filter(user_id=user.pk, project_id=project.pk).values_list("role", flat=True).first()


def project_for_member(*, user: User, slug: str) -> Project:
    """The project named by slug if the user is a member of it (any role) or staff; 404 otherwise."""
    project = Project.objects.filter(slug=slug).first()
    if project is None or membership_role(user=user, project=project) is None:
        raise NotFound("No such project.")
    return project


def project_for_manager(*, user: User, slug: str) -> Project:
    """The project named by slug if the user manages it (or is staff); 404 for non-members, 403 for others."""
    project = project_for_member(user=user, slug=slug)
    if membership_role(user=user, project=project) != Membership.Role.MANAGER:
        raise PermissionDenied("Only the project's managers may do this.")
    return project
