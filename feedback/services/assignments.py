"""Leasing items to annotators, and skipping them.

The database keeps the queue honest under any concurrency: a lease takes one of the item's
``overlap`` slots under the unique (item_key, slot) constraint, unique (annotator, item_key)
stops an item reaching the same person twice, and unique (project, annotator, annotator_slot)
with its check constraint lets an annotator hold at most LEASES_PER_ANNOTATOR unfinished leases
in a project. Reading candidates happens outside the write transaction; the insert is the
arbiter. Losing a race for an item's slot means trying the next candidate; losing it for the
annotator's own place (another request of theirs was faster) means reading their leases again.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Collection
from datetime import datetime, timedelta

from django.contrib.auth.models import User
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.utils import timezone

from feedback.models import LEASES_PER_ANNOTATOR, Assignment, Project
from feedback.selectors.tasks import (
    ItemCandidate,
    Task,
    TaskUnrenderable,
    task_candidates_for_annotator,
    task_for_assignment,
    task_leases_held,
)

SKIP_REASON_MAX = 500
UNSHOWABLE_SKIP_PREFIX = "Cannot be shown:"  # a skip the app made, not the annotator

logger = logging.getLogger(__name__)


def _lease_take(
    *, project: Project, annotator: User, candidate: ItemCandidate, annotator_slot: int, now: datetime
) -> Assignment | None:
    display_order = list(candidate.completion_ids)
    random.shuffle(display_order)
    pairwise = candidate.pairwise
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
                round_id=candidate.round_id,
                completion_a_id=display_order[0] if pairwise else None,
                completion_b_id=display_order[1] if pairwise else None,
                item_key=candidate.item_key,
                slot=candidate.slot,
                annotator_slot=annotator_slot,
                display_order=display_order,
                expires_at=now + timedelta(seconds=project.lease_seconds),
            )
    except IntegrityError:
        return None


def _lease_next(
    *, project: Project, annotator: User, exclude_ids: set[int], resume_id: int | None
) -> Assignment | None:
    """A lease the annotator holds (``resume_id`` first, then the oldest) and may be shown, renewed; else a new one."""
    now = timezone.now()
    while True:
        held = task_leases_held(project=project, annotator=annotator)
        for lease in sorted(held, key=lambda lease: lease.pk != resume_id):  # stable: otherwise oldest first
            if lease.pk in exclude_ids:
                continue
            expires_at = now + timedelta(seconds=project.lease_seconds)
            if Assignment.objects.filter(pk=lease.pk, state=Assignment.State.LEASED).update(expires_at=expires_at):
                lease.expires_at = expires_at
                return lease
            break  # judged, skipped or taken over since it was read: read the leases again
        else:
            free = sorted(set(range(LEASES_PER_ANNOTATOR)) - {lease.annotator_slot for lease in held})
            if not free:
                return None  # every place holds a lease the caller already shows
            place = free[0]
            for candidate in task_candidates_for_annotator(project=project, annotator=annotator, now=now):
                assignment = _lease_take(
                    project=project, annotator=annotator, candidate=candidate, annotator_slot=place, now=now
                )
                if assignment is not None:
                    return assignment
                if Assignment.objects.filter(project=project, annotator=annotator, annotator_slot=place).exists():
                    break  # another request of theirs took this place: read the leases again
            else:
                return None


def _skip(*, project: Project, annotator: User, task_id: int, reason: str) -> int:
    """Mark the lease skipped if it is still theirs and unfinished; it gives back its slot and its place."""
    return Assignment.objects.filter(
        pk=task_id, project=project, annotator=annotator, state=Assignment.State.LEASED
    ).update(
        state=Assignment.State.SKIPPED, slot=None, annotator_slot=None, skip_reason=reason, finished_at=timezone.now()
    )


def assignment_lease_next(
    *, project: Project, annotator: User, exclude_ids: Collection[int] = (), resume_id: int | None = None
) -> Task | None:
    """The annotator's next task: an unfinished lease of theirs if any (the oldest), else a new lease.

    An annotator holds at most two unfinished leases per project, so a call while both are held
    returns the older one. ``exclude_ids`` are leases the caller already shows (the page's current
    task when it prefetches the next one); ``resume_id`` is a lease to show again before any other
    (a task whose submission was refused). The lease is (re)started for the project's lease length.

    A task that cannot be shown is skipped for this annotator, with the reason recorded on the lease
    and logged, and the next one is leased instead. None when nothing is left for this annotator,
    or when every lease they may hold is excluded.
    """
    excluded = set(exclude_ids)
    while assignment := _lease_next(project=project, annotator=annotator, exclude_ids=excluded, resume_id=resume_id):
        try:
            return task_for_assignment(assignment=assignment)
        except TaskUnrenderable as error:
            reason = f"{UNSHOWABLE_SKIP_PREFIX} {error}."[:SKIP_REASON_MAX]
            logger.warning(
                "Skipped task %s (prompt %s) for %s: %s", assignment.pk, assignment.prompt_id, annotator, reason
            )
            _skip(project=project, annotator=annotator, task_id=assignment.pk, reason=reason)
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
    skipped = _skip(project=project, annotator=annotator, task_id=task_id, reason=reason)
    assignment = Assignment.objects.filter(pk=task_id, project=project, annotator=annotator).first()
    if assignment is None:
        raise ValidationError({"task_id": "This task is not leased to you (its lease may have expired)."})
    if not skipped and assignment.state == Assignment.State.DONE:
        raise ValidationError({"task_id": "You already judged this task."})
    return assignment
