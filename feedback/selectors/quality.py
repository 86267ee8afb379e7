"""Quality figures of a project's judgements: how far annotators agree, and how each one judges.

Everything is read with a few aggregating queries, so the cost grows with the rows the database
scans, not with Python objects (benchmarks/quality_speed.py):

- The **vote table**: every vote is (unit, annotator, category). A pairwise unit is an item (a pair
  of completions) and its category the content of the choice, whatever side it was shown on:
  ``first`` (the lower completion id preferred), ``second``, ``tie`` or ``both_bad``. A ranking
  unit is one completion of a ranked item and its category the rank it got (1 = best, tied
  completions share a rank). One query counts each unit's votes per category and then groups the
  votes by (annotator, category, the unit's counts): a few thousand rows whatever the project's size.
- **Agreement** over the units with two or more votes: Krippendorff's alpha from the `krippendorff`
  package on those counts (nominal for pairwise choices, ordinal over ranks), the raw pairwise
  agreement (the share of pairs of votes on a unit that agree), and how split each unit's votes are.
- **Per annotator**: judgements; time per task from the lease (``Assignment.created_at``, which a
  renewed lease keeps) to the judgement (``created_at``), in tenths of a second; agreement with the
  leave-one-out majority (the other annotators' most common category on the unit, when one is
  most common); position bias; tie and both-bad rates; skips the annotator chose (not tasks the
  app could not show); in the unfiltered figures only, their reliability (`selectors/reliability.py`, an
  estimate over the whole project that a filter cannot narrow). Flags name their threshold (THRESHOLDS).

The unfiltered figures are cached (`project_quality_cached`): see "Freshness" there.

Position bias: pairwise, the share of "A" among A/B choices; ranking, the share of rankings placing
the completion shown first above the one shown second (ties left out), so 0.5 is no bias in both
modes. Its two-sided exact binomial test against 0.5 is computed here (`binomial_p_value`).
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from itertools import combinations, groupby
from operator import itemgetter
from typing import Any, Literal

import krippendorff
import numpy as np
from django.contrib.auth import get_user_model
from django.core.cache import cache
from django.core.exceptions import ValidationError
from django.db import connection
from django.db.models import Case, Count, F, FloatField, IntegerField, Max, Q, QuerySet, Value, When, functions
from django.db.models.expressions import Func
from django.db.models.fields.json import KeyTransform
from django.http import Http404
from django.utils import timezone

from feedback.models import (
    AnnotatorExclusion,
    Assignment,
    ModelVersion,
    PairwiseJudgement,
    Project,
    Prompt,
    RankedCompletion,
    RankingJudgement,
    Round,
)
from feedback.queue import enqueue
from feedback.selectors.gold import gold_completion_ranks
from feedback.selectors.reliability import MIN_GOLD, MIN_SHARED, project_reliability
from feedback.services.assignments import UNSHOWABLE_SKIP_PREFIX

PAIRWISE_CATEGORIES = ("first", "second", "tie", "both_bad")
MOST_SPLIT_SHOWN = 20
FILTER_NAMES = ("created_from", "created_before", "model_version", "metadata_key", "metadata_value")


@dataclass(frozen=True)
class Thresholds:
    """When an annotator is flagged; shown beside the flags on the page and in the API."""

    min_judgements: int = 20  # fewer judgements (or A/B decisions) than this are never flagged
    too_fast_median_seconds: float = 4.0  # median time per task below this: too fast to have read both answers
    position_share: float = 0.65  # share of "A" (or of "B", at 1 - this) at or beyond this ...
    position_p_value: float = 0.01  # ... and a binomial test against 0.5 below this: position-biased
    min_gold: int = 10  # fewer gold decisions than this are never flagged ...
    # ... and below chance on gold: the 95 % interval of the gold accuracy lies wholly under 0.5
    unreliable_below: float = 0.65  # an annotator's own reliability estimate below this: unreliable


THRESHOLDS = Thresholds()


@dataclass(frozen=True, kw_only=True)
class QualityFilters:
    """Which judgements the figures read. Empty: all of the project's."""

    created_from: datetime | None = None  # judgements made at or after
    created_before: datetime | None = None  # judgements made strictly before
    model_version: ModelVersion | None = None  # items with a completion written by this version
    metadata_key: str | None = None  # items whose prompt's metadata has this key ...
    metadata_value: str | None = None  # ... with this value (a string)

    @property
    def any(self) -> bool:
        return any(getattr(self, name) is not None for name in FILTER_NAMES)

    def as_mapping(self) -> dict[str, str]:
        """The filters given, by their public names, as a query string takes them."""
        values: dict[str, str] = {}
        for name in FILTER_NAMES:
            value = getattr(self, name)
            if isinstance(value, datetime):
                values[name] = value.isoformat()
            elif isinstance(value, ModelVersion):
                values[name] = value.name
            elif value is not None:
                values[name] = value
        return values


def quality_filters_parse(*, project: Project, data: Mapping[str, str]) -> QualityFilters:
    """Filters from their public names (a query string); a ValidationError names each bad field.

    Dates are ISO dates or date-times (a date is its midnight, a time without offset is UTC);
    `model_version` is a version name of the project; `metadata_key` and `metadata_value` go together.
    """
    errors: dict[str, str] = {}
    values: dict[str, Any] = {}
    for name, raw in data.items():
        if name not in FILTER_NAMES:
            errors[name] = f"is not a filter; use {', '.join(FILTER_NAMES)}."
        elif raw == "":
            errors[name] = "must not be empty; leave it out for every judgement."
        elif "\x00" in raw:  # no stored name or value holds one, and PostgreSQL refuses it in a query
            errors[name] = "must not hold a NUL character."
        else:
            values[name] = raw
    for name in ("created_from", "created_before"):
        if name in values:
            try:
                values[name] = _aware(values[name])
            except ValueError:
                errors[name] = f"{values[name]!r} is not an ISO date or date-time of the years 1 to 9999 (UTC)."
    if "model_version" in values:
        version = project.model_versions.filter(name=values["model_version"]).first()
        if version is None:
            errors["model_version"] = f"{values['model_version']!r} is not a model version of this project."
        values["model_version"] = version
    for given, missing in (("metadata_key", "metadata_value"), ("metadata_value", "metadata_key")):
        if given in values and missing not in values and missing not in errors:
            errors[missing] = f"Give {missing} with {given}."
    if len(values.get("metadata_key", "")) > 200:
        errors["metadata_key"] = "Keep the key under 200 characters."
    dated = not errors and "created_from" in values and "created_before" in values
    if dated and values["created_before"] <= values["created_from"]:
        errors["created_before"] = "must be later than created_from."
    if errors:
        raise ValidationError(errors)
    return QualityFilters(**values)


def _aware(text: str) -> datetime:
    """The moment in UTC (a time without an offset is UTC). Python takes offsets up to 23:59 and PostgreSQL only up
    to 15:59, so the moment goes to the database in UTC; ValueError if it is none, or outside the years 1 to 9999."""
    parsed = datetime.fromisoformat(text)
    if not timezone.is_aware(parsed):
        return parsed.replace(tzinfo=UTC)
    try:
        return parsed.astimezone(UTC)
    except OverflowError:
        raise ValueError(text) from None


@dataclass(frozen=True, kw_only=True)
class Agreement:
    level: str  # "nominal" (pairwise) or "ordinal" (ranking)
    units: int  # units with two or more votes: the ones agreement is measured on
    votes: int  # votes on those units
    alpha: float | None  # Krippendorff's alpha; None when it cannot be measured (see `detail`)
    raw: float | None  # share of pairs of votes on a unit that agree
    detail: str  # why alpha is None, or ""


@dataclass(frozen=True, kw_only=True)
class SplitUnit:
    prompt_id: int
    round_number: int
    unit: str  # pairwise: the item key; ranking: "completion <id>"
    votes: dict[str, int]  # category -> votes
    top_share: float  # the most common category's share of the votes


@dataclass(frozen=True, kw_only=True)
class Splits:
    """How split the votes are on the units with two or more votes."""

    unanimous: int
    majority: int  # one category has more votes than any other, but not all
    no_majority: int  # two or more categories share the most votes
    most_split: list[SplitUnit]  # units without a majority, most votes first


@dataclass(frozen=True, kw_only=True)
class Flag:
    code: str  # "too_fast", "position_bias", "below_chance_on_gold" or "unreliable"
    message: str  # what was seen, with the threshold


@dataclass(kw_only=True)
class AnnotatorStats:
    annotator_id: int
    username: str
    judgements: int = 0
    median_seconds: float | None = None
    p10_seconds: float | None = None
    timed: int = 0  # judgements with a lease to time them from
    loo_agreement: float | None = None  # agreement with the leave-one-out majority
    loo_compared: int = 0  # votes on units where the others had a majority
    first_chosen: int = 0  # "A" chosen (ranking: the first shown placed above the second)
    position_decisions: int = 0  # A/B choices (ranking: rankings where the two are not tied)
    first_share: float | None = None
    position_p_value: float | None = None
    tie_rate: float | None = None  # pairwise: ties among judgements; ranking: rankings with a tie
    both_bad_rate: float | None = None  # pairwise only
    skips: int = 0
    gold_decisions: int = 0  # judgements on gold items (rankings: the pairs their gold answer orders)
    gold_correct: int = 0  # ... that match the known answer
    gold_accuracy: float | None = None
    gold_ci_low: float | None = None  # 95 % Wilson interval of the gold accuracy
    gold_ci_high: float | None = None
    # Reliability, in the unfiltered figures only (None when filtered); an excluded annotator is not estimated.
    reliability: float | None = None  # the chance they name the better of two completions, as their votes use it
    reliability_own: bool | None = None  # their own estimate (enough gold or shared votes), else the project's mean
    reliability_votes: int | None = None  # their votes on a pair's order that the estimate read
    flags: list[Flag] = field(default_factory=list)


@dataclass(frozen=True, kw_only=True)
class QualityReport:
    mode: str
    filters: QualityFilters
    judgements: int
    agreement: Agreement
    splits: Splits
    annotators: list[AnnotatorStats]
    thresholds: Thresholds = THRESHOLDS
    reliability_method: str | None = None  # how reliability is estimated; None when filtered
    reliability_mean: float | None = None  # what an annotator without their own estimate gets; None when filtered
    reliability_note: str = ""  # what the reliability figures are, or why there are none
    computed_at: datetime = field(default_factory=timezone.now)  # when the judgements were read
    stale: bool = False  # judgements, skips or exclusions came since, or the figures are older than MAX_AGE
    freshness: str = "Computed for this request."  # how fresh the figures are, in words


GOLD_NOTE = (
    "Gold accuracy: the share of decisions on gold items (prompts with a known answer) that match it, with its 95 % "
    "Wilson interval; a pairwise judgement is one decision (a tie is right only where the answer is a tie), a ranking "
    "one per pair of completions the gold answer orders."
)


FILTERED_RELIABILITY_NOTE = (
    "Reliability is estimated from all of the project's judgements, so a filter cannot narrow it: see the figures "
    "without filters."
)


def project_quality(*, project: Project, filters: QualityFilters | None = None) -> QualityReport:
    """Agreement and every annotator's statistics over the project's judgements that pass the filters; unfiltered,
    each annotator's reliability too."""
    filters = filters or QualityFilters()
    ranking = project.mode == Project.Mode.RANKING
    categories = _ranks(project, filters) if ranking else PAIRWISE_CATEGORIES
    votes = _ranking_votes(project, filters) if ranking else _pairwise_votes(project, filters)
    table = _vote_table(votes, len(categories))
    stats = _annotator_stats(project, filters, table, ranking=ranking)
    method, mean, note = None, None, FILTERED_RELIABILITY_NOTE
    if not filters.any:
        method, mean, note = _reliability(project, stats)
    for s in stats:
        s.flags = annotator_flags(s)
    return QualityReport(
        mode=project.mode,
        filters=filters,
        judgements=sum(s.judgements for s in stats),
        agreement=_agreement(table, categories, level="ordinal" if ranking else "nominal"),
        splits=_splits(table, votes, categories, ranking=ranking),
        annotators=stats,
        reliability_method=method,
        reliability_mean=mean,
        reliability_note=note,
    )


def _reliability(project: Project, stats: list[AnnotatorStats]) -> tuple[str, float, str]:
    """Each annotator's reliability into their statistics; the method, the project's mean and a note on them."""
    found = project_reliability(project=project)
    excluded = set(AnnotatorExclusion.objects.filter(project=project).values_list("annotator_id", flat=True))
    for s in stats:
        s.reliability_own, s.reliability_votes = False, 0
        if s.annotator_id in excluded:
            continue  # their votes count for nothing, so the estimate leaves them out
        mine = found.annotators.get(s.annotator_id)
        s.reliability = found.mean if mine is None else mine.reliability
        if mine is not None:
            s.reliability_own, s.reliability_votes = mine.own, mine.votes
    note = (
        f"Reliability: the chance an annotator names the better of two completions ({found.method}; "
        f"{found.pairs} pairs with a vote on their order). An annotator's own estimate counts from {MIN_GOLD} "
        f"votes on gold pairs or {MIN_SHARED} on pairs others voted on too; before that they get the project's mean, "
        f"{found.mean:.2f}. Excluded annotators are not estimated."
    )
    return found.method, found.mean, note


def annotator_quality(*, project: Project, username: str, filters: QualityFilters | None = None) -> AnnotatorStats:
    """One annotator's statistics (leave-one-out agreement needs everyone's votes, so all are read).

    Http404 for a user who is neither a member of the project nor has judged in it.
    """
    return annotator_quality_report(project=project, username=username, filters=filters)[0]


def annotator_quality_report(
    *, project: Project, username: str, filters: QualityFilters | None = None
) -> tuple[AnnotatorStats, QualityReport]:
    """`annotator_quality` and the report the statistics come from (for its freshness): unfiltered, the cached
    one `project_quality_cached` serves."""
    user = get_user_model().objects.filter(username=username).first()
    if user is None:
        raise Http404("No such annotator in this project.")
    report = project_quality_cached(project=project, filters=filters)
    for stats in report.annotators:
        if stats.annotator_id == user.pk:
            return stats, report
    if not project.memberships.filter(user_id=user.pk).exists():
        raise Http404("No such annotator in this project.")
    stats = AnnotatorStats(annotator_id=user.pk, username=username)
    if report.reliability_mean is not None:  # unfiltered: no vote yet, so the project's mean, as an export uses it
        stats.reliability_own, stats.reliability_votes = False, 0
        if not AnnotatorExclusion.objects.filter(project=project, annotator_id=user.pk).exists():
            stats.reliability = report.reliability_mean
    return stats, report


# --- freshness: the unfiltered figures, cached ----------------------------------------------------------------
#
# A full pass reads every judgement: about 2 s (pairwise) and 7 s (ranking) at 100,000 prompts on SQLite
# (benchmarks/RESULTS.md, "Quality figures"). So the unfiltered figures are kept in Django's cache (shared by
# every process: Redis or files in the data dir) with the time the judgements were read (`computed_at`) and a
# stamp of what they read (the judgements' count and highest id, the skips' count, and the excluded annotators,
# whom the reliability estimate leaves out). A request compares the stamp with the project's now (three indexed
# counts and the project's few exclusions) and:
#
# - nothing cached (the first request, or the cache was cleared): computes them in the request and keeps them;
# - cached, same stamp and younger than MAX_AGE: serves them, saying when they were computed;
# - cached but stale (judgements, skips or exclusions since, or older than MAX_AGE): if the last full pass took under
#   INLINE_SECONDS, computes them again in the request; otherwise serves the cached figures marked stale, saying
#   what changed since, and queues `quality_figures_task` (once: a flag in the cache) to compute them again.
#
# Filtered figures are always computed in the request.

MAX_AGE = timedelta(minutes=30)
INLINE_SECONDS = 0.5
CACHE_VERSION = 2


@dataclass(frozen=True, kw_only=True)
class _Stamp:
    judgements: int
    last_judgement_id: int
    skips: int
    excluded: tuple[int, ...]  # excluded annotators: the reliability estimate leaves them out


@dataclass(frozen=True, kw_only=True)
class _Cached:
    report: QualityReport
    stamp: _Stamp
    seconds: float  # how long the full pass took


def _cache_key(project: Project) -> str:
    # the creation time too: a test database (or a restored one) may give a new project an old project's id
    return f"quality-figures-{CACHE_VERSION}-{project.pk}-{project.created_at.timestamp():.6f}"


def _refresh_key(project: Project) -> str:
    return f"{_cache_key(project)}-refreshing"


def _stamp(project: Project) -> _Stamp:
    judged = RankingJudgement if project.mode == Project.Mode.RANKING else PairwiseJudgement
    counts = judged.objects.filter(project=project).order_by().aggregate(n=Count("id"), last=Max("id"))
    skips = Assignment.objects.filter(project=project, state=Assignment.State.SKIPPED).count()
    exclusions = AnnotatorExclusion.objects.filter(project=project).order_by("annotator_id")
    excluded = tuple(exclusions.values_list("annotator_id", flat=True))
    return _Stamp(judgements=counts["n"], last_judgement_id=counts["last"] or 0, skips=skips, excluded=excluded)


def quality_figures_refresh(*, project: Project) -> QualityReport:
    """Compute the unfiltered figures and keep them in the cache (the worker's task, or a request's)."""
    stamp = _stamp(project)  # read before the figures: a judgement made meanwhile makes them stale, never lost
    started = time.perf_counter()
    report = project_quality(project=project)
    seconds = time.perf_counter() - started
    report = replace(report, freshness=f"Computed at {_when(report.computed_at)} from every judgement.")
    cache.set(_cache_key(project), _Cached(report=report, stamp=stamp, seconds=seconds), timeout=None)
    cache.delete(_refresh_key(project))
    return report


def project_quality_cached(*, project: Project, filters: QualityFilters | None = None) -> QualityReport:
    """`project_quality`, the unfiltered figures from the cache with their freshness (see above)."""
    if filters is not None and filters.any:
        return project_quality(project=project, filters=filters)
    cached = cache.get(_cache_key(project))
    if not isinstance(cached, _Cached):
        return quality_figures_refresh(project=project)
    now = _stamp(project)
    changes = _changes(cached.stamp, now)
    age = timezone.now() - cached.report.computed_at
    if not changes and age < MAX_AGE:
        return cached.report
    if cached.seconds < INLINE_SECONDS:
        return quality_figures_refresh(project=project)
    if cache.add(_refresh_key(project), True, timeout=int(MAX_AGE.total_seconds())):
        enqueue("quality_figures_task", project.pk)
    why = changes or f"older than {int(MAX_AGE.total_seconds() // 60)} minutes"
    return replace(
        cached.report,
        stale=True,
        freshness=f"Computed at {_when(cached.report.computed_at)}, before {why}: new figures are being "
        "computed; reload in a minute.",
    )


def _changes(then: _Stamp, now: _Stamp) -> str:
    """What changed between two stamps, in words ("" for nothing)."""
    said = []
    if now.judgements != then.judgements or now.last_judgement_id != then.last_judgement_id:
        new = now.judgements - then.judgements
        said.append(f"{new} new judgement{'s' if new != 1 else ''}" if new > 0 else "judgements changed")
    if now.skips != then.skips:
        new = now.skips - then.skips
        said.append(f"{new} new skip{'s' if new != 1 else ''}" if new > 0 else "skips changed")
    if now.excluded != then.excluded:
        said.append("excluded annotators changed")
    return " and ".join(said)


def _when(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


# --- the votes ----------------------------------------------------------------------------------------------


def _judgement_q(project: Project, filters: QualityFilters, prefix: str = "") -> Q:
    q = Q(**{f"{prefix}project": project})
    if filters.created_from is not None:
        q &= Q(**{f"{prefix}created_at__gte": filters.created_from})
    if filters.created_before is not None:
        q &= Q(**{f"{prefix}created_at__lt": filters.created_before})
    if filters.metadata_key is not None:
        prompts = (
            project.prompts.annotate(meta=KeyTransform(filters.metadata_key, "metadata"))
            .filter(meta=filters.metadata_value or "")
            .values("id")
        )
        q &= Q(**{f"{prefix}prompt_id__in": prompts})
    return q


def _pairwise_judgements(project: Project, filters: QualityFilters) -> QuerySet[PairwiseJudgement]:
    judged = PairwiseJudgement.objects.filter(_judgement_q(project, filters))
    if filters.model_version is not None:
        judged = judged.filter(
            Q(left__model_version=filters.model_version) | Q(right__model_version=filters.model_version)
        )
    return judged.order_by()


def _ranking_judgements(project: Project, filters: QualityFilters) -> QuerySet[RankingJudgement]:
    judged = RankingJudgement.objects.filter(_judgement_q(project, filters))
    if filters.model_version is not None:
        written = RankedCompletion.objects.filter(completion__model_version=filters.model_version)
        judged = judged.filter(id__in=written.values("judgement_id"))
    return judged.order_by()


def _pairwise_votes(project: Project, filters: QualityFilters) -> QuerySet:
    lower_wins = Q(choice="a", left_id__lt=F("right_id")) | Q(choice="b", left_id__gt=F("right_id"))
    category = Case(
        When(choice="tie", then=Value(2)),
        When(choice="both_bad", then=Value(3)),
        When(lower_wins, then=Value(0)),
        default=Value(1),
        output_field=IntegerField(),
    )
    # every column an annotation, so the SELECT has them in this order (the vote table's SQL relies on it)
    return _pairwise_judgements(project, filters).annotate(
        unit=F("item_key"), voter=F("annotator_id"), category=category, of_prompt=F("prompt_id"), in_round=F("round_id")
    )


def _ranking_votes(project: Project, filters: QualityFilters) -> QuerySet:
    judged = _ranking_judgements(project, filters).values("id")
    return (
        RankedCompletion.objects.filter(judgement_id__in=judged)
        .order_by()
        .annotate(
            unit=F("completion_id"),
            voter=F("judgement__annotator_id"),
            category=F("rank") - 1,
            of_prompt=F("judgement__prompt_id"),
            in_round=F("judgement__round_id"),
        )
    )


def _ranks(project: Project, filters: QualityFilters) -> tuple[str, ...]:
    judged = _ranking_judgements(project, filters).values("id")
    deepest = RankedCompletion.objects.filter(judgement_id__in=judged).aggregate(rank=Max("rank"))["rank"] or 1
    return tuple(str(rank) for rank in range(1, deepest + 1))


def _votes_sql(votes: QuerySet) -> tuple[str, tuple[Any, ...]]:
    sql, params = votes.values_list("unit", "voter", "category", "of_prompt", "in_round").query.sql_with_params()
    return sql, tuple(params)


@dataclass(frozen=True)
class _Row:
    annotator_id: int
    category: int
    counts: tuple[int, ...]  # the unit's votes per category (the annotator's own included)
    votes: int  # how many such votes


def _vote_table(votes: QuerySet, categories: int) -> list[_Row]:
    # Each vote gets its unit's counts from a window over the unit, not from a join of the votes with their
    # grouped selves: with a date range SQLite planned that join as a nested loop without an index (quadratic).
    sql, params = _votes_sql(votes)
    sums = ", ".join(
        f"SUM(CASE WHEN category = {c} THEN 1 ELSE 0 END) OVER (PARTITION BY unit) AS c{c}" for c in range(categories)
    )
    counts = ", ".join(f"c{c}" for c in range(categories))
    query = (
        f"WITH v (unit, voter, category, prompt, in_round) AS ({sql}), "
        f"w AS (SELECT voter, category, {sums} FROM v) "
        f"SELECT voter, category, {counts}, COUNT(*) FROM w GROUP BY voter, category, {counts}"
    )
    with connection.cursor() as cursor:
        cursor.execute(query, params)
        return [_Row(row[0], row[1], tuple(row[2:-1]), row[-1]) for row in cursor.fetchall()]


# --- agreement ----------------------------------------------------------------------------------------------


def _unit_counts(table: list[_Row]) -> dict[tuple[int, ...], int]:
    """Units with two or more votes, by their counts per category: counts -> how many units have them."""
    rows: dict[tuple[int, ...], int] = defaultdict(int)
    for row in table:
        rows[row.counts] += row.votes
    return {counts: total // sum(counts) for counts, total in rows.items() if sum(counts) >= 2}


def _agreement(table: list[_Row], categories: tuple[str, ...], *, level: Literal["nominal", "ordinal"]) -> Agreement:
    units = _unit_counts(table)
    n_units = sum(units.values())
    n_votes = sum(sum(counts) * n for counts, n in units.items())
    if not n_units:
        detail = "Not enough overlap: no item has been judged by two or more annotators yet."
        return Agreement(level=level, units=0, votes=0, alpha=None, raw=None, detail=detail)
    agreeing = sum(n * sum(c * (c - 1) for c in counts) for counts, n in units.items())
    pairs = sum(n * sum(counts) * (sum(counts) - 1) for counts, n in units.items())
    raw = agreeing / pairs
    used = [c for c in range(len(categories)) if any(counts[c] for counts in units)]
    if len(used) < 2:
        detail = f"Every vote on the shared items is {categories[used[0]]!r}: alpha is undefined without variation."
        return Agreement(level=level, units=n_units, votes=n_votes, alpha=None, raw=raw, detail=detail)
    # Each distinct row of counts once per unit that has it: the package takes units x values counts.
    distinct = list(units)
    value_counts = np.repeat(np.array(distinct, dtype=np.int64), [units[c] for c in distinct], axis=0)
    alpha = krippendorff.alpha(
        value_counts=value_counts, value_domain=list(range(len(categories))), level_of_measurement=level
    )
    return Agreement(level=level, units=n_units, votes=n_votes, alpha=float(alpha), raw=raw, detail="")


def _splits(table: list[_Row], votes: QuerySet, categories: tuple[str, ...], *, ranking: bool) -> Splits:
    unanimous = majority = no_majority = 0
    for counts, n in _unit_counts(table).items():
        top = max(counts)
        if top == sum(counts):
            unanimous += n
        elif counts.count(top) == 1:
            majority += n
        else:
            no_majority += n
    return Splits(
        unanimous=unanimous,
        majority=majority,
        no_majority=no_majority,
        most_split=_most_split(votes, categories, ranking=ranking) if no_majority else [],
    )


def _most_split(votes: QuerySet, categories: tuple[str, ...], *, ranking: bool) -> list[SplitUnit]:
    sql, params = _votes_sql(votes)
    sums = ", ".join(f"SUM(CASE WHEN category = {c} THEN 1 ELSE 0 END) AS c{c}" for c in range(len(categories)))
    counts = [f"c{c}" for c in range(len(categories))]
    greatest = "MAX" if connection.vendor == "sqlite" else "GREATEST"  # the scalar one, two or more arguments
    at_top = " + ".join(f"(CASE WHEN {c} = top THEN 1 ELSE 0 END)" for c in counts)
    query = (
        f"WITH v (unit, voter, category, prompt, in_round) AS ({sql}), "
        f"u AS (SELECT unit, MIN(prompt) AS prompt, MIN(in_round) AS in_round, {sums}, COUNT(*) AS n "
        f"FROM v GROUP BY unit HAVING COUNT(*) >= 2), "
        f"t AS (SELECT u.*, {greatest}({', '.join(counts)}) AS top FROM u) "
        f"SELECT unit, prompt, in_round, {', '.join(counts)} FROM t WHERE {at_top} >= 2 "
        f"ORDER BY 1.0 * top / n, n DESC, prompt, unit LIMIT {MOST_SPLIT_SHOWN}"
    )
    with connection.cursor() as cursor:
        cursor.execute(query, params)
        rows = cursor.fetchall()
    numbers = dict(Round.objects.filter(id__in=[row[2] for row in rows]).values_list("id", "number"))
    return [
        SplitUnit(
            prompt_id=row[1],
            round_number=numbers[row[2]],
            unit=f"completion {row[0]}" if ranking else str(row[0]),
            votes={name: count for name, count in zip(categories, row[3:], strict=True) if count},
            top_share=max(row[3:]) / sum(row[3:]),
        )
        for row in rows
    ]


# --- per annotator ------------------------------------------------------------------------------------------


class _SecondsBetween(Func):
    """Seconds from one date-time to a later one, computed by the database."""

    arity = 2
    output_field = FloatField()

    def as_sql(self, compiler: Any, connection: Any, *args: Any, **extra: Any) -> tuple[str, tuple[Any, ...]]:
        (start, start_params), (end, end_params) = (compiler.compile(e) for e in self.get_source_expressions())
        if connection.vendor == "sqlite":
            return f"((julianday({end}) - julianday({start})) * 86400.0)", (*end_params, *start_params)
        return f"EXTRACT(EPOCH FROM ({end} - {start}))", (*end_params, *start_params)


def _annotator_stats(
    project: Project, filters: QualityFilters, table: list[_Row], *, ranking: bool
) -> list[AnnotatorStats]:
    stats: dict[int, AnnotatorStats] = {}

    def of(annotator_id: int) -> AnnotatorStats:
        if annotator_id not in stats:
            stats[annotator_id] = AnnotatorStats(annotator_id=annotator_id, username="")
        return stats[annotator_id]

    judged: QuerySet[RankingJudgement] | QuerySet[PairwiseJudgement]
    if ranking:
        judged = _ranking_judgements(project, filters)
        _ranking_choices(judged, of)
    else:
        judged = _pairwise_judgements(project, filters)
        rows = judged.values("annotator_id").annotate(
            n=Count("id"),
            a=Count("id", filter=Q(choice="a")),
            b=Count("id", filter=Q(choice="b")),
            tie=Count("id", filter=Q(choice="tie")),
            both_bad=Count("id", filter=Q(choice="both_bad")),
        )
        for row in rows:
            s = of(row["annotator_id"])
            s.judgements = row["n"]
            s.first_chosen, s.position_decisions = row["a"], row["a"] + row["b"]
            s.tie_rate, s.both_bad_rate = row["tie"] / row["n"], row["both_bad"] / row["n"]

    _times(judged, of)
    _gold_decisions(judged, of, ranking=ranking)
    _leave_one_out(table, of)
    for annotator_id, skips in _skips(project, filters):
        of(annotator_id).skips = skips

    names = dict(get_user_model().objects.filter(pk__in=list(stats)).values_list("pk", "username"))
    for s in stats.values():
        s.username = names.get(s.annotator_id, "")
        if s.position_decisions:
            s.first_share = s.first_chosen / s.position_decisions
            s.position_p_value = binomial_p_value(successes=s.first_chosen, trials=s.position_decisions)
        if s.gold_decisions:
            s.gold_accuracy = s.gold_correct / s.gold_decisions
            s.gold_ci_low, s.gold_ci_high = wilson_interval(successes=s.gold_correct, trials=s.gold_decisions)
    return sorted(stats.values(), key=lambda s: s.username)


def _gold_decisions(judged: QuerySet, of: Any, *, ranking: bool) -> None:
    """Each annotator's decisions on gold items, and how many match the known answer."""
    on_gold = judged.filter(prompt__gold__isnull=False)
    ranks = gold_completion_ranks(prompts=Prompt.objects.filter(pk__in=on_gold.values("prompt_id")))
    if not ranks:
        return
    if not ranking:
        rows = on_gold.values_list("annotator_id", "prompt_id", "left_id", "right_id", "choice")
        for annotator_id, prompt_id, left, right, choice in rows.iterator():
            expected = ranks.get(prompt_id, {})
            if left not in expected or right not in expected:
                continue
            truth = "tie" if expected[left] == expected[right] else ("a" if expected[left] < expected[right] else "b")
            s = of(annotator_id)
            s.gold_decisions += 1
            s.gold_correct += choice == truth
        return
    placed = RankedCompletion.objects.filter(judgement_id__in=on_gold.values("id")).order_by("judgement_id")
    fields = ("judgement_id", "judgement__annotator_id", "judgement__prompt_id", "completion_id", "rank")
    for _, group in groupby(placed.values_list(*fields).iterator(), key=itemgetter(0)):
        entries = list(group)
        expected = ranks.get(entries[0][2], {})
        given = {completion_id: rank for *_, completion_id, rank in entries if completion_id in expected}
        s = of(entries[0][1])
        for a, b in combinations(sorted(given), 2):
            if expected[a] == expected[b]:
                continue  # the gold answer leaves the pair equal: nothing to get right or wrong
            s.gold_decisions += 1
            s.gold_correct += (given[a] < given[b]) == (expected[a] < expected[b]) and given[a] != given[b]


def wilson_interval(*, successes: int, trials: int, z: float = 1.959964) -> tuple[float, float]:
    """The 95 % Wilson score interval of a proportion (Wilson 1927): sound near 0 and 1 and for few trials."""
    share = successes / trials
    centre = (share + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * math.sqrt(share * (1 - share) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return max(0.0, centre - half), min(1.0, centre + half)


def _skips(project: Project, filters: QualityFilters) -> list[tuple[int, int]]:
    """Tasks each annotator chose to skip (in the date range, on prompts with the metadata); not per model version."""
    skipped = Assignment.objects.filter(
        _judgement_q(project, replace(filters, created_from=None, created_before=None)),
        state=Assignment.State.SKIPPED,
    ).exclude(skip_reason__startswith=UNSHOWABLE_SKIP_PREFIX)
    if filters.created_from is not None:
        skipped = skipped.filter(finished_at__gte=filters.created_from)
    if filters.created_before is not None:
        skipped = skipped.filter(finished_at__lt=filters.created_before)
    return list(skipped.values("annotator_id").annotate(n=Count("id")).order_by().values_list("annotator_id", "n"))


def _ranking_choices(judged: QuerySet[RankingJudgement], of: Any) -> None:
    per_ranking = (
        RankedCompletion.objects.filter(judgement_id__in=judged.values("id"))
        .order_by()
        .values("judgement_id")
        .annotate(
            voter=Max("judgement__annotator_id"),
            shown_first=Max(Case(When(position=0, then=F("rank")))),
            shown_second=Max(Case(When(position=1, then=F("rank")))),
            places=Count("id"),
            ranks=Count("rank", distinct=True),
        )
        .values_list("voter", "shown_first", "shown_second", "places", "ranks")
    )
    sql, params = per_ranking.query.sql_with_params()
    query = (
        f"WITH r (voter, a_rank, b_rank, places, ranks) AS ({sql}) "
        "SELECT voter, COUNT(*), SUM(CASE WHEN a_rank < b_rank THEN 1 ELSE 0 END), "
        "SUM(CASE WHEN a_rank <> b_rank THEN 1 ELSE 0 END), SUM(CASE WHEN ranks < places THEN 1 ELSE 0 END) "
        "FROM r GROUP BY voter"
    )
    with connection.cursor() as cursor:
        cursor.execute(query, params)
        for voter, n, first_better, decisions, tied in cursor.fetchall():
            s = of(voter)
            s.judgements, s.first_chosen, s.position_decisions = n, first_better or 0, decisions or 0
            s.tie_rate = (tied or 0) / n


def _times(judged: QuerySet, of: Any) -> None:
    """Median and 10th percentile of the time per task, from a histogram in tenths of a second."""
    tenths = (
        judged.filter(assignment__isnull=False)
        .annotate(tenths=functions.Round(_SecondsBetween(F("assignment__created_at"), F("created_at")) * 10))
        .values("annotator_id", "tenths")
        .annotate(n=Count("id"))
        .order_by("annotator_id", "tenths")
        .values_list("annotator_id", "tenths", "n")
    )
    histograms: dict[int, list[tuple[float, int]]] = defaultdict(list)
    for annotator_id, value, n in tenths:
        histograms[annotator_id].append((max(float(value), 0.0) / 10, n))
    for annotator_id, histogram in histograms.items():
        s = of(annotator_id)
        s.timed = sum(n for _, n in histogram)
        s.median_seconds = _percentile(histogram, 0.5, s.timed)
        s.p10_seconds = _percentile(histogram, 0.1, s.timed)


def _percentile(histogram: list[tuple[float, int]], q: float, total: int) -> float:
    """The smallest value with at least q of the values at or below it (histogram sorted by value)."""
    wanted = max(1, math.ceil(q * total))
    seen = 0
    for value, n in histogram:
        seen += n
        if seen >= wanted:
            return value
    return histogram[-1][0]


def _leave_one_out(table: list[_Row], of: Any) -> None:
    agreed: dict[int, int] = defaultdict(int)
    compared: dict[int, int] = defaultdict(int)
    for row in table:
        others = list(row.counts)
        others[row.category] -= 1
        top = max(others)
        if top == 0 or others.count(top) > 1:
            continue  # judged by nobody else, or the others have no majority
        compared[row.annotator_id] += row.votes
        if others[row.category] == top:
            agreed[row.annotator_id] += row.votes
    for annotator_id, n in compared.items():
        s = of(annotator_id)
        s.loo_compared = n
        s.loo_agreement = agreed[annotator_id] / n


def binomial_p_value(*, successes: int, trials: int) -> float:
    """Two-sided exact binomial test against p = 0.5: the chance of a count at least as far from trials / 2."""
    tail = min(successes, trials - successes)
    if 2 * tail == trials:
        return 1.0
    log_half = trials * math.log(0.5)
    log_factorial = math.lgamma(trials + 1)
    one_side = sum(
        math.exp(log_factorial - math.lgamma(k + 1) - math.lgamma(trials - k + 1) + log_half) for k in range(tail + 1)
    )
    return min(1.0, 2 * one_side)


def annotator_flags(stats: AnnotatorStats, thresholds: Thresholds = THRESHOLDS) -> list[Flag]:
    flags = []
    if (
        stats.timed >= thresholds.min_judgements
        and stats.median_seconds is not None
        and stats.median_seconds < thresholds.too_fast_median_seconds
    ):
        flags.append(
            Flag(
                code="too_fast",
                message=f"Median {stats.median_seconds:.1f} s per task "
                f"(flagged below {thresholds.too_fast_median_seconds:g} s).",
            )
        )
    share, p_value = stats.first_share, stats.position_p_value
    if (
        stats.position_decisions >= thresholds.min_judgements
        and share is not None
        and p_value is not None
        and p_value < thresholds.position_p_value
        and (share >= thresholds.position_share or share <= 1 - thresholds.position_share)
    ):
        side = "A (shown first)" if share >= 0.5 else "B (shown second)"
        flags.append(
            Flag(
                code="position_bias",
                message=f"Chose {side} in {max(share, 1 - share):.0%} of {stats.position_decisions} decisions, "
                f"p = {p_value:.2g} (flagged at {thresholds.position_share:.0%} or more "
                f"with p below {thresholds.position_p_value:g}).",
            )
        )
    if (
        stats.gold_decisions >= thresholds.min_gold
        and stats.gold_ci_high is not None
        and stats.gold_accuracy is not None
        and stats.gold_ci_high < 0.5
    ):
        flags.append(
            Flag(
                code="below_chance_on_gold",
                message=f"Right on {stats.gold_accuracy:.0%} of {stats.gold_decisions} gold decisions "
                f"(95 % interval {stats.gold_ci_low:.0%} to {stats.gold_ci_high:.0%}; flagged when the interval lies "
                f"below 50 %, with {thresholds.min_gold} decisions or more).",
            )
        )
    if stats.reliability_own and stats.reliability is not None and stats.reliability < thresholds.unreliable_below:
        flags.append(
            Flag(
                code="unreliable",
                message=f"Reliability {stats.reliability:.2f} from {stats.reliability_votes} votes on pairs "
                f"(flagged below {thresholds.unreliable_below:g}, once their own estimate counts).",
            )
        )
    return flags
