"""The reviewer's queue: items whose judgements disagree, most contentious first, and everything about one item.

An item is what the annotators judged, named by the same ``item_key`` as their leases: ``c<low>-<high>``, a
pair of completions (pairwise judgements), or ``p<prompt>-r<round>``, one round's completions of a prompt
(ranking judgements). Battle rounds' items are not reviewable: they are never training data.

**Which items are queued.** An item of a training round is in the queue when any of these holds:

- its votes are split: two or more judgements and no choice (pairwise) or no rank of some completion
  (ranking) that all of them give;
- a judgement on it fails the gold answer (`feedback.selectors.gold`): a pairwise choice other than the
  known one, a ranking that orders a pair the known answer orders the other way or ties it;
- a flagged annotator judged it (a flag of `project_quality_cached`, the Quality page's figures).

Every annotator's vote counts here, an excluded annotator's too (the reviewer sees them marked excluded).
Items with a verdict in force are "adjudicated", the others "open"; the adjudicated list also holds
verdicts on items that are no longer contentious, so that any verdict can be found and undone.

**Contention**, the queue's order, most contentious first::

    contention = (1 - majority share) + 0.5 * gold failure share + 0.25 * flagged share

- majority share, pairwise: the most common choice's share of the item's votes, choices read by content
  (the lower completion id preferred, the higher, tie, both bad) whatever side each was shown on;
  ranking: over the item's completions, the lowest share of the most common rank a completion got;
  1 for an item with one vote;
- gold failure share: the share of the item's votes that fail its gold answer (0 without one);
- flagged share: the share of the item's votes by flagged annotators.

Ties go to the item with more votes, then the lower prompt id, then the item key. Every count is read
with aggregating queries (one row per item, and only for items that may be queued); only the judgements
on gold prompts are read one by one, as the Quality figures read them.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from itertools import combinations, groupby
from operator import itemgetter
from typing import Any, Literal

from django.core.exceptions import ValidationError
from django.db import connection
from django.db.models import Count, F, IntegerField, Min, Q, QuerySet, Value
from django.http import Http404

from feedback.ids import id_from
from feedback.models import (
    Adjudication,
    AnnotatorExclusion,
    Completion,
    PairwiseJudgement,
    Project,
    Prompt,
    RankedCompletion,
    RankingJudgement,
    Round,
)
from feedback.selectors.gold import gold_completion_ranks
from feedback.selectors.quality import project_quality_cached

GOLD_WEIGHT = 0.5
FLAGGED_WEIGHT = 0.25
STATES = ("open", "adjudicated")
ITEM_KEY_MAX = Adjudication._meta.get_field("item_key").max_length or 64
PAIRWISE_VERDICTS = ("a", "b", "tie", "both_bad", "unusable")
RANKING_VERDICTS = ("ranking", "unusable")
PREVIEW_CHARS = 160

_PAIR_KEY = re.compile(r"c([0-9]+)-([0-9]+)")
_PROMPT_ROUND_KEY = re.compile(r"p([0-9]+)-r([0-9]+)")


@dataclass(frozen=True, kw_only=True)
class ItemKey:
    """A parsed item key: a pair of completions (lower id first) or one round's completions of a prompt."""

    key: str
    kind: Literal["pairwise", "ranking"]
    low: int = 0  # pairwise: the completion a verdict of "a" prefers
    high: int = 0
    prompt_id: int = 0  # ranking
    round_id: int = 0


def item_key_parse(item_key: str) -> ItemKey:
    """The item a key names; a ValidationError on ``item_key`` for anything else (a number with more digits than
    an id can have is not an id)."""
    if not isinstance(item_key, str) or len(item_key) > ITEM_KEY_MAX:
        raise ValidationError({"item_key": "is not an item key: 'c<low id>-<high id>' or 'p<prompt id>-r<round id>'."})
    pair = _PAIR_KEY.fullmatch(item_key)
    if pair:
        low, high = id_from(pair[1]), id_from(pair[2])
        if low is None or high is None:
            raise ValidationError({"item_key": f"{item_key!r} does not name two completion ids."})
        if low >= high:
            raise ValidationError(
                {"item_key": f"{item_key!r}: a pair names the lower completion id first, then a higher one."}
            )
        return ItemKey(key=f"c{low}-{high}", kind="pairwise", low=low, high=high)
    prompt_round = _PROMPT_ROUND_KEY.fullmatch(item_key)
    if prompt_round:
        prompt_id, round_id = id_from(prompt_round[1]), id_from(prompt_round[2])
        if prompt_id is None or round_id is None:
            raise ValidationError({"item_key": f"{item_key!r} does not name a prompt id and a round id."})
        return ItemKey(key=f"p{prompt_id}-r{round_id}", kind="ranking", prompt_id=prompt_id, round_id=round_id)
    raise ValidationError({"item_key": "is not an item key: 'c<low id>-<high id>' or 'p<prompt id>-r<round id>'."})


def _item_judgements(project: Project, item: ItemKey) -> QuerySet[PairwiseJudgement] | QuerySet[RankingJudgement]:
    if item.kind == "pairwise":
        return PairwiseJudgement.objects.filter(project=project, item_key=item.key)
    return RankingJudgement.objects.filter(project=project, prompt_id=item.prompt_id, round_id=item.round_id)


def reviewable_item(*, project: Project, item_key: str) -> ItemKey:
    """The item if a reviewer may judge it: judged at least once in one of the project's training rounds.

    A ValidationError on ``item_key`` says why not (malformed, never judged in the project, a battle item)."""
    item = item_key_parse(item_key)
    rounds = set(_item_judgements(project, item).order_by().values_list("round__kind", flat=True).distinct())
    if not rounds:
        raise ValidationError({"item_key": f"{item.key} has no judgements in project '{project.slug}'."})
    if Round.Kind.TRAINING not in rounds:
        raise ValidationError({"item_key": f"{item.key} is a battle item: battles are not training data."})
    return item


def item_completion_ids(*, project: Project, item: ItemKey) -> list[int]:
    """The completions an item's verdict is about, by id: the pair, or every completion its rankings ranked."""
    if item.kind == "pairwise":
        return [item.low, item.high]
    judged: Any = _item_judgements(project, item).order_by().values("id")
    ranked = RankedCompletion.objects.filter(judgement_id__in=judged).order_by().values_list("completion_id", flat=True)
    return sorted(set(ranked))


def verdicts_in_force(*, project: Project) -> dict[str, Adjudication]:
    """item_key -> the project's verdict in force on it (at most one per item; undone verdicts are history)."""
    in_force = Adjudication.objects.filter(project=project, undone_at__isnull=True).select_related("reviewer")
    return {v.item_key: v for v in in_force}


# --- the queue ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class QueueItem:
    item_key: str
    kind: str  # "pairwise" or "ranking"
    prompt_id: int
    round_number: int
    votes: int
    majority_share: float
    gold_failures: int
    flagged_votes: int
    contention: float
    verdict: str | None  # the verdict in force, if any

    @property
    def reasons(self) -> list[str]:
        """Why the item is queued: "split", "gold", "flagged" (none for a verdict on an agreed item)."""
        found = ["split"] if self.majority_share < 1 else []
        return found + ["gold"] * bool(self.gold_failures) + ["flagged"] * bool(self.flagged_votes)


def contention_score(*, majority_share: float, votes: int, gold_failures: int, flagged_votes: int) -> float:
    """The queue's order (see the module's docstring)."""
    return (1 - majority_share) + GOLD_WEIGHT * gold_failures / votes + FLAGGED_WEIGHT * flagged_votes / votes


def flagged_annotator_ids(*, project: Project) -> set[int]:
    """Annotators the project's Quality figures flag (unfiltered, cached)."""
    return {stats.annotator_id for stats in project_quality_cached(project=project).annotators if stats.flags}


def review_queue(*, project: Project, state: str = "open") -> list[QueueItem]:
    """The items to review in this state ("open": no verdict in force; "adjudicated"), most contentious first.

    A ValidationError on ``state`` for any other state."""
    if state not in STATES:
        raise ValidationError({"state": f"must be one of {', '.join(STATES)}, not {state!r}."})
    flagged = flagged_annotator_ids(project=project)
    in_force = verdicts_in_force(project=project)
    gold_failures = _gold_failures(project)
    rows = _pairwise_rows(project, flagged) + _ranking_rows(project, flagged)
    numbers = dict(project.rounds.values_list("id", "number"))
    queued = []
    for key, prompt_id, round_id, votes, share, flagged_votes in rows:
        failures = gold_failures.get(key, 0)
        verdict = in_force.get(key)
        if share >= 1 and not failures and not flagged_votes and verdict is None:
            continue
        if (verdict is None) != (state == "open"):
            continue
        queued.append(
            QueueItem(
                item_key=key,
                kind="pairwise" if key.startswith("c") else "ranking",
                prompt_id=prompt_id,
                round_number=numbers[round_id],
                votes=votes,
                majority_share=share,
                gold_failures=failures,
                flagged_votes=flagged_votes,
                contention=contention_score(
                    majority_share=share, votes=votes, gold_failures=failures, flagged_votes=flagged_votes
                ),
                verdict=verdict.verdict if verdict else None,
            )
        )
    queued.sort(key=lambda q: (-q.contention, -q.votes, q.prompt_id, q.item_key))
    return queued


def prompt_previews(*, prompt_ids: list[int]) -> dict[int, str]:
    """The start of each prompt's last turn (what the annotators answered), for a list of items."""
    previews = {}
    for prompt_id, messages in Prompt.objects.filter(pk__in=prompt_ids).values_list("pk", "messages"):
        text = _last_turn(messages)
        previews[prompt_id] = text if len(text) <= PREVIEW_CHARS else text[: PREVIEW_CHARS - 1] + "…"
    return previews


def _last_turn(messages: Any) -> str:
    if isinstance(messages, list) and messages and isinstance(messages[-1], dict):
        return str(messages[-1].get("content", ""))
    return ""


def _training_judgements(model: type[PairwiseJudgement] | type[RankingJudgement], project: Project) -> QuerySet:
    training = Round.objects.filter(project=project, kind=Round.Kind.TRAINING).values("id")
    return model.objects.filter(project=project, round_id__in=training).order_by()


def _flagged_count(flagged: set[int]) -> Any:
    # Count's filter with an empty IN list is refused by the ORM; no flagged annotator means no flagged votes
    return Count("id", filter=Q(annotator_id__in=sorted(flagged))) if flagged else Value(0, IntegerField())


def _maybe_queued_prompts(project: Project) -> Q:
    """Prompts whose items are read even when agreed: gold prompts (their failures are counted apart), and
    prompts with a verdict in force (the adjudicated list)."""
    return Q(of_prompt__in=project.prompts.filter(gold__isnull=False).values("id")) | Q(
        of_prompt__in=Adjudication.objects.filter(project=project, undone_at__isnull=True).values("prompt_id")
    )


Row = tuple[str, int, int, int, float, int]  # item key, prompt id, round id, votes, majority share, flagged votes


def _pairwise_rows(project: Project, flagged: set[int]) -> list[Row]:
    lower = Q(choice="a", left_id__lt=F("right_id")) | Q(choice="b", left_id__gt=F("right_id"))
    higher = Q(choice="a", left_id__gt=F("right_id")) | Q(choice="b", left_id__lt=F("right_id"))
    per_item = (
        _training_judgements(PairwiseJudgement, project)
        .values("item_key")
        .annotate(
            votes=Count("id"),
            lower=Count("id", filter=lower),
            higher=Count("id", filter=higher),
            tie=Count("id", filter=Q(choice="tie")),
            both_bad=Count("id", filter=Q(choice="both_bad")),
            flagged=_flagged_count(flagged),
            of_prompt=Min("prompt_id"),
            in_round=Min("round_id"),
        )
    )
    split = Q(votes__gte=2, lower__lt=F("votes"), higher__lt=F("votes"), tie__lt=F("votes"), both_bad__lt=F("votes"))
    if flagged:
        split |= Q(flagged__gt=0)
    rows = per_item.filter(split | _maybe_queued_prompts(project)).values_list(
        "item_key", "of_prompt", "in_round", "votes", "lower", "higher", "tie", "both_bad", "flagged"
    )
    return [
        (key, prompt_id, round_id, votes, max(counts) / votes, flagged_votes)
        for key, prompt_id, round_id, votes, *counts, flagged_votes in rows
    ]


def _ranking_rows(project: Project, flagged: set[int]) -> list[Row]:
    judged = _training_judgements(RankingJudgement, project)
    placed = (
        RankedCompletion.objects.filter(judgement_id__in=judged.values("id"))
        .order_by()
        .values_list("judgement__prompt_id", "judgement__round_id", "completion_id", "rank")
    )
    per_item = (
        judged.values("prompt_id", "round_id")
        .annotate(votes=Count("id"), flagged=_flagged_count(flagged))
        .values_list("prompt_id", "round_id", "votes", "flagged")
    )
    special = (
        project.prompts.filter(gold__isnull=False).values("id"),
        Adjudication.objects.filter(project=project, undone_at__isnull=True).values("prompt_id"),
    )
    placed_sql, placed_params = placed.query.sql_with_params()
    item_sql, item_params = per_item.query.sql_with_params()
    (gold_sql, gold_params), (verdict_sql, verdict_params) = (q.query.sql_with_params() for q in special)
    # Each completion's most common rank, as a share of its votes; an item's share is its least agreed completion's.
    query = (
        f"WITH r (prompt, in_round, completion, place) AS ({placed_sql}), "
        "c AS (SELECT prompt, in_round, completion, place, COUNT(*) AS n FROM r "
        "GROUP BY prompt, in_round, completion, place), "
        "u AS (SELECT prompt, in_round, completion, MAX(n) AS top, SUM(n) AS total FROM c "
        "GROUP BY prompt, in_round, completion), "
        "s AS (SELECT prompt, in_round, MIN(1.0 * top / total) AS share FROM u GROUP BY prompt, in_round), "
        f"j (prompt, in_round, votes, flagged) AS ({item_sql}) "
        "SELECT j.prompt, j.in_round, j.votes, s.share, j.flagged FROM j "
        "JOIN s ON s.prompt = j.prompt AND s.in_round = j.in_round "
        f"WHERE s.share < 1 OR j.flagged > 0 OR j.prompt IN ({gold_sql}) OR j.prompt IN ({verdict_sql})"
    )
    with connection.cursor() as cursor:
        cursor.execute(query, (*placed_params, *item_params, *gold_params, *verdict_params))
        rows = cursor.fetchall()
    return [
        (f"p{prompt_id}-r{round_id}", prompt_id, round_id, votes, float(share), flagged_votes)
        for prompt_id, round_id, votes, share, flagged_votes in rows
    ]


def _pairwise_truth(expected: dict[int, int], left: int, right: int) -> str | None:
    """The gold answer's choice on a pair as shown (left as A), or None when the answer does not cover both."""
    if left not in expected or right not in expected:
        return None
    return "tie" if expected[left] == expected[right] else ("a" if expected[left] < expected[right] else "b")


def _ranking_fails(expected: dict[int, int], given: dict[int, int]) -> bool | None:
    """Whether a ranking fails the gold answer on a pair it orders; None when the answer orders none of its pairs."""
    decided = False
    for a, b in combinations(sorted(c for c in given if c in expected), 2):
        if expected[a] == expected[b]:
            continue
        decided = True
        if given[a] == given[b] or (given[a] < given[b]) != (expected[a] < expected[b]):
            return True
    return False if decided else None


def _gold_failures(project: Project) -> dict[str, int]:
    """item key -> judgements on it that fail its gold answer; only the judgements on gold prompts are read."""
    ranks = gold_completion_ranks(prompts=project.prompts.filter(gold__isnull=False).only("id", "gold"))
    if not ranks:
        return {}
    failures: Counter[str] = Counter()
    pairs = _training_judgements(PairwiseJudgement, project).filter(prompt_id__in=list(ranks))
    for key, prompt_id, left, right, choice in pairs.values_list(
        "item_key", "prompt_id", "left_id", "right_id", "choice"
    ).iterator():
        truth = _pairwise_truth(ranks[prompt_id], left, right)
        if truth is not None and choice != truth:
            failures[key] += 1
    rankings = _training_judgements(RankingJudgement, project).filter(prompt_id__in=list(ranks))
    placed = (
        RankedCompletion.objects.filter(judgement_id__in=rankings.values("id"))
        .order_by("judgement_id")
        .values_list("judgement_id", "judgement__prompt_id", "judgement__round_id", "completion_id", "rank")
    )
    for _, group in groupby(placed.iterator(), key=itemgetter(0)):
        entries = list(group)
        prompt_id, round_id = entries[0][1], entries[0][2]
        if _ranking_fails(ranks[prompt_id], {completion: rank for *_, completion, rank in entries}):
            failures[f"p{prompt_id}-r{round_id}"] += 1
    return dict(failures)


# --- one item ----------------------------------------------------------------------------------------------


def ranks_text(ranks: dict[Any, int]) -> str:
    """A ranking in words, best first: "#12 > #14 = #13" (ties share a place)."""
    places: dict[int, list[str]] = defaultdict(list)
    for completion_id, rank in sorted(ranks.items(), key=lambda entry: int(entry[0])):
        places[rank].append(f"#{completion_id}")
    return " > ".join(" = ".join(places[rank]) for rank in sorted(places))


@dataclass(frozen=True, kw_only=True)
class ReviewCompletion:
    id: int
    label: str  # pairwise: "A" (the lower id, what a verdict of "a" prefers) or "B"; ranking: "1", "2", ...
    text: str
    truncated: bool  # the length limit cut it
    max_new_tokens: int | None
    source: str


@dataclass(frozen=True, kw_only=True)
class ReviewJudgement:
    id: int
    annotator: str
    choice: str | None  # pairwise, by content: "a" prefers the lower completion id, whatever side it was shown on
    ranks: dict[int, int] | None  # ranking: completion id -> rank (1 = best, ties share a rank)
    strength: str
    rationale: str
    time_ms: int | None
    created_at: datetime
    excluded: bool  # the annotator's judgements are left out of exports and training
    flagged: bool  # the Quality figures flag the annotator
    gold_correct: bool | None  # None: no gold answer covers the item

    @property
    def ranking(self) -> str:
        return ranks_text(self.ranks) if self.ranks else ""


@dataclass(frozen=True, kw_only=True)
class ReviewItem:
    item_key: str
    kind: str
    prompt: Prompt
    round_number: int
    completions: list[ReviewCompletion]
    judgements: list[ReviewJudgement]
    gold: str | dict[int, int] | None  # pairwise: "a", "b" or "tie"; ranking: completion id -> gold rank
    majority_share: float
    contention: float
    verdict: Adjudication | None  # in force
    history: list[Adjudication] = field(default_factory=list)  # undone verdicts, newest first

    @property
    def verdicts(self) -> tuple[str, ...]:
        return PAIRWISE_VERDICTS if self.kind == "pairwise" else RANKING_VERDICTS

    @property
    def gold_ranking(self) -> str:
        return ranks_text(self.gold) if isinstance(self.gold, dict) else ""

    @property
    def verdict_ranking(self) -> str:
        return ranks_text(self.verdict.ranks) if self.verdict and self.verdict.ranks else ""

    @property
    def history_rows(self) -> list[tuple[Adjudication, str]]:
        return [(a, ranks_text(a.ranks) if a.ranks else "") for a in self.history]


def review_item(*, project: Project, item_key: str) -> ReviewItem:
    """Everything a reviewer needs to give a verdict on one item; Http404 for an item that is not reviewable."""
    try:
        item = reviewable_item(project=project, item_key=item_key)
    except ValidationError as error:
        raise Http404(" ".join(error.messages)) from None
    flagged = flagged_annotator_ids(project=project)
    excluded = set(AnnotatorExclusion.objects.filter(project=project).values_list("annotator_id", flat=True))
    judged = _item_judgements(project, item).select_related("annotator", "round").order_by("created_at", "id")
    first = judged[0]
    prompt, round_number = first.prompt, first.round.number
    expected = gold_completion_ranks(prompts=[prompt]).get(prompt.pk, {})
    judgements: list[ReviewJudgement] = []
    if item.kind == "pairwise":
        completion_ids = [item.low, item.high]
        for j in judged:
            assert isinstance(j, PairwiseJudgement)
            choice = {"a": "b", "b": "a"}.get(j.choice, j.choice) if j.left_id > j.right_id else j.choice
            truth = _pairwise_truth(expected, j.left_id, j.right_id)
            judgements.append(
                _judgement(
                    j, flagged, excluded, choice=choice, gold_correct=None if truth is None else j.choice == truth
                )
            )
        gold_choice = _pairwise_truth(expected, item.low, item.high)
        gold: str | dict[int, int] | None = gold_choice
        share = max(Counter(j.choice for j in judgements).values()) / len(judgements)
    else:
        placed: dict[int, dict[int, int]] = defaultdict(dict)
        for judgement_id, completion_id, rank in RankedCompletion.objects.filter(
            judgement_id__in=[j.pk for j in judged]
        ).values_list("judgement_id", "completion_id", "rank"):
            placed[judgement_id][completion_id] = rank
        completion_ids = sorted({c for given in placed.values() for c in given})
        for j in judged:
            fails = _ranking_fails(expected, placed[j.pk])
            judgements.append(
                _judgement(j, flagged, excluded, ranks=placed[j.pk], gold_correct=None if fails is None else not fails)
            )
        covered = {c: expected[c] for c in completion_ids if c in expected}
        gold = covered if len(covered) >= 2 else None
        share = min(
            (max(Counter(j.ranks.get(c) for j in judgements if j.ranks).values()) / len(judgements))
            for c in completion_ids
        )
    completions = Completion.objects.filter(pk__in=completion_ids).select_related("model_version").order_by("pk")
    labels = ["A", "B"] if item.kind == "pairwise" else [str(n) for n in range(1, len(completion_ids) + 1)]
    failures = sum(j.gold_correct is False for j in judgements)
    flagged_votes = sum(j.flagged for j in judgements)
    adjudications = list(Adjudication.objects.filter(project=project, item_key=item.key).order_by("-created_at", "-id"))
    return ReviewItem(
        item_key=item.key,
        kind=item.kind,
        prompt=prompt,
        round_number=round_number,
        completions=[
            ReviewCompletion(
                id=c.pk,
                label=label,
                text=c.text,
                truncated=bool(c.generation_params.get("truncated"))
                if isinstance(c.generation_params, dict)
                else False,
                max_new_tokens=c.generation_params.get("max_new_tokens")
                if isinstance(c.generation_params, dict)
                else None,
                source=c.source,
            )
            for label, c in zip(labels, completions, strict=True)
        ],
        judgements=judgements,
        gold=gold,
        majority_share=share,
        contention=contention_score(
            majority_share=share, votes=len(judgements), gold_failures=failures, flagged_votes=flagged_votes
        ),
        verdict=next((a for a in adjudications if a.undone_at is None), None),
        history=[a for a in adjudications if a.undone_at is not None],
    )


def _judgement(
    j: PairwiseJudgement | RankingJudgement,
    flagged: set[int],
    excluded: set[int],
    *,
    choice: str | None = None,
    ranks: dict[int, int] | None = None,
    gold_correct: bool | None,
) -> ReviewJudgement:
    return ReviewJudgement(
        id=j.pk,
        annotator=j.annotator.get_username(),
        choice=choice,
        ranks=ranks,
        strength=getattr(j, "strength", ""),
        rationale=j.rationale,
        time_ms=j.time_ms,
        created_at=j.created_at,
        excluded=j.annotator_id in excluded,
        flagged=j.annotator_id in flagged,
        gold_correct=gold_correct,
    )
