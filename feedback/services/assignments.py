"""Leasing items to annotators, and skipping them.

The database keeps the queue honest under any concurrency: a lease takes one of the item's
``overlap`` slots under the unique (item_key, slot) constraint, and unique (annotator,
item_key) stops an item reaching the same person twice. Reading candidates happens outside
the write transaction; the insert is the arbiter, and losing a race just means trying the
next candidate.
"""

from __future__ import annotations

import random
from collections.abc import Collection
from datetime import datetime, timedelta

from django.contrib.auth.models import User
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.utils import timezone

from feedback.models import Assignment, Project
from feedback.selectors.tasks import ItemCandidate, task_candidates_for_annotator, task_lease_current

SKIP_REASON_MAX = 500


def _lease_take(*, project: Project, annotator: User, candidate: ItemCandidate, now: datetime) -> Assignment | None:
    display_order = list(candidate.completion_ids)
    random.shuffle(display_order)
    pairwise = project.mode == Project.Mode.PAIRWISE
    try:
        with transaction.atomic():
            if candidate.expired_lease_id is not None:
                reclaimed, _ = Assignment.objects.filter(
                    pk=candidate.expired_lease_id, state=Assignment.State.LEASED, expires_at__lte=now
                ).delete()
                if not reclaimed:
                    return None
            return Assignment.objects.create(
                project=project,
                annotator=annotator,
                prompt_id=candidate.prompt_id,
                completion_a_id=display_order[0] if pairwise else None,
                completion_b_id=display_order[1] if pairwise else None,
                item_key=candidate.item_key,
                slot=candidate.slot,
                display_order=display_order,
                expires_at=now + timedelta(seconds=project.lease_seconds),
            )
    except IntegrityError:
        return None


def assignment_lease_next(*, project: Project, annotator: User, exclude_ids: Collection[int] = ()) -> Assignment | None:
    """The annotator's next task: an unfinished lease of theirs if any, else a new lease.

    ``exclude_ids`` are leases the caller already holds on screen (the page's current task
    when it prefetches the next one). The lease is (re)started for the project's lease length.
    None when nothing is left for this annotator.
    """
    now = timezone.now()
    expires_at = now + timedelta(seconds=project.lease_seconds)
    current = task_lease_current(project=project, annotator=annotator, exclude_ids=exclude_ids)
    if current is not None and Assignment.objects.filter(pk=current.pk, state=Assignment.State.LEASED).update(
        expires_at=expires_at
    ):
        current.expires_at = expires_at
        return current
    for candidate in task_candidates_for_annotator(project=project, annotator=annotator, now=now):
        assignment = _lease_take(project=project, annotator=annotator, candidate=candidate, now=now)
        if assignment is not None:
            return assignment
    return None


def assignment_lease_renew(*, project: Project, annotator: User, task_ids: Collection[int]) -> int:
    """Restart the leases of tasks the annotator has just been shown (a prefetched task leased a while ago).

    Only unfinished leases of theirs whose slot nobody has taken are renewed; returns how many.
    """
    return Assignment.objects.filter(
        pk__in=list(task_ids), project=project, annotator=annotator, state=Assignment.State.LEASED
    ).update(expires_at=timezone.now() + timedelta(seconds=project.lease_seconds))


def assignment_skip(*, project: Project, annotator: User, task_id: int, reason: str = "") -> Assignment:
    """Give a leased item back without judging it; it is never served to this annotator again."""
    reason = reason.strip()
    if len(reason) > SKIP_REASON_MAX:
        raise ValidationError({"reason": f"Keep the reason under {SKIP_REASON_MAX} characters."})
    skipped = Assignment.objects.filter(
        pk=task_id, project=project, annotator=annotator, state=Assignment.State.LEASED
    ).update(state=Assignment.State.SKIPPED, slot=None, skip_reason=reason, finished_at=timezone.now())
    assignment = Assignment.objects.filter(pk=task_id, project=project, annotator=annotator).first()
    if assignment is None:
        raise ValidationError({"task_id": "This task is not leased to you (its lease may have expired)."})
    if not skipped and assignment.state == Assignment.State.DONE:
        raise ValidationError({"task_id": "You already judged this task."})
    return assignment
