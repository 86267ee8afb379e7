"""Reading the task queue: what an annotator may take next, what a task shows, how far a project is.

An item is one round's completions of a prompt (ranking mode) or an unordered pair of them
(pairwise mode); a task never mixes two rounds. A task covers the first K of the prompt's
completions in that round by id, K being the project's completions per prompt, so in pairwise
mode a prompt has K(K-1)/2 items per round and every completion meets every other once.
A battle round's items are always pairs, one completion of each writer, whatever the project's
mode; they are served at the project's battle share of an annotator's tasks (before ordinary items
when the annotator's share of battles is below it, after them otherwise).
Rounds are served newest first; within a round prompts are visited least-judged first through
the (round, judgement_count, id) index of RoundPrompt; within a prompt the pair held fewest
times wins, then the pair whose completions have been shown least, so completions meet each
other evenly while a round is under way.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from itertools import combinations
from typing import Any

from django.contrib.auth.models import User
from django.db.models import Case, Count, F, IntegerField, OuterRef, Q, Subquery, Sum, Value, When
from django.db.models.expressions import CombinedExpression
from django.db.models.functions import Coalesce, Greatest, Least

from feedback.models import (
    Assignment,
    Completion,
    PairwiseJudgement,
    Project,
    Prompt,
    RankingJudgement,
    Round,
    RoundPrompt,
)
from feedback.selectors.gold import imported_completion_ids

FIRST_BATCH = 8
MAX_BATCH = 256


def item_key_for_prompt(prompt_id: int, round_id: int) -> str:
    return f"p{prompt_id}-r{round_id}"


def item_key_for_pair(completion_id: int, other_id: int) -> str:
    low, high = sorted((completion_id, other_id))
    return f"c{low}-{high}"


def items_per_prompt(*, project: Project, completions: int, pairwise: bool | None = None) -> int:
    """How many items a prompt with this many completions (at most K count) makes, in pairs when ``pairwise``
    (by default: when the project is in pairwise mode)."""
    n = min(completions, project.completions_per_prompt)
    if n < 2:
        return 0
    if pairwise is None:
        pairwise = project.mode == Project.Mode.PAIRWISE
    return n * (n - 1) // 2 if pairwise else 1


@dataclass(frozen=True)
class ItemCandidate:
    """An item the annotator may lease, and the slot they would take."""

    prompt_id: int
    round_id: int
    item_key: str
    completion_ids: tuple[int, ...]
    slot: int
    expired_lease_id: int | None  # an abandoned lease on that slot, to be deleted when the slot is taken
    pairwise: bool  # a pair of completions (pairwise mode, or a battle) rather than a ranking of the group


@dataclass(frozen=True)
class Task:
    assignment: Assignment
    kind: str
    messages: list[dict[str, str]]
    completions: list[Completion]  # in display order: A then B in pairwise mode

    @property
    def task_id(self) -> int:
        return self.assignment.pk

    @property
    def lease_expires_at(self) -> datetime:
        return self.assignment.expires_at


@dataclass(frozen=True)
class TaskProgress:
    judged_by_me: int
    judged_total: int
    left: int


def task_leases_held(*, project: Project, annotator: User) -> list[Assignment]:
    """The annotator's unfinished leases in the project, oldest first (at most LEASES_PER_ANNOTATOR).

    A lease past its expiry still counts while its row exists: nobody has taken its slot yet.
    """
    leases = Assignment.objects.filter(project=project, annotator=annotator, state=Assignment.State.LEASED)
    return list(leases.order_by("created_at", "pk"))


def _first_completions(*, round_id: int, prompt_ids: list[int], k: int) -> dict[int, list[int]]:
    by_prompt: dict[int, list[int]] = defaultdict(list)
    rows = Completion.objects.filter(round_id=round_id, prompt_id__in=prompt_ids).order_by("prompt_id", "pk")
    for prompt_id, completion_id in rows.values_list("prompt_id", "pk"):
        if len(by_prompt[prompt_id]) < k:
            by_prompt[prompt_id].append(completion_id)
    return by_prompt


def _items(
    *, prompt_id: int, round_id: int, completion_ids: list[int], pairwise: bool
) -> list[tuple[str, tuple[int, ...]]]:
    """A prompt's items in a round, each (item key, its completions): every pair, or the whole group."""
    if len(completion_ids) < 2:
        return []
    if pairwise:
        return [(item_key_for_pair(a, b), (a, b)) for a, b in combinations(completion_ids, 2)]
    return [(item_key_for_prompt(prompt_id, round_id), tuple(completion_ids))]


def _candidates_for_prompt(
    *,
    project: Project,
    annotator_id: int,
    prompt_id: int,
    round_id: int,
    completion_ids: list[int],
    pairwise: bool,
    rows_by_item: dict[str, list[dict[str, Any]]],
    now: datetime,
) -> list[ItemCandidate]:
    items = _items(prompt_id=prompt_id, round_id=round_id, completion_ids=completion_ids, pairwise=pairwise)

    shown: dict[int, int] = defaultdict(int)  # completion id -> live slots on pairs that include it
    options = []
    for key, members in items:
        rows = rows_by_item.get(key, [])
        live = [r for r in rows if r["slot"] is not None and (r["state"] == "done" or r["expires_at"] > now)]
        for member in members:
            shown[member] += len(live)
        if len(live) >= project.overlap or any(r["annotator_id"] == annotator_id for r in rows):
            continue
        taken = {r["slot"] for r in live}
        slot = min(set(range(project.overlap)) - taken)
        expired = next((r["pk"] for r in rows if r["slot"] == slot), None)
        options.append((len(live), key, members, slot, expired))

    ranked = sorted(
        options,
        key=lambda o: (o[0], sum(shown[m] for m in o[2]), random.random()),
    )
    return [
        ItemCandidate(prompt_id, round_id, key, members, slot, expired, pairwise)
        for _, key, members, slot, expired in ranked
    ]


def task_candidates_for_annotator(*, project: Project, annotator: User, now: datetime) -> Iterator[ItemCandidate]:
    """Items the annotator may lease, newest round first and least-judged first in a round, each with a free slot.

    A round's prompts come from an index range scan in (judgement_count, id) order, a batch at a
    time, so a round with a million judgements costs the same as an empty one; a round whose items
    are all judged costs one empty read. The first batch is small (the first candidate usually wins);
    batches double while they yield nothing. What a batch offers is read from one snapshot; the
    caller takes a slot with an insert that the database refuses if someone was faster, and moves
    on to the next candidate. Gold items come first when one is due, and are otherwise not served;
    battle rounds come first when a battle is due, last otherwise (``_specials_due``).
    """
    rounds = list(Round.objects.filter(project=project).order_by("-number").values_list("pk", "kind"))
    battles = [pk for pk, kind in rounds if kind == Round.Kind.BATTLE] if project.battle_share > 0 else []
    training = [pk for pk, kind in rounds if kind == Round.Kind.TRAINING]
    gold = set(Prompt.objects.filter(project=project, gold__isnull=False).values_list("pk", flat=True))
    gold_due, battle_due = _specials_due(project=project, annotator=annotator, battles=battles, gold=gold)
    if gold_due:
        yield from _gold_candidates(project=project, annotator=annotator, gold=gold)
    for round_id in battles + training if battle_due else training + battles:
        battle = round_id in battles
        pairwise = battle or project.mode == Project.Mode.PAIRWISE
        # a battle prompt has one pair: its row leaves the queue's scan once that pair has its judgements
        completions = 2 if battle else project.completions_per_prompt
        capacity = project.overlap * items_per_prompt(project=project, completions=completions, pairwise=pairwise)
        if capacity == 0:
            continue
        yield from _round_candidates(
            project=project,
            annotator=annotator,
            round_id=round_id,
            pairwise=pairwise,
            capacity=capacity,
            gold=gold,
            now=now,
        )


def _specials_due(*, project: Project, annotator: User, battles: list[int], gold: set[int]) -> tuple[bool, bool]:
    """Whether a gold item, and whether a battle, is due for the annotator.

    A gold item is due when one more keeps their share of gold tasks within the project's gold share;
    gold items come out of the battle budget, so a battle is due when battles and gold items together
    stay within the battle share.
    """
    if not battles and not (gold and project.gold_share > 0):
        return False, False
    taken = Assignment.objects.filter(project=project, annotator=annotator).aggregate(
        tasks=Count("pk"),
        battles=Count("pk", filter=Q(round_id__in=battles)),
        gold=Count("pk", filter=Q(prompt_id__in=gold)),
    )
    tasks = taken["tasks"] + 1
    gold_due = bool(gold) and taken["gold"] + 1 <= project.gold_share * tasks
    battle_due = bool(battles) and taken["battles"] + taken["gold"] + 1 <= project.battle_share * tasks
    return gold_due, battle_due


def _gold_candidates(*, project: Project, annotator: User, gold: set[int]) -> Iterator[ItemCandidate]:
    """The gold items the annotator has not met, in random order. They have no overlap cap: each annotator
    meets each once, in the first slot nobody holds. A gold item is one of the items of the round the prompt
    was imported in (the completions its gold answer ranks).

    What the annotator has met is read through the (project, annotator, prompt, round) index, and an item's
    slots through the (item_key, slot) index when it is offered: the cost follows the annotator, not the gold
    items' whole history (a gold item collects a judgement from every annotator)."""
    pairwise = project.mode == Project.Mode.PAIRWISE
    met = set(
        Assignment.objects.filter(project=project, annotator=annotator, prompt_id__in=gold).values_list(
            "item_key", flat=True
        )
    )
    if not pairwise and len(met) >= len(gold):
        return  # one item a gold prompt, all met
    imported = imported_completion_ids(prompt_ids=gold)
    for prompt_id in random.sample(sorted(imported), len(imported)):
        round_id, ids = imported[prompt_id]
        ids = ids[: project.completions_per_prompt]
        items = _items(prompt_id=prompt_id, round_id=round_id, completion_ids=ids, pairwise=pairwise)
        for key, members in random.sample(items, len(items)):
            if key in met:
                continue
            taken = set(Assignment.objects.filter(item_key=key, slot__isnull=False).values_list("slot", flat=True))
            slot = next(n for n in range(len(taken) + 1) if n not in taken)
            yield ItemCandidate(prompt_id, round_id, key, members, slot, None, pairwise)


def _round_candidates(
    *,
    project: Project,
    annotator: User,
    round_id: int,
    pairwise: bool,
    capacity: int,
    gold: set[int],
    now: datetime,
) -> Iterator[ItemCandidate]:
    queue = RoundPrompt.objects.filter(round_id=round_id, judgement_count__lt=capacity).order_by(
        "judgement_count", "pk"
    )
    cursor: tuple[int, int] | None = None
    batch_size = FIRST_BATCH
    while True:
        page = queue
        if cursor is not None:
            count, last_id = cursor
            page = page.filter(Q(judgement_count__gt=count) | Q(judgement_count=count, pk__gt=last_id))
        batch = list(page.values_list("pk", "prompt_id", "judgement_count")[:batch_size])
        if not batch:
            return
        last_id, _, last_count = batch[-1]
        cursor = (last_count, last_id)
        prompt_ids = [prompt_id for _, prompt_id, _ in batch if prompt_id not in gold]  # gold: _gold_candidates
        completions = _first_completions(round_id=round_id, prompt_ids=prompt_ids, k=project.completions_per_prompt)
        rows_by_item: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for row in Assignment.objects.filter(round_id=round_id, prompt_id__in=prompt_ids).values(
            "pk", "item_key", "slot", "annotator_id", "state", "expires_at"
        ):
            rows_by_item[row["item_key"]].append(dict(row))
        for prompt_id in prompt_ids:
            yield from _candidates_for_prompt(
                project=project,
                annotator_id=annotator.pk,
                prompt_id=prompt_id,
                round_id=round_id,
                completion_ids=completions.get(prompt_id, []),
                pairwise=pairwise,
                rows_by_item=rows_by_item,
                now=now,
            )
        if len(batch) < batch_size:
            return
        batch_size = min(batch_size * 2, MAX_BATCH)


class TaskUnrenderable(Exception):
    """A lease whose stored prompt or completions no page or API answer can show; the message says why."""


def _text_problem(value: object, where: str) -> str | None:
    if not isinstance(value, str):
        return f"{where} is not text"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:  # a lone surrogate: valid in JSON and in Python, not in UTF-8
        return f"{where} holds a lone surrogate (\\u{ord(value[error.start]):04x}) at character {error.start + 1}"
    return None


def _messages_problem(messages: object) -> str | None:
    if not isinstance(messages, list) or not messages:
        return "the prompt's messages are not a list of turns"
    for number, message in enumerate(messages, start=1):
        if not isinstance(message, dict):
            return f"message {number} of the prompt is not a role and a content"
        for key in ("role", "content"):
            problem = _text_problem(message.get(key), f"the {key} of message {number} of the prompt")
            if problem:
                return problem
    return None


def task_for_assignment(*, assignment: Assignment) -> Task:
    """What the annotator sees for a lease: the conversation and the completions in display order.

    Raises TaskUnrenderable when the stored rows cannot be sent (messages that are not turns of role
    and content, or that hold a lone surrogate, which JSON stores escaped but UTF-8 cannot encode; a
    completion deleted since the lease was taken), so that the caller can skip the task instead of
    failing on every request for it. Completion texts need no such check: a text column cannot hold
    a lone surrogate in the first place.
    """
    by_id = Completion.objects.select_related("prompt").in_bulk(assignment.display_order)
    missing = [pk for pk in assignment.display_order if pk not in by_id]
    if missing:
        raise TaskUnrenderable(f"completion {missing[0]} of the task no longer exists")
    completions = [by_id[pk] for pk in assignment.display_order]
    # the completions belong to the lease's prompt: one query brings both
    messages = completions[0].prompt.messages
    problem = _messages_problem(messages)
    if problem:
        raise TaskUnrenderable(problem)
    return Task(
        assignment=assignment, kind=task_kind(assignment=assignment), messages=messages, completions=completions
    )


def task_kind(*, assignment: Assignment) -> str:
    """A task is a pair (pairwise mode, or a battle in any mode) or a ranking of the prompt's group."""
    return Project.Mode.PAIRWISE if assignment.completion_a_id else Project.Mode.RANKING


def task_kind_by_id(*, project: Project, task_id: int) -> str:
    """The kind of the project's task with this id; the project's mode when there is no such task."""
    assignment = Assignment.objects.filter(pk=task_id, project=project).only("completion_a_id").first()
    return task_kind(assignment=assignment) if assignment is not None else project.mode


def judgements_left(*, project: Project) -> int:
    """Judgements the project still wants on the items its rounds' completions make now.

    An item never wants more than the capacity of K completions, so only a round's prompts counted
    below it are read: the cost follows the open part of the queue, not the whole project. Each
    prompt's items in its round are worked out inside one correlated subquery, as the pairwise
    formula names the completion count twice and SQLite would otherwise count the completions twice.
    """
    capacity = project.overlap * items_per_prompt(project=project, completions=project.completions_per_prompt)
    items: Case | CombinedExpression
    if project.mode == Project.Mode.RANKING:
        items = Case(When(n__gte=2, then=Value(1)), default=Value(0), output_field=IntegerField())
    else:
        items = F("n") * (F("n") - 1) / 2
    items_of_prompt = Subquery(
        Completion.objects.filter(round=OuterRef("round"), prompt=OuterRef("prompt"))
        .order_by()
        .values("prompt")
        .annotate(n=Least(Count("pk"), Value(project.completions_per_prompt)))
        .annotate(items=items)
        .values("items")[:1],
        output_field=IntegerField(),
    )
    wanted = Coalesce(items_of_prompt, Value(0)) * project.overlap
    left = RoundPrompt.objects.filter(round__project=project, judgement_count__lt=capacity).aggregate(
        left=Sum(Greatest(wanted - F("judgement_count"), Value(0)))
    )["left"]
    return left or 0


def task_progress(*, project: Project, annotator: User) -> TaskProgress:
    """Judgements by this annotator, by everyone (battles included), and how many the project still wants."""
    kinds = (PairwiseJudgement, RankingJudgement)
    return TaskProgress(
        judged_by_me=sum(kind.objects.filter(project=project, annotator=annotator).count() for kind in kinds),
        judged_total=sum(kind.objects.filter(project=project).count() for kind in kinds),
        left=judgements_left(project=project),
    )
