"""Who may do what in a project: the one place the rule is written, for pages, the API and templates.

Staff manage every project; other users act through their Membership role in it, and each role
may do what the roles below it may. A project the user may not see is a 404 (its existence is
not revealed); one they see where their role is too low is a 403. Django's Http404 and
PermissionDenied are raised, which pages and DRF both turn into those answers.
"""

from __future__ import annotations

from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.core.exceptions import PermissionDenied
from django.db.models import CharField, F, QuerySet, Value
from django.http import Http404

from feedback.models import Membership, Project

User = AbstractBaseUser | AnonymousUser
Role = Membership.Role

# Each role may do what the ones before it may.
ROLE_ORDER = (Role.ANNOTATOR, Role.REVIEWER, Role.MANAGER)
TOO_LOW = {
    Role.ANNOTATOR: "Only the project's members may do this.",
    Role.REVIEWER: "Only the project's reviewers and managers may do this.",
    Role.MANAGER: "Only the project's managers may do this.",
}


def membership_role(*, user: User, project: Project) -> str | None:
    """The user's role in the project, "manager" for staff, None for anonymous users and non-members."""
    if not user.is_authenticated:
        return None
    if _manages_every_project(user):
        return Role.MANAGER
    return Membership.objects.filter(user_id=user.pk, project_id=project.pk).values_list("role", flat=True).first()


def projects_with_role(*, user: User) -> QuerySet[Project]:
    """The projects the user may see, each annotated with ``role``: the user's, as membership_role gives it."""
    if not user.is_authenticated:
        return Project.objects.none()
    if _manages_every_project(user):
        return Project.objects.annotate(role=Value(Role.MANAGER, output_field=CharField()))
    return Project.objects.filter(memberships__user_id=user.pk).annotate(role=F("memberships__role"))


def _manages_every_project(user: User) -> bool:
    return bool(getattr(user, "is_staff", False))


def role_allows(*, held: str | None, wanted: Role) -> bool:
    """Whether a held role (None: no membership) is at least the wanted one."""
    return held is not None and ROLE_ORDER.index(Role(held)) >= ROLE_ORDER.index(wanted)


def project_role_check(*, user: User, project: Project, role: Role, not_found: str = "No such project.") -> str:
    """The user's role in the project if it is at least `role`: Http404 for non-members, PermissionDenied if lower."""
    held = membership_role(user=user, project=project)
    if held is None:
        raise Http404(not_found)
    if not role_allows(held=held, wanted=role):
        raise PermissionDenied(TOO_LOW[role])
    return held


def project_for_role(*, user: User, slug: str, role: Role) -> Project:
    """The project named by slug if the user's role in it is at least `role` (see project_role_check)."""
    project = Project.objects.filter(slug=slug).first()
    if project is None:
        raise Http404("No such project.")
    project_role_check(user=user, project=project, role=role)
    return project


def user_manages_project(*, user: User, project: Project) -> bool:
    """Whether the user may manage the project (staff manage every project)."""
    return membership_role(user=user, project=project) == Role.MANAGER
