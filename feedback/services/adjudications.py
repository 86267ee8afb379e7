"""A reviewer's final verdict on an item, and undoing it.

A verdict replaces the annotators' votes on the item in exports and training snapshots while it is in
force; the judgements themselves are never changed. Only the project's reviewers and managers (and
staff) give or undo verdicts: anyone else gets PermissionDenied (Http404 for a non-member, as
`project_role_check` says). Every other mistake is a ValidationError keyed by the field at fault,
raised before anything is written.
"""

from __future__ import annotations

from typing import Any

from django.contrib.auth.models import User
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.utils import timezone

from feedback.ids import id_from
from feedback.models import Adjudication, Membership, Project
from feedback.selectors.access import project_role_check
from feedback.selectors.review import (
    PAIRWISE_VERDICTS,
    RANKING_VERDICTS,
    ItemKey,
    item_completion_ids,
    item_key_parse,
    reviewable_item,
)

NOTE_MAX = 2000


def _ranks_check(ranks: Any, completion_ids: list[int]) -> dict[str, int]:
    """The ranks as stored ({str(completion id): rank}, by id), or a ValidationError on ``ranks``."""
    if not isinstance(ranks, dict) or not ranks:
        raise ValidationError({"ranks": "A ranking verdict needs ranks: {completion id: rank, ...}, 1 = best."})
    given: dict[int, int] = {}
    for key, rank in ranks.items():
        completion_id = id_from(key) if isinstance(key, str) else (key if type(key) is int else None)
        if completion_id is None or completion_id not in completion_ids:
            raise ValidationError({"ranks": f"{key!r} is not a completion of this item ({_ids(completion_ids)})."})
        if type(rank) is not int or not 1 <= rank <= len(completion_ids):
            raise ValidationError(
                {"ranks": f"completion {completion_id}'s rank must be a whole number from 1 to {len(completion_ids)}."}
            )
        if completion_id in given:
            raise ValidationError({"ranks": f"completion {completion_id} is ranked more than once."})
        given[completion_id] = rank
    missing = sorted(set(completion_ids) - set(given))
    if missing:
        raise ValidationError({"ranks": f"Rank every completion of the item; {_ids(missing)} missing."})
    used = sorted(set(given.values()))
    if used != list(range(1, len(used) + 1)):
        raise ValidationError(
            {"ranks": "Ranks run 1, 2, 3 ... without gaps; tied completions share a rank (1, 1, 2, not 1, 1, 3)."}
        )
    return {str(completion_id): given[completion_id] for completion_id in sorted(given)}


def _ids(ids: list[int]) -> str:
    return ", ".join(map(str, ids))


def adjudication_record(
    *,
    project: Project,
    reviewer: User,
    item_key: str,
    verdict: str,
    ranks: dict[str, Any] | None = None,
    note: str = "",
) -> Adjudication:
    """Record the reviewer's verdict on an item; it is in force until undone.

    Pairwise items take ``a`` (the lower completion id is better), ``b``, ``tie`` or ``both_bad``; ranking
    items take ``ranking`` with ``ranks`` over every completion of the item (1 = best, ties share a rank,
    no gaps); both take ``unusable`` (the item leaves training altogether). An item must have a judgement
    in one of the project's training rounds (battles are not training data).

    A verdict on an item that already has one in force replaces it: in one transaction the old one is undone
    (by this reviewer, now) and stays in the history, and the new one is in force.
    """
    project_role_check(user=reviewer, project=project, role=Membership.Role.REVIEWER)
    item = reviewable_item(project=project, item_key=item_key)
    allowed = PAIRWISE_VERDICTS if item.kind == "pairwise" else RANKING_VERDICTS
    if verdict not in allowed:
        raise ValidationError({"verdict": f"A {item.kind} item takes {', '.join(allowed)}; not {verdict!r}."})
    if verdict == Adjudication.Verdict.RANKING:
        stored_ranks: dict[str, int] | None = _ranks_check(ranks, item_completion_ids(project=project, item=item))
    elif ranks is not None:
        raise ValidationError({"ranks": "Only a ranking verdict has ranks."})
    else:
        stored_ranks = None
    if not isinstance(note, str) or len(note.strip()) > NOTE_MAX:
        raise ValidationError({"note": f"Keep the note under {NOTE_MAX} characters."})
    prompt_id = _prompt_id(project, item)
    try:
        with transaction.atomic():
            Adjudication.objects.filter(project=project, item_key=item.key, undone_at__isnull=True).update(
                undone_at=timezone.now(), undone_by=reviewer
            )
            return Adjudication.objects.create(
                project=project,
                prompt_id=prompt_id,
                item_key=item.key,
                verdict=verdict,
                ranks=stored_ranks,
                note=note.strip(),
                reviewer=reviewer,
            )
    except IntegrityError:  # another verdict on the item came in force at the same moment
        raise ValidationError(
            {"item_key": f"Another verdict on {item.key} was recorded at the same moment; reload it and look again."}
        ) from None


def _prompt_id(project: Project, item: ItemKey) -> int:
    if item.kind == "ranking":
        return item.prompt_id
    return project.pairwisejudgements.filter(item_key=item.key).values_list("prompt_id", flat=True)[0]


def adjudication_undo(
    *, project: Project, user: User, adjudication_id: int | None = None, item_key: str | None = None
) -> Adjudication:
    """Undo a verdict in force, named by its id or by its item's key: the annotators' votes count again.

    The verdict stays in the item's history with who undid it and when. A verdict already undone, or an
    item without a verdict in force, is a ValidationError on the field that named it.
    """
    project_role_check(user=user, project=project, role=Membership.Role.REVIEWER)
    if (adjudication_id is None) == (item_key is None):
        raise ValidationError("Name the verdict to undo by its adjudication_id or by its item_key, not both.")
    if adjudication_id is not None:
        field = "adjudication_id"
        adjudication = Adjudication.objects.filter(project=project, pk=adjudication_id).first()
        if adjudication is None:
            raise ValidationError({field: f"No verdict {adjudication_id} in project '{project.slug}'."})
        if adjudication.undone_at is not None:
            raise ValidationError({field: f"Verdict {adjudication_id} is not in force: it was undone already."})
    else:
        assert item_key is not None
        field = "item_key"
        key = item_key_parse(item_key).key
        adjudication = Adjudication.objects.filter(project=project, item_key=key, undone_at__isnull=True).first()
        if adjudication is None:
            raise ValidationError({field: f"No verdict is in force on {key}."})
    now = timezone.now()
    undone = Adjudication.objects.filter(pk=adjudication.pk, undone_at__isnull=True).update(
        undone_at=now, undone_by=user
    )
    if not undone:  # undone by someone else at the same moment
        raise ValidationError({field: f"Verdict {adjudication.pk} is not in force: it was undone already."})
    adjudication.refresh_from_db()
    return adjudication
