"""Recording a human judgement on a leased task.

Everything is validated before anything is written; a mistake becomes a ValidationError
keyed by the field at fault. The write is one short transaction: mark the lease done (a
conditional update, so two racing submissions cannot both win), store the judgement, count
it on the prompt's row in its round. A repeated client UUID returns the first judgement and writes nothing.
"""

from __future__ import annotations

import uuid
from collections import Counter
from dataclasses import dataclass, fields, replace
from typing import Any

from django.contrib.auth.models import User
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.db.models import F
from django.utils import timezone

from feedback.models import (
    Assignment,
    Judgement,
    PairwiseJudgement,
    Project,
    RankedCompletion,
    RankingJudgement,
    Round,
    RoundPrompt,
)
from feedback.queue import enqueue
from feedback.selectors.tasks import task_kind

RATIONALE_MAX = 5000
TIME_MS_MAX = 24 * 60 * 60 * 1000


@dataclass(frozen=True)
class JudgementSubmission:
    """What an annotator sends for one task, from validation to the stored row.

    The annotate form's fields and the API's input fields have these names, so each caller builds
    it from its parsed data in one step, and a new field is added here and there only. A field named
    as a field of the judgement model is stored in it as it is (after validation).
    """

    task_id: int
    client_uuid: uuid.UUID
    kind: str
    choice: str = ""
    strength: str = ""
    ranking: list[list[int]] | None = None  # groups of completion ids, best first; a group's completions are tied
    rationale: str = ""
    time_ms: int | None = None


@dataclass(frozen=True)
class SubmittedJudgement:
    judgement: Judgement
    created: bool
    ranking: list[list[int]] | None = None  # a ranking judgement's groups, best first


class _LostRace(Exception):
    pass


def judgement_find(*, project: Project, client_uuid: uuid.UUID) -> Judgement | None:
    """The judgement with this client UUID, if any, of either kind (a ranking project's battles are pairs)."""
    kinds: tuple[type[PairwiseJudgement] | type[RankingJudgement], ...] = (PairwiseJudgement, RankingJudgement)
    if project.mode == Project.Mode.RANKING:
        kinds = kinds[::-1]
    for kind in kinds:
        found = kind.objects.filter(client_uuid=client_uuid).first()
        if found is not None:
            return found
    return None


def judgement_ranking(*, judgement: RankingJudgement) -> list[list[int]]:
    """The ranking as groups of completion ids, best first; tied completions share a group."""
    groups: dict[int, list[int]] = {}
    for rank, completion_id in judgement.ranked.order_by("rank", "position").values_list("rank", "completion_id"):
        groups.setdefault(rank, []).append(completion_id)
    return [groups[rank] for rank in sorted(groups)]


def _validate_fields(*, project: Project, submission: JudgementSubmission, kind: str) -> dict[str, str]:
    errors: dict[str, str] = {}
    if submission.kind != kind:
        if kind == project.mode:
            errors["kind"] = f"This project is in {project.mode} mode; send kind '{project.mode}'."
        else:
            errors["kind"] = f"This task is a blind comparison of two answers; send kind '{kind}'."
        return errors
    choice, strength = submission.choice, submission.strength
    if submission.kind == Project.Mode.PAIRWISE:
        if not choice:
            errors["choice"] = "Choose A better, B better, tie or both bad."
        elif choice not in PairwiseJudgement.Choice.values:
            errors["choice"] = f"'{choice}' is not a choice; use one of {', '.join(PairwiseJudgement.Choice.values)}."
        if strength and strength not in PairwiseJudgement.Strength.values:
            errors["strength"] = f"'{strength}' is not a strength; use slight or clear, or leave it out."
        if submission.ranking:
            errors["ranking"] = "A pairwise judgement has a choice, not a ranking."
    else:
        if not submission.ranking:
            errors["ranking"] = "Rank the completions: a list of groups of completion ids, best first."
        if choice or strength:
            errors["choice"] = "A ranking judgement has a ranking, not a choice or strength."
    if len(submission.rationale) > RATIONALE_MAX:
        errors["rationale"] = f"Keep the rationale under {RATIONALE_MAX} characters."
    if submission.time_ms is not None and not 0 <= submission.time_ms <= TIME_MS_MAX:
        errors["time_ms"] = "The time on task must be between 0 and 24 hours, in milliseconds."
    return errors


def _validate_ranking(*, ranking: list[list[int]], assignment: Assignment) -> str | None:
    # Sizes first, so a ranking far longer than the task is refused before any work on its ids.
    size = len(assignment.display_order)
    if len(ranking) > size:
        return f"The ranking has {len(ranking)} groups; this task has {size} completions."
    named = sum(len(group) for group in ranking)
    if named > size:
        return f"The ranking names {named} completions; this task has {size}."
    if any(not group for group in ranking):
        return "A group in the ranking is empty."
    flat = [completion_id for group in ranking for completion_id in group]
    repeated = sorted(completion_id for completion_id, times in Counter(flat).items() if times > 1)
    if repeated:
        return f"Each completion is ranked once; {', '.join(map(str, repeated))} appear more than once."
    expected = set(assignment.display_order)
    unknown = sorted(set(flat) - expected)
    if unknown:
        return f"Completions {', '.join(map(str, unknown))} are not part of this task."
    missing = sorted(expected - set(flat))
    if missing:
        return f"Rank every completion of the task; {', '.join(map(str, missing))} are missing."
    return None


def _validate_task(*, assignment: Assignment | None, annotator: User) -> str | None:
    if assignment is None:
        return "There is no such task, or its lease expired and the item went to someone else; fetch a new task."
    if assignment.annotator_id != annotator.pk:
        return "This task is leased to someone else."
    if assignment.state == Assignment.State.DONE:
        return "You already judged this task."
    if assignment.state == Assignment.State.SKIPPED:
        return "You skipped this task."
    return None


def _repeat_of(*, project: Project, annotator: User, submission: JudgementSubmission) -> SubmittedJudgement | None:
    existing = judgement_find(project=project, client_uuid=submission.client_uuid)
    if existing is None:
        return None
    if existing.annotator_id != annotator.pk or existing.assignment_id != submission.task_id:
        raise ValidationError({"client_uuid": "This client UUID was already used for another judgement."})
    ranking = judgement_ranking(judgement=existing) if isinstance(existing, RankingJudgement) else None
    return SubmittedJudgement(judgement=existing, created=False, ranking=ranking)


def judgement_submit(*, project: Project, annotator: User, submission: JudgementSubmission) -> SubmittedJudgement:
    """Record the annotator's judgement on the task leased to them.

    A ranking's groups get ranks 1 for the first group, 2 for the next, ...; tied completions
    share a group and a rank.
    """
    # A repeated client UUID is not looked up here: its task is already done, so it fails validation
    # (or, racing, the insert) below, and both of those paths return the first judgement.
    submission = replace(submission, rationale=submission.rationale.strip())
    assignment = Assignment.objects.filter(pk=submission.task_id, project=project).select_related("round").first()
    kind = task_kind(assignment=assignment) if assignment is not None else project.mode
    errors = _validate_fields(project=project, submission=submission, kind=kind)
    task_error = _validate_task(assignment=assignment, annotator=annotator)
    if task_error:
        errors["task_id"] = task_error
    elif assignment is not None and submission.ranking and submission.kind == kind == Project.Mode.RANKING:
        ranking_error = _validate_ranking(ranking=submission.ranking, assignment=assignment)
        if ranking_error:
            errors["ranking"] = ranking_error
    if errors:
        # the same submission may have been stored between the first look and now (a double click)
        repeat = _repeat_of(project=project, annotator=annotator, submission=submission)
        if repeat is not None:
            return repeat
        raise ValidationError(errors)
    assert assignment is not None

    try:
        with transaction.atomic():
            judgement = _write(project=project, annotator=annotator, assignment=assignment, submission=submission)
    except (IntegrityError, _LostRace):
        # Someone (most often this annotator's own double click) got there first.
        repeat = _repeat_of(project=project, annotator=annotator, submission=submission)
        if repeat is not None:
            return repeat
        fresh = Assignment.objects.filter(pk=submission.task_id, project=project).first()
        raise ValidationError(
            {"task_id": _validate_task(assignment=fresh, annotator=annotator) or "This task changed; try again."}
        ) from None
    if assignment.round.kind == Round.Kind.BATTLE:
        enqueue("promotion_gate_task", project.pk)  # a battle judgement may decide a waiting version
    ranking = submission.ranking if isinstance(judgement, RankingJudgement) else None
    return SubmittedJudgement(judgement=judgement, created=True, ranking=ranking)


def _write(*, project: Project, annotator: User, assignment: Assignment, submission: JudgementSubmission) -> Judgement:
    now = timezone.now()
    finished = Assignment.objects.filter(pk=assignment.pk, annotator=annotator, state=Assignment.State.LEASED).update(
        state=Assignment.State.DONE, annotator_slot=None, finished_at=now
    )
    if not finished:
        raise _LostRace
    where = {  # who judged which lease of which round's prompt
        "project": project,
        "annotator": annotator,
        "assignment": assignment,
        "prompt_id": assignment.prompt_id,
        "round_id": assignment.round_id,
    }
    judgement: Judgement
    if task_kind(assignment=assignment) == Project.Mode.PAIRWISE:
        left, right = assignment.display_order
        judgement = PairwiseJudgement.objects.create(
            **where,
            **_stored(PairwiseJudgement, submission),
            left_id=left,
            right_id=right,
            item_key=assignment.item_key,
        )
    else:
        assert submission.ranking is not None
        judgement = RankingJudgement.objects.create(**where, **_stored(RankingJudgement, submission))
        position = {completion_id: index for index, completion_id in enumerate(assignment.display_order)}
        RankedCompletion.objects.bulk_create(
            RankedCompletion(judgement=judgement, completion_id=c, rank=rank, position=position[c])
            for rank, group in enumerate(submission.ranking, start=1)
            for c in group
        )
    RoundPrompt.objects.filter(round_id=assignment.round_id, prompt_id=assignment.prompt_id).update(
        judgement_count=F("judgement_count") + 1
    )
    return judgement


def _stored(judgement: type[Judgement], submission: JudgementSubmission) -> dict[str, Any]:
    """The submission's values of the fields this kind of judgement has by the same names."""
    sent = {f.name for f in fields(JudgementSubmission)}
    return {f.name: getattr(submission, f.name) for f in judgement._meta.concrete_fields if f.name in sent}
