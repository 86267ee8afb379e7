"""Preference datasets out of the judgements: DPO pairs, GRPO groups, raw judgements.

One reader for every way out (the command, the API, the export page, training runs).
It streams: up to four queries ordered by prompt id (prompts, completions, pairwise
judgements, ranked completions) are read side by side in chunks and merged one prompt at a
time, so memory holds one prompt's judgements however large the project is.

Rules (DESIGN.md, "Formats"):

- A pairwise judgement votes for the side chosen; ``tie`` and ``both_bad`` vote for neither.
- A ranking (rank 1 = best, ties share a rank) votes on the pairs that ``pairs`` selects:
  ``all`` every pair with a better and a worse rank, ``best_vs_rest`` the best rank against
  every worse one, ``adjacent`` each rank against the next one down. Tied completions never
  form a pair.
- Across annotators a pair counts the votes for each side. ``votes`` is the number of votes
  for either side. With ``weighting="raw"`` each vote counts 1: ``chosen`` is the majority's
  side and ``agreement`` = ``weight`` = majority / votes. With ``weighting="reliability"`` (the
  default) a vote counts its annotator's reliability weight (selectors/reliability.py; negative
  for someone mostly wrong, whose vote then counts for the other side): ``chosen`` is the side
  with the larger weighted vote, ``weight`` = its weighted share, and ``agreement`` stays the raw
  share of votes for ``chosen``. A pair with no vote for either side, with tied (weighted) votes,
  or with ``weight`` below ``min_agreement`` is left out.
- A reviewer's verdict in force on an item (models.Adjudication) replaces its votes: the pair (or
  every pair of a ranked item) takes the verdict's order with ``weight`` 1 and ``adjudicated``
  true, ``votes`` and ``agreement`` still describing the annotators; a tie, both-bad or unusable
  verdict leaves the item's pairs out. A GRPO group with a ranking verdict is that ranking alone
  (``annotators`` 1); an unusable one is left out. The ``judgements`` export keeps every
  judgement, names the verdict that replaced it in ``superseded_by``, and adds the verdict itself
  as a row of kind ``adjudication`` (``adjudicated`` true, the reviewer as ``annotator``).
- GRPO: one annotator's ranking of K completions gives ``r_i = (K - place_i) / (K - 1)``
  where tied completions share the mean of the places they span; a completion's reward and
  rank (mean place) are the means over the annotators who ranked it; ``annotators`` counts
  the rankings of the prompt. Pairwise judgements do not enter GRPO groups.
- With ``model_version_ids`` only completions written by those versions are seen: a ranking
  keeps the others' relative order, a pairwise judgement needs both of its sides. ``rounds``,
  ``since_round`` and ``writers`` (version names or ``base``) limit the completions the same way.
- Every row names its ``round`` (number); a GRPO group is one round's completions of a prompt.

Prompts: in the standard (string) shape a prompt that is a single user turn is that turn's
text; a longer conversation (a system turn, earlier turns) becomes a plain transcript, one
``Role: content`` paragraph per turn, so no context is lost. Use ``conversational`` to hand
the messages over as they are and let the trainer apply the model's chat template.
"""

from __future__ import annotations

import hashlib
import hmac
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from functools import cache, lru_cache
from itertools import groupby
from operator import itemgetter
from typing import Any, Literal

from django.conf import settings
from django.db.models import Q, QuerySet

from feedback.models import (
    Adjudication,
    Completion,
    Judgement,
    PairwiseJudgement,
    Project,
    Prompt,
    RankedCompletion,
    RankingJudgement,
    Round,
)
from feedback.selectors.annotators import excluded_annotator_ids
from feedback.selectors.battles import battle_rows
from feedback.selectors.models import completion_reward_scores, reward_model_newest
from feedback.selectors.reliability import Reliability, project_reliability
from feedback.selectors.review import ItemKey, item_key_parse, verdicts_in_force

ExportFormat = Literal["dpo", "grpo", "judgements", "battles"]
PairMode = Literal["all", "best_vs_rest", "adjacent"]
Split = Literal["train", "test", "eval"]
Weighting = Literal["raw", "reliability"]

PAIR_MODES: tuple[str, ...] = ("all", "best_vs_rest", "adjacent")
SPLITS: tuple[str, ...] = ("train", "test", "eval")
WEIGHTINGS: tuple[str, ...] = tuple(Project.Weighting.values)


class ExportOptionsError(ValueError):
    """An option that cannot be used; ``field`` names it."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
        self.message = message


@dataclass(frozen=True, kw_only=True)
class PreferenceExportOptions:
    """What to export and how. Every field has a default; invalid values raise ExportOptionsError."""

    format: ExportFormat = "dpo"
    conversational: bool = False  # message lists instead of strings (TRL's conversational format)
    pairs: PairMode = "all"  # which pairs a ranking yields
    min_agreement: float = 0.0  # dpo: leave out pairs whose weight is below this
    weighting: Weighting = "reliability"  # dpo: what a vote counts, 1 (raw) or its annotator's reliability weight
    created_from: datetime | None = None  # judgements created at or after
    created_before: datetime | None = None  # judgements created strictly before (an empty range gives no rows)
    annotator_ids: tuple[int, ...] | None = None  # only these annotators' judgements
    model_version_ids: tuple[int, ...] | None = None  # only completions written by these versions
    rounds: tuple[int, ...] | None = None  # only completions of these round numbers
    since_round: int | None = None  # only completions of this round number and later ones
    writers: tuple[str, ...] | None = None  # only completions by these round writers: version names or "base"
    # None: every training prompt; train or test: that part of them; eval: the evaluation prompts alone, for
    # analysis (no other value reads them, so training snapshots and the training formats never hold them)
    split: Split | None = None
    test_fraction: float = 0.1  # share of prompts in the test part
    split_seed: str = "rankwise"  # changes which prompts land in the test part
    pseudonymise: bool = False  # judgements: HMAC pseudonyms instead of annotator ids
    gold: bool = False  # also the gold items (prompts with a known answer), which are left out by default
    reward_scores: bool = False  # each completion's score by the project's newest reward model (None if unscored)
    chunk_size: int = 2000  # rows fetched from the database at a time

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ExportOptionsError("format", f"must be one of {', '.join(FORMATS)}, not {self.format!r}")
        if self.pairs not in PAIR_MODES:
            raise ExportOptionsError("pairs", f"must be one of {', '.join(PAIR_MODES)}, not {self.pairs!r}")
        if self.weighting not in WEIGHTINGS:
            raise ExportOptionsError("weighting", f"must be reliability or raw, not {self.weighting!r}")
        if not 0.0 <= self.min_agreement <= 1.0:
            raise ExportOptionsError("min_agreement", "must be between 0 and 1")
        if self.split is not None and self.split not in SPLITS:
            raise ExportOptionsError("split", f"must be train, test or eval, not {self.split!r}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ExportOptionsError("test_fraction", "must be strictly between 0 and 1")
        if self.chunk_size < 1:
            raise ExportOptionsError("chunk_size", "must be at least 1")
        if self.rounds is not None and (not self.rounds or min(self.rounds) < 1):
            raise ExportOptionsError("rounds", "must be round numbers, 1 or more")
        if self.since_round is not None and self.since_round < 1:
            raise ExportOptionsError("since_round", "must be a round number, 1 or more")
        if self.writers is not None and not self.writers:
            raise ExportOptionsError("writers", "must name at least one version, or base")
        applies = EXPORT_FORMATS[self.format].options
        if applies is not None:
            defaults = PreferenceExportOptions()
            for name, (field_name, _) in _OPTIONS.items():
                if name not in applies and getattr(self, field_name) != getattr(defaults, field_name):
                    raise ExportOptionsError(name, f"does not apply to the {self.format} format")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> PreferenceExportOptions:
        """Options from their public names, as the API's query, the export page and the command give them.

        The names are the fields' but ``annotators`` and ``model_versions`` (lists of ids; empty
        means every one); ``rounds`` is a list of round numbers and ``writers`` a list of names. A
        missing, None or empty value takes the default; date-times may be ISO strings. A name that
        is no option, or a value of the wrong type, raises ExportOptionsError.
        """
        values: dict[str, Any] = {}
        for name, value in data.items():
            if name not in _OPTIONS:
                raise ExportOptionsError(name, "is not an export option")
            field_name, kind = _OPTIONS[name]
            if value is None or value == "" or value == []:
                continue
            if kind is datetime and isinstance(value, str):
                try:
                    value = datetime.fromisoformat(value)
                except ValueError:
                    raise ExportOptionsError(name, f"{value!r} is not an ISO date-time") from None
            if kind is tuple:
                if not isinstance(value, list | tuple) or not all(type(v) is int for v in value):
                    raise ExportOptionsError(name, "must be a list of ids")
                value = tuple(value)
            elif kind is list:
                if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
                    raise ExportOptionsError(name, "must be a list of names")
                value = tuple(value)
            elif not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
                raise ExportOptionsError(name, f"{value!r} is not a {_TYPE_NAMES[kind]}")
            if not all(_storable(v) for v in (value if kind is list else [value]) if isinstance(v, str)):
                raise ExportOptionsError(name, "must not hold a NUL character or a lone surrogate")
            values[field_name] = value
        return cls(**values)

    def as_mapping(self) -> dict[str, Any]:
        """The options by their public names as JSON values, leaving out defaults; from_mapping reads it back."""
        defaults = PreferenceExportOptions()
        data: dict[str, Any] = {"format": self.format}
        for name, (field_name, _) in _OPTIONS.items():
            value = getattr(self, field_name)
            if value == getattr(defaults, field_name) or name == "format":
                continue
            if isinstance(value, datetime):
                value = value.isoformat()
            data[name] = list(value) if isinstance(value, tuple) else value
        return data


def _storable(text: str) -> bool:
    """Text every database stores (an export job keeps its options): no NUL, no lone surrogate."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return "\x00" not in text


# The options a user may set: public name -> (field, type). chunk_size is not one of them.
_OPTIONS: dict[str, tuple[str, Any]] = {
    "format": ("format", str),
    "conversational": ("conversational", bool),
    "pairs": ("pairs", str),
    "min_agreement": ("min_agreement", float | int),
    "weighting": ("weighting", str),
    "created_from": ("created_from", datetime),
    "created_before": ("created_before", datetime),
    "annotators": ("annotator_ids", tuple),
    "model_versions": ("model_version_ids", tuple),
    "rounds": ("rounds", tuple),
    "since_round": ("since_round", int),
    "writers": ("writers", list),
    "split": ("split", str),
    "test_fraction": ("test_fraction", float | int),
    "split_seed": ("split_seed", str),
    "pseudonymise": ("pseudonymise", bool),
    "gold": ("gold", bool),
    "reward_scores": ("reward_scores", bool),
}
_TYPE_NAMES = {str: "string", bool: "boolean", int: "whole number", float | int: "number", datetime: "date-time"}


@dataclass
class _Ranking:
    judgement_id: int
    annotator_id: int
    ids: list[int]  # completion ids, best first
    ranks: list[int]  # their ranks
    stored: dict[str, Any] | None = None  # judgements export: the judgement's stored columns (_stored_columns)
    verdict: Adjudication | None = None  # a reviewer's ranking verdict, standing for the item's rankings


@dataclass
class _PromptGroup:
    prompt_id: int
    messages: list[dict[str, str]]
    texts: dict[int, str]  # completion id -> text, only the completions the options let through
    rounds: dict[int, int]  # completion id -> its round's number
    cut: set[int]  # ids of those completions that the length limit cut (generation_params' truncated)
    pairwise: list[Any]  # rows of _streams' pairwise query, fields by name
    rankings: list[_Ranking]
    rewards: dict[int, float | None] | None  # completion id -> reward model score, with the reward_scores option
    verdicts: dict[str, Adjudication]  # item key -> the verdict in force, for this prompt's items
    round_ids: dict[int, int]  # completion id -> its round's id (a ranked item's key names it)
    reliability: Reliability | None  # what each annotator's vote counts; None: 1 each (raw weighting)


def prompt_in_split(*, prompt_id: int, options: PreferenceExportOptions) -> bool:
    """Whether a training prompt belongs to the requested part: a hash of the seed and the prompt id, stable
    across runs. Which prompts are evaluation prompts is the prompt's own ``split`` (``_streams`` reads it)."""
    if options.split is None or options.split == "eval":
        return True
    digest = hashlib.sha256(f"{options.split_seed}:{prompt_id}".encode()).digest()
    is_test = int.from_bytes(digest[:8], "big") / 2**64 < options.test_fraction
    return is_test == (options.split == "test")


def training_prompt_rows(*, project: Project, options: PreferenceExportOptions) -> Iterator[dict[str, Any]]:
    """Every training prompt of the project, judged or not, in the part ``options.split`` names (both when None),
    as ``{"prompt", "prompt_id"}`` rows in id order: what PPO and online GRPO roll out on. The prompt has the
    export's shape, as the reward model saw it. Evaluation prompts are never read."""
    shape_prompt, _ = _shapers(options)
    prompts = Prompt.objects.filter(project=project, split=Prompt.Split.TRAIN).order_by("id")
    for prompt_id, messages in prompts.values_list("id", "messages").iterator(chunk_size=options.chunk_size):
        if prompt_in_split(prompt_id=prompt_id, options=options):
            yield {"prompt": shape_prompt(messages), "prompt_id": prompt_id}


def annotator_pseudonym(*, annotator_id: int) -> str:
    """A stable pseudonym for an annotator: an HMAC of the id keyed with SECRET_KEY, not reversible without it."""
    key = settings.SECRET_KEY.encode()
    return "a-" + hmac.new(key, f"annotator:{annotator_id}".encode(), hashlib.sha256).hexdigest()[:16]


def prompt_text(*, messages: list[dict[str, str]]) -> str:
    """A prompt as one string: the user's text for a single user turn, else a plain transcript."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)


def places_from_ranks(*, ranks: list[int]) -> list[float]:
    """1-based places for ranks sorted best first; tied ranks share the mean of the places they span."""
    places: list[float] = []
    start = 0
    while start < len(ranks):
        end = start
        while end + 1 < len(ranks) and ranks[end + 1] == ranks[start]:
            end += 1
        places.extend([(start + end) / 2 + 1] * (end - start + 1))
        start = end + 1
    return places


@lru_cache(maxsize=4096)  # rankings repeat a handful of shapes (K completions, the odd tie)
def ranking_pairs(*, ranks: tuple[int, ...], mode: PairMode) -> tuple[tuple[int, int], ...]:
    """Index pairs (better, worse) that one ranking sorted best first yields under a pair mode."""
    n = len(ranks)
    if mode == "all":
        return tuple((i, j) for i in range(n) for j in range(i + 1, n) if ranks[i] < ranks[j])
    levels = sorted(set(ranks))
    by_level: dict[int, list[int]] = {}
    for index, rank in enumerate(ranks):
        by_level.setdefault(rank, []).append(index)
    if mode == "best_vs_rest":
        best = by_level[levels[0]]
        return tuple((b, i) for b in best for level in levels[1:] for i in by_level[level])
    return tuple(
        (u, w)
        for upper, lower in zip(levels, levels[1:], strict=False)
        for u in by_level[upper]
        for w in by_level[lower]
    )


def _grouped(rows: Iterable[Any]) -> Iterator[tuple[int, list[Any]]]:
    """(prompt id, rows) for named rows ordered by their first column, the prompt id."""
    return ((prompt_id, list(group)) for prompt_id, group in groupby(rows, key=itemgetter(0)))


class _Cursor:
    """Hands out the rows of one grouped stream prompt by prompt, in prompt order."""

    def __init__(self, rows: Iterable[Any] | None) -> None:
        self._groups = _grouped(rows) if rows is not None else iter(())
        self._head: tuple[int, list[Any]] | None = next(self._groups, None)

    def take(self, prompt_id: int) -> list[Any]:
        while self._head is not None and self._head[0] < prompt_id:
            self._head = next(self._groups, None)
        if self._head is not None and self._head[0] == prompt_id:
            rows = self._head[1]
            self._head = next(self._groups, None)
            return rows
        return []


def _judgement_filters(options: PreferenceExportOptions, prefix: str) -> dict[str, Any]:
    filters: dict[str, Any] = {}
    if options.created_from is not None:
        filters[f"{prefix}created_at__gte"] = options.created_from
    if options.created_before is not None:
        filters[f"{prefix}created_at__lt"] = options.created_before
    if options.annotator_ids is not None:
        filters[f"{prefix}annotator_id__in"] = list(options.annotator_ids)
    return filters


def _streams(
    project: Project, options: PreferenceExportOptions, id_range: tuple[int, int] | None
) -> tuple[QuerySet, QuerySet, QuerySet | None, QuerySet | None]:
    chosen_prompts = Prompt.objects.filter(
        project=project, split=Prompt.Split.EVAL if options.split == "eval" else Prompt.Split.TRAIN
    )
    if id_range is not None:
        chosen_prompts = chosen_prompts.filter(id__gte=id_range[0], id__lt=id_range[1])
    if not options.gold:  # judgements on gold items check the annotators; they are training data only when asked
        chosen_prompts = chosen_prompts.filter(gold__isnull=True)
    prompts = chosen_prompts.order_by("id").values_list("id", "messages")
    # Rows are picked by their prompt rather than by project: the database then walks the prompt index in
    # prompt order and sorts little (the texts not at all) instead of sorting a whole project's rows up front.
    project_prompts = chosen_prompts.values("id")
    written = Completion.objects.filter(prompt_id__in=project_prompts)
    # Battles are for telling versions apart, never for training: their completions and judgements stay out.
    battles = list(Round.objects.filter(project=project, kind=Round.Kind.BATTLE).values_list("pk", flat=True))
    if battles:
        written = written.exclude(round_id__in=battles)
    if options.model_version_ids is not None:
        written = written.filter(model_version_id__in=list(options.model_version_ids))
    if options.rounds is not None:
        written = written.filter(round__number__in=list(options.rounds))
    if options.since_round is not None:
        written = written.filter(round__number__gte=options.since_round)
    if options.writers is not None:
        by_writer = Q(model_version__name__in=[name for name in options.writers if name != "base"])
        if "base" in options.writers:  # the base model: no version, and not imported
            by_writer |= Q(model_version__isnull=True) & ~Q(round__strategy=Round.Strategy.IMPORTED)
        written = written.filter(by_writer)

    # Completions and ranked completions come K to a prompt or a judgement, by far the most rows: plain tuples,
    # unpacked by name where they are read, as named rows cost about 10 % of a dpo export (benchmarks/RESULTS.md).
    completion_fields = ["prompt_id", "id", "text", "round__number", "generation_params__truncated", "round_id"]
    if options.reward_scores:
        written = written.annotate(reward=completion_reward_scores(reward_model=reward_model_newest(project=project)))
        completion_fields.append("reward")
    completions = written.order_by("prompt_id", "id").values_list(*completion_fields)

    spec = EXPORT_FORMATS[options.format]
    excluded = excluded_annotator_ids(project=project)  # their judgements stay stored, and out of every export
    pairwise = None
    if spec.pairwise:
        pairwise_fields = ["prompt_id", "id", "annotator_id", "left_id", "right_id", "choice"]
        if spec.raw:
            pairwise_fields += [name for name in _stored_columns(PairwiseJudgement) if name not in pairwise_fields]
        pairwise = (
            PairwiseJudgement.objects.filter(prompt_id__in=project_prompts, **_judgement_filters(options, ""))
            .exclude(round_id__in=battles)
            .exclude(annotator_id__in=excluded)
            .order_by("prompt_id", "id")
            .values_list(*pairwise_fields, named=True)
        )
    # read in this order by _prompt_groups, the raw ones last
    ranked_fields = ["judgement__prompt_id", "judgement_id", "judgement__annotator_id", "completion_id", "rank"]
    if spec.raw:
        ranked_fields += [f"judgement__{name}" for name in _stored_columns(RankingJudgement)]
    ranked = (
        RankedCompletion.objects.filter(
            judgement__prompt_id__in=project_prompts, **_judgement_filters(options, "judgement__")
        )
        .exclude(judgement__annotator_id__in=excluded)
        .order_by("judgement__prompt_id", "judgement_id", "rank", "position")
        .values_list(*ranked_fields)
    )
    return prompts, completions, pairwise, ranked


def _prompt_groups(
    project: Project,
    options: PreferenceExportOptions,
    on_prompt: Callable[[int], None] | None,
    id_range: tuple[int, int] | None,
    reliability: Reliability | None,
) -> Iterator[_PromptGroup]:
    prompts, completions, pairwise, ranked = _streams(project, options, id_range)
    verdicts: dict[int, dict[str, Adjudication]] = defaultdict(dict)  # prompt id -> item key -> verdict in force
    for key, verdict in verdicts_in_force(project=project).items():
        verdicts[verdict.prompt_id][key] = verdict
    stored = _stored_columns(RankingJudgement) if EXPORT_FORMATS[options.format].raw else None
    size = options.chunk_size
    completion_rows = _Cursor(completions.iterator(chunk_size=size))
    pairwise_rows = _Cursor(pairwise.iterator(chunk_size=size) if pairwise is not None else None)
    ranked_rows = _Cursor(ranked.iterator(chunk_size=size) if ranked is not None else None)
    for prompt_id, messages in prompts.iterator(chunk_size=size):
        written = completion_rows.take(prompt_id)
        judged_pairs = pairwise_rows.take(prompt_id)
        ranked_entries = ranked_rows.take(prompt_id)
        if on_prompt is not None:
            on_prompt(1)
        if not (judged_pairs or ranked_entries):
            continue
        if options.split is not None and not prompt_in_split(prompt_id=prompt_id, options=options):
            continue
        texts = {completion_id: text for _, completion_id, text, *_ in written}
        rounds = {completion_id: number for _, completion_id, _, number, *_ in written}
        cut = {completion_id for _, completion_id, _, _, truncated, *_ in written if truncated}
        round_ids = {row[1]: row[5] for row in written}
        rewards = {row[1]: row[6] for row in written} if options.reward_scores else None
        rankings: list[_Ranking] = []
        judgement_id = None
        for _, ranked_judgement, annotator_id, completion_id, rank, *judgement_fields in ranked_entries:
            if ranked_judgement != judgement_id:
                judgement_id = ranked_judgement
                ranking = _Ranking(judgement_id, annotator_id, [], [])
                if stored is not None:
                    ranking.stored = dict(zip(stored, judgement_fields, strict=True))
                rankings.append(ranking)
                ids, ranks = ranking.ids, ranking.ranks
            if completion_id in texts:
                ids.append(completion_id)
                ranks.append(rank)
        kept_pairs = [row for row in judged_pairs if row.left_id in texts and row.right_id in texts]
        kept_rankings = [r for r in rankings if len(r.ids) >= 2]
        if kept_pairs or kept_rankings:
            yield _PromptGroup(
                prompt_id=prompt_id,
                messages=messages,
                texts=texts,
                rounds=rounds,
                cut=cut,
                pairwise=kept_pairs,
                rankings=kept_rankings,
                rewards=rewards,
                verdicts=verdicts.get(prompt_id, {}),
                round_ids=round_ids,
                reliability=reliability,
            )


def _shapers(options: PreferenceExportOptions) -> tuple[Callable[[list[dict[str, str]]], Any], Callable[[str], Any]]:
    if options.conversational:
        return list, lambda text: [{"role": "assistant", "content": text}]
    return (lambda messages: prompt_text(messages=messages)), (lambda text: text)


def _dpo_rows(group: _PromptGroup, options: PreferenceExportOptions, prompt: Any, answer: Callable) -> Iterator[dict]:
    # (low id, high id) -> [votes for low, votes for high, weighted votes for low, weighted votes for high]
    tally: dict[tuple[int, int], list[float]] = defaultdict(lambda: [0, 0, 0.0, 0.0])

    def vote(winner: int, loser: int, annotator_id: int) -> None:
        low_won = winner < loser
        counts = tally[(winner, loser) if low_won else (loser, winner)]
        weight = group.reliability.weight(annotator_id) if group.reliability is not None else 1.0
        counts[0 if low_won else 1] += 1
        counts[2 if (low_won == (weight >= 0)) else 3] += abs(weight)

    for row in group.pairwise:
        if row.choice == PairwiseJudgement.Choice.A:
            vote(row.left_id, row.right_id, row.annotator_id)
        elif row.choice == PairwiseJudgement.Choice.B:
            vote(row.right_id, row.left_id, row.annotator_id)
    for ranking in group.rankings:
        ids = ranking.ids
        for better, worse in ranking_pairs(ranks=tuple(ranking.ranks), mode=options.pairs):
            vote(ids[better], ids[worse], ranking.annotator_id)
    ruled = _verdict_pairs(group, options)

    # Strings go out as they are; only the conversational shape wraps each text.
    shaped = {cid: answer(text) for cid, text in group.texts.items()} if options.conversational else group.texts
    for low, high in sorted(tally.keys() | ruled.keys()):
        for_low, for_high, weighted_low, weighted_high = tally.get((low, high), (0, 0, 0.0, 0.0))
        if (low, high) in ruled:
            chosen = ruled[(low, high)]
            if chosen is None:
                continue
            weight = 1.0
        else:
            if weighted_low == weighted_high:
                continue
            chosen = low if weighted_low > weighted_high else high
            weight = max(weighted_low, weighted_high) / (weighted_low + weighted_high)
            if weight < options.min_agreement:
                continue
        rejected = high if chosen == low else low
        total = for_low + for_high
        pair_row: dict[str, Any] = {
            "prompt": prompt,
            "chosen": shaped[chosen],
            "rejected": shaped[rejected],
            "prompt_id": group.prompt_id,
            "chosen_id": chosen,
            "rejected_id": rejected,
            "chosen_truncated": chosen in group.cut,
            "rejected_truncated": rejected in group.cut,
            "votes": total,
            "agreement": (for_low if chosen == low else for_high) / total if total else 0.0,
            "weight": weight,
            "adjudicated": (low, high) in ruled,
            "round": group.rounds[chosen],
        }
        if group.rewards is not None:
            pair_row.update(chosen_reward=group.rewards[chosen], rejected_reward=group.rewards[rejected])
        yield pair_row


def _verdict_pairs(group: _PromptGroup, options: PreferenceExportOptions) -> dict[tuple[int, int], int | None]:
    """(low id, high id) -> the chosen id the verdicts in force give the pair, or None where they leave it out."""
    ruled: dict[tuple[int, int], int | None] = {}
    for item, verdict in _verdict_items(group):
        if item.kind == "pairwise":
            ruled[(item.low, item.high)] = {"a": item.low, "b": item.high}.get(verdict.verdict)
            continue
        ids = _item_completions(group, item)
        ruled.update({(a, b): None for a in ids for b in ids if a < b})
        if verdict.verdict == Adjudication.Verdict.RANKING:
            ranking = _verdict_ranking(verdict, group.texts)
            ids = ranking.ids
            for better, worse in ranking_pairs(ranks=tuple(ranking.ranks), mode=options.pairs):
                ruled[_ordered(ids[better], ids[worse])] = ids[better]
    return ruled


def _verdict_items(group: _PromptGroup) -> list[tuple[ItemKey, Adjudication]]:
    return [(item_key_parse(key), verdict) for key, verdict in group.verdicts.items()]


def _item_completions(group: _PromptGroup, item: ItemKey) -> list[int]:
    """The completions of an item that the options let through: the pair, or the ranked round's."""
    if item.kind == "pairwise":
        return [cid for cid in (item.low, item.high) if cid in group.texts]
    return sorted(cid for cid, round_id in group.round_ids.items() if round_id == item.round_id)


def _ordered(a: int, b: int) -> tuple[int, int]:
    return (a, b) if a < b else (b, a)


def _verdict_ranking(verdict: Adjudication, texts: Mapping[int, str]) -> _Ranking:
    """A ranking verdict as a ranking of the completions the options let through, best first."""
    ranks = {int(cid): rank for cid, rank in (verdict.ranks or {}).items()}
    ids = sorted((cid for cid in ranks if cid in texts), key=lambda cid: (ranks[cid], cid))
    return _Ranking(verdict.pk, verdict.reviewer_id, ids, [ranks[cid] for cid in ids], verdict=verdict)


def _rankings_in_force(group: _PromptGroup) -> list[_Ranking]:
    """The prompt's rankings with each ranked item's verdict in force standing for the item's rankings (alone:
    a ranking verdict; none: an unusable one)."""
    ruled = [(item, verdict) for item, verdict in _verdict_items(group) if item.kind == "ranking"]
    rounds = {item.round_id for item, _ in ruled}
    kept = [ranking for ranking in group.rankings if group.round_ids[ranking.ids[0]] not in rounds]
    for _, verdict in ruled:
        ranking = _verdict_ranking(verdict, group.texts)
        if verdict.verdict == Adjudication.Verdict.RANKING and len(ranking.ids) >= 2:
            kept.append(ranking)
    return kept


def _grpo_rows(group: _PromptGroup, options: PreferenceExportOptions, prompt: Any, answer: Callable) -> Iterator[dict]:
    """One group per round of the prompt: a ranking covers one round's completions, so rounds never mix."""
    by_round: dict[int, list[_Ranking]] = {}
    for ranking in _rankings_in_force(group):
        by_round.setdefault(group.rounds[ranking.ids[0]], []).append(ranking)
    for number in sorted(by_round):
        yield from _grpo_group(group, by_round[number], number, prompt, answer)


def _grpo_group(
    group: _PromptGroup, rankings: list[_Ranking], number: int, prompt: Any, answer: Callable
) -> Iterator[dict]:
    # completion id -> [sum of places, sum of rewards, annotators who ranked it]
    totals: dict[int, list[float]] = {}
    for ranking in rankings:
        k = len(ranking.ranks)
        for cid, place in zip(ranking.ids, places_from_ranks(ranks=ranking.ranks), strict=True):
            sums = totals.setdefault(cid, [0.0, 0.0, 0])
            sums[0] += place
            sums[1] += (k - place) / (k - 1)
            sums[2] += 1
    if len(totals) < 2:
        return
    ids = sorted(totals)
    row: dict[str, Any] = {
        "prompt": prompt,
        "completions": [answer(group.texts[cid]) for cid in ids],
        "ranks": [totals[cid][0] / totals[cid][2] for cid in ids],
        "rewards": [totals[cid][1] / totals[cid][2] for cid in ids],
        "prompt_id": group.prompt_id,
        "completion_ids": ids,
        "truncated": [cid in group.cut for cid in ids],
        "annotators": len(rankings),
        "adjudicated": any(ranking.verdict is not None for ranking in rankings),
        "round": number,
    }
    if group.rewards is not None:
        row["reward_scores"] = [group.rewards[cid] for cid in ids]
    yield row


def _judgement_rows(
    group: _PromptGroup, options: PreferenceExportOptions, prompt: Any, answer: Callable
) -> Iterator[dict]:
    """A row per judgement in the order of the format's columns: the judgement's stored columns as they are (None
    where its kind has no such field), then the ones built here."""
    pairwise_stored = _stored_columns(PairwiseJudgement)

    def who(annotator_id: int) -> str:
        return annotator_pseudonym(annotator_id=annotator_id) if options.pseudonymise else str(annotator_id)

    def verdict_on(completion_ids: list[int]) -> Adjudication | None:
        low, high = min(completion_ids), max(completion_ids)
        if f"c{low}-{high}" in group.verdicts:
            return group.verdicts[f"c{low}-{high}"]
        return group.verdicts.get(f"p{group.prompt_id}-r{group.round_ids[low]}")

    for row in group.pairwise:
        out = dict.fromkeys(_JUDGEMENT_COLUMNS)
        out.update((name, getattr(row, name)) for name in pairwise_stored)
        out.update(
            kind="pairwise",
            judgement_id=row.id,
            prompt_id=group.prompt_id,
            prompt=prompt,
            annotator=who(row.annotator_id),
            created_at=row.created_at.isoformat(),
            completion_ids=[row.left_id, row.right_id],
            truncated=[row.left_id in group.cut, row.right_id in group.cut],
            completions=[answer(group.texts[row.left_id]), answer(group.texts[row.right_id])],
            ranks=None,
            round=group.rounds[row.left_id],
        )
        _mark_superseded(out, verdict_on([row.left_id, row.right_id]))
        if group.rewards is not None:
            out["reward_scores"] = [group.rewards[row.left_id], group.rewards[row.right_id]]
        yield out
    for ranking in group.rankings:
        ids = ranking.ids
        out = dict.fromkeys(_JUDGEMENT_COLUMNS)
        out.update(ranking.stored or {})
        out.update(
            kind="ranking",
            judgement_id=ranking.judgement_id,
            prompt_id=group.prompt_id,
            prompt=prompt,
            annotator=who(ranking.annotator_id),
            created_at=out["created_at"].isoformat() if out["created_at"] else None,
            completion_ids=ids,
            truncated=[cid in group.cut for cid in ids],
            completions=[answer(group.texts[cid]) for cid in ids],
            ranks=ranking.ranks,
            round=group.rounds[ids[0]],
        )
        _mark_superseded(out, verdict_on(ids))
        if group.rewards is not None:
            out["reward_scores"] = [group.rewards[cid] for cid in ids]
        yield out
    for key, verdict in group.verdicts.items():
        ids = _item_completions(group, item_key_parse(key))
        if verdict.verdict == Adjudication.Verdict.RANKING:
            ids = _verdict_ranking(verdict, group.texts).ids
        if len(ids) < 2:  # the options let fewer than two of its completions through
            continue
        out = dict.fromkeys(_JUDGEMENT_COLUMNS)
        ranks = {int(cid): rank for cid, rank in (verdict.ranks or {}).items()}
        out.update(
            kind="adjudication",
            judgement_id=verdict.pk,
            prompt_id=group.prompt_id,
            prompt=prompt,
            annotator=verdict.reviewer.username,
            created_at=verdict.created_at.isoformat(),
            completion_ids=ids,
            truncated=[cid in group.cut for cid in ids],
            completions=[answer(group.texts[cid]) for cid in ids],
            choice=None if verdict.verdict == Adjudication.Verdict.RANKING else verdict.verdict,
            ranks=[ranks[cid] for cid in ids] if ranks else None,
            rationale=verdict.note,
            round=group.rounds[ids[0]],
            adjudicated=True,
        )
        if group.rewards is not None:
            out["reward_scores"] = [group.rewards[cid] for cid in ids]
        yield out


def _mark_superseded(out: dict[str, Any], verdict: Adjudication | None) -> None:
    out["adjudicated"] = False
    out["superseded_by"] = verdict.pk if verdict is not None else None


@cache
def _stored_columns(judgement: type[Judgement]) -> tuple[str, ...]:
    """The judgements export's columns that are stored fields of this kind of judgement (not relations).

    They are read from the judgement and written as they are, so a new judgement field reaches the
    export through its column in EXPORT_FORMATS alone.
    """
    stored = {f.name for f in judgement._meta.concrete_fields if not f.is_relation}
    return tuple(name for name in _JUDGEMENT_COLUMNS if name in stored)


def preference_rows(
    *,
    project: Project,
    options: PreferenceExportOptions,
    on_prompt: Callable[[int], None] | None = None,
    id_range: tuple[int, int] | None = None,
    reliability: Reliability | None = None,
) -> Iterator[dict[str, Any]]:
    """Export rows for a project, prompt by prompt in id order, streamed from the database.

    ``on_prompt(1)`` is called once per prompt read (a progress hook; the total is the
    project's prompt count). ``id_range=(first, end)`` reads only the prompts with
    ``first <= id < end``: the rows of consecutive ranges, one after the other, are the
    rows of the whole, when they are given the same ``reliability`` (`preference_weights`;
    read from the whole project when not given and the options weigh votes).
    """
    spec = EXPORT_FORMATS[options.format]
    if spec.project_rows is not None:
        yield from spec.project_rows(project, options, id_range)
        return
    shape_prompt, answer = _shapers(options)
    assert spec.rows is not None
    weights = (reliability or preference_weights(project=project, options=options)) if _weighs(options) else None
    for group in _prompt_groups(project, options, on_prompt, id_range, weights):
        yield from spec.rows(group, options, shape_prompt(group.messages), answer)


def _weighs(options: PreferenceExportOptions) -> bool:
    return options.format == "dpo" and options.weighting == "reliability"


def preference_weights(*, project: Project, options: PreferenceExportOptions) -> Reliability | None:
    """What each annotator's vote counts in an export with these options: None for one each."""
    return project_reliability(project=project) if _weighs(options) else None


def _battle_rows(
    project: Project, options: PreferenceExportOptions, id_range: tuple[int, int] | None
) -> Iterator[dict[str, Any]]:
    """A row per battle judgement, in FastChat's battle format (``model_a``, ``model_b``, ``winner``), with the
    prompt, both answers' lengths in characters, the annotator and the time (``tstamp``, Unix seconds)."""
    filters = _judgement_filters(options, "")
    if id_range is not None:
        filters |= {"prompt_id__gte": id_range[0], "prompt_id__lt": id_range[1]}
    for row in battle_rows(project=project, filters=filters):
        annotator_id = row.annotator_id
        yield {
            "model_a": row.model_a,
            "model_b": row.model_b,
            "winner": row.winner,
            "prompt_id": row.prompt_id,
            "length_a": row.length_a,
            "length_b": row.length_b,
            "annotator": annotator_pseudonym(annotator_id=annotator_id) if options.pseudonymise else str(annotator_id),
            "judgement_id": row.judgement_id,
            "round": row.round,
            "tstamp": row.created_at.timestamp(),
        }


RowBuilder = Callable[[_PromptGroup, PreferenceExportOptions, Any, Callable[[str], Any]], Iterator[dict[str, Any]]]
ProjectRowBuilder = Callable[[Project, PreferenceExportOptions, tuple[int, int] | None], Iterator[dict[str, Any]]]


@dataclass(frozen=True)
class ExportFormatSpec:
    """One export format: how its rows are built and what they hold.

    ``columns`` are the row's keys in order with their types, which the Parquet schema follows:
    ``text`` is a prompt or a completion (a string, or a message list when conversational);
    ``string``, ``bool``, ``int32``, ``int64``, ``float64``, and ``list<...>`` of any of them.
    """

    rows: RowBuilder | None  # (prompt group, options, the shaped prompt, answer: completion text -> shaped) -> rows
    columns: tuple[tuple[str, str], ...]
    pairwise: bool  # whether pairwise judgements are read (rankings always are)
    raw: bool  # whether each judgement's strength, rationale, time and creation are read
    reward_columns: tuple[tuple[str, str], ...]  # the columns the reward_scores option adds at the end
    # A format read from the project's battles rather than prompt by prompt: (project, options, id range) -> rows
    project_rows: ProjectRowBuilder | None = None
    options: frozenset[str] | None = None  # the options that apply to it, by public name; None: all of them


# The one place a format is named (with ExportFormat above): a new one adds its builder and its entry here.
EXPORT_FORMATS: dict[str, ExportFormatSpec] = {
    "dpo": ExportFormatSpec(
        rows=_dpo_rows,
        columns=(
            ("prompt", "text"),
            ("chosen", "text"),
            ("rejected", "text"),
            ("prompt_id", "int64"),
            ("chosen_id", "int64"),
            ("rejected_id", "int64"),
            ("chosen_truncated", "bool"),
            ("rejected_truncated", "bool"),
            ("votes", "int32"),
            ("agreement", "float64"),
            ("weight", "float64"),
            ("adjudicated", "bool"),
            ("round", "int64"),
        ),
        pairwise=True,
        raw=False,
        reward_columns=(("chosen_reward", "float64"), ("rejected_reward", "float64")),
    ),
    "grpo": ExportFormatSpec(
        rows=_grpo_rows,
        columns=(
            ("prompt", "text"),
            ("completions", "list<text>"),
            ("ranks", "list<float64>"),
            ("rewards", "list<float64>"),
            ("prompt_id", "int64"),
            ("completion_ids", "list<int64>"),
            ("truncated", "list<bool>"),
            ("annotators", "int32"),
            ("adjudicated", "bool"),
            ("round", "int64"),
        ),
        pairwise=False,
        raw=False,
        reward_columns=(("reward_scores", "list<float64>"),),
    ),
    "judgements": ExportFormatSpec(
        rows=_judgement_rows,
        columns=(
            ("kind", "string"),
            ("judgement_id", "int64"),
            ("prompt_id", "int64"),
            ("prompt", "text"),
            ("annotator", "string"),
            ("created_at", "string"),
            ("completion_ids", "list<int64>"),
            ("truncated", "list<bool>"),
            ("completions", "list<text>"),
            ("choice", "string"),
            ("strength", "string"),
            ("ranks", "list<int32>"),
            ("rationale", "string"),
            ("time_ms", "int64"),
            ("round", "int64"),
            ("adjudicated", "bool"),
            ("superseded_by", "int64"),
        ),
        pairwise=True,
        raw=True,
        reward_columns=(("reward_scores", "list<float64>"),),
    ),
    # Blind battles between versions, never training data: FastChat's rating code reads them as they are.
    "battles": ExportFormatSpec(
        rows=None,
        project_rows=_battle_rows,
        columns=(
            ("model_a", "string"),
            ("model_b", "string"),
            ("winner", "string"),
            ("prompt_id", "int64"),
            ("length_a", "int64"),
            ("length_b", "int64"),
            ("annotator", "string"),
            ("judgement_id", "int64"),
            ("round", "int64"),
            ("tstamp", "float64"),
        ),
        pairwise=False,
        raw=False,
        reward_columns=(),
        options=frozenset({"format", "created_from", "created_before", "annotators", "pseudonymise"}),
    ),
}
FORMATS: tuple[str, ...] = tuple(EXPORT_FORMATS)


def export_columns(*, options: PreferenceExportOptions) -> tuple[tuple[str, str], ...]:
    """The columns of an export's rows in order, with their types: its format's, and the reward scores if asked."""
    spec = EXPORT_FORMATS[options.format]
    return spec.columns + (spec.reward_columns if options.reward_scores else ())


_JUDGEMENT_COLUMNS = tuple(name for name, _ in EXPORT_FORMATS["judgements"].columns)
