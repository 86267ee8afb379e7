"""Leaving an annotator's judgements out of what a project exports and trains on, and bringing them back.

Nothing is deleted: an excluded annotator's judgements stay stored, and including them again makes
them count as before. A mistake is a ValidationError keyed by the field at fault and changes nothing.
"""

from __future__ import annotations

from django.contrib.auth import get_user_model
from django.contrib.auth.models import User
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction

from feedback.models import AnnotatorExclusion, Assignment, Membership, Project

REASON_MAX = 500


def _annotator(*, project: Project, username: str) -> User:
    """A member of the project, or someone who has taken its tasks (staff judge without a membership)."""
    user = get_user_model().objects.filter(username=username).first()
    known = user is not None and (
        Membership.objects.filter(project=project, user=user).exists()
        or Assignment.objects.filter(project=project, annotator=user).exists()
    )
    if not known:
        raise ValidationError({"username": f"'{username}' has not annotated in project '{project.slug}'."})
    assert user is not None
    return user


def annotator_exclude(*, project: Project, username: str, by: User | None = None, reason: str = "") -> bool:
    """Leave the annotator's judgements out of the project's exports, snapshots and battles; False if already."""
    reason = reason.strip()
    if len(reason) > REASON_MAX:
        raise ValidationError({"reason": f"Keep the reason under {REASON_MAX} characters."})
    annotator = _annotator(project=project, username=username)
    try:
        with transaction.atomic():
            _, created = AnnotatorExclusion.objects.get_or_create(
                project=project, annotator=annotator, defaults={"excluded_by": by, "reason": reason}
            )
    except IntegrityError:  # excluded by someone else at the same moment
        return False
    return created


def annotator_include(*, project: Project, username: str) -> bool:
    """Count the annotator's judgements again; False if they were not excluded."""
    annotator = _annotator(project=project, username=username)
    deleted, _ = AnnotatorExclusion.objects.filter(project=project, annotator=annotator).delete()
    return bool(deleted)
