"""Project access for API views: 404 for a project that does not exist, 403 for one the user is not in."""

from collections.abc import Collection

from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from rest_framework.exceptions import NotFound, PermissionDenied

from feedback.models import Membership, Project
from feedback.selectors.memberships import ANNOTATING_ROLES, membership_role_for


def project_get_for_role(
    *, user: AbstractBaseUser | AnonymousUser, slug: str, roles: Collection[str] = ANNOTATING_ROLES
) -> Project:
    """The project named by ``slug`` if the user holds one of ``roles`` in it (staff always do)."""
    project = Project.objects.filter(slug=slug).first()
    if project is None:
        raise NotFound(f"There is no project '{slug}'.")
    role = membership_role_for(user=user, project=project)
    if role is None:
        raise PermissionDenied("You are not a member of this project.")
    if role not in roles:
        raise PermissionDenied(f"This needs one of the roles {', '.join(sorted(roles))}; you are {role}.")
    return project


def project_get_for_member(*, user: AbstractBaseUser | AnonymousUser, slug: str) -> Project:
    """The project if the user is a member with any role, or staff."""
    return project_get_for_role(user=user, slug=slug)


def project_get_for_manager(*, user: AbstractBaseUser | AnonymousUser, slug: str) -> Project:
    """The project if the user manages it, or is staff."""
    return project_get_for_role(user=user, slug=slug, roles={Membership.Role.MANAGER})
