from django.contrib.auth.models import AbstractBaseUser, AnonymousUser

from feedback.models import Membership, Project

ANNOTATING_ROLES = frozenset(Membership.Role.values)


def membership_role_for(*, user: AbstractBaseUser | AnonymousUser, project: Project) -> str | None:
    """The user's role in the project: staff act as managers everywhere; None for outsiders."""
    if not user.is_authenticated:
        return None
    if user.is_staff:
        return Membership.Role.MANAGER
    return Membership.objects.filter(user=user, project=project).values_list("role", flat=True).first()
