"""Reading battles: the blind pairwise judgements of battle rounds, named by their writers, and the leaderboard.

A battle is one pairwise judgement in a battle round: the completion shown as A (``left``) is
``model_a``, the one shown as B is ``model_b``, each named by the version that wrote it or ``base``.
The winner is said as FastChat's rating code reads it: ``model_a``, ``model_b``, ``tie`` or
``tie (bothbad)``.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.db.models import F, Q
from django.db.models.functions import Length

from feedback.models import Completion, PairwiseJudgement, Project, Round
from feedback.selectors.annotators import excluded_annotator_ids
from feedback.selectors.leaderboard import Battle, leaderboard

WINNER_OF_CHOICE: dict[str, str] = {
    PairwiseJudgement.Choice.A: "model_a",
    PairwiseJudgement.Choice.B: "model_b",
    PairwiseJudgement.Choice.TIE: "tie",
    PairwiseJudgement.Choice.BOTH_BAD: "tie (bothbad)",
}
BASE = "base"


@dataclass(frozen=True)
class BattleRow:
    """One battle as the ``battles`` export writes it."""

    judgement_id: int
    prompt_id: int
    round: int
    model_a: str
    model_b: str
    winner: str
    length_a: int
    length_b: int
    annotator_id: int
    created_at: datetime

    def battle(self) -> Battle:
        return Battle(self.model_a, self.model_b, self.winner, self.length_a, self.length_b)


def battle_rows(
    *, project: Project, between: tuple[str, str] | None = None, filters: dict[str, Any] | None = None
) -> Iterator[BattleRow]:
    """The project's battles in the order they were judged; only those of the two writers ``between`` when given,
    and only the judgements that match ``filters`` (keyword lookups on PairwiseJudgement). Excluded annotators'
    battles are left out, as their other judgements are."""
    judgements = PairwiseJudgement.objects.filter(
        project=project, round__kind=Round.Kind.BATTLE, **(filters or {})
    ).exclude(annotator_id__in=excluded_annotator_ids(project=project))
    named = judgements.annotate(
        writer_a=F("left__model_version__name"),
        writer_b=F("right__model_version__name"),
        length_a=Length("left__text"),
        length_b=Length("right__text"),
    )
    if between is not None:
        one, other = between
        named = named.filter(
            (_writer_is("writer_a", one) & _writer_is("writer_b", other))
            | (_writer_is("writer_a", other) & _writer_is("writer_b", one))
        )
    rows = named.order_by("pk").values_list(
        "pk",
        "prompt_id",
        "round__number",
        "writer_a",
        "writer_b",
        "choice",
        "length_a",
        "length_b",
        "annotator_id",
        "created_at",
    )
    for pk, prompt_id, number, writer_a, writer_b, choice, length_a, length_b, annotator, created_at in rows.iterator():
        yield BattleRow(
            judgement_id=pk,
            prompt_id=prompt_id,
            round=number,
            model_a=writer_a or BASE,
            model_b=writer_b or BASE,
            winner=WINNER_OF_CHOICE[choice],
            length_a=length_a,
            length_b=length_b,
            annotator_id=annotator,
            created_at=created_at,
        )


# How an answer that declines the request usually starts; a rough guide, shown as such on the Models page.
REFUSAL = re.compile(
    r"^\W*(i'?m sorry|i am sorry|sorry,|i can'?t|i cannot|i'?m (not able|unable)|i am (not able|unable)|as an ai)",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class WriterAnswers:
    """What a writer's battle answers looked like: how many, how long, how often they refuse, and how often
    people found both answers of its battles bad."""

    answers: int
    mean_length: float
    refusal_rate: float
    battles: int
    both_bad_rate: float | None


def battle_writer_answers(*, project: Project, rows: list[BattleRow]) -> dict[str, WriterAnswers]:
    """Each battle writer's answers (all its completions in the project's battle rounds) and its judged battles."""
    texts: dict[str, list[str]] = defaultdict(list)
    written = Completion.objects.filter(round__project=project, round__kind=Round.Kind.BATTLE)
    for version, text in written.values_list("model_version__name", "text").iterator():
        texts[version or BASE].append(text)
    judged: dict[str, int] = defaultdict(int)
    both_bad: dict[str, int] = defaultdict(int)
    for row in rows:
        for name in (row.model_a, row.model_b):
            judged[name] += 1
            both_bad[name] += row.winner == "tie (bothbad)"
    return {
        name: WriterAnswers(
            answers=len(found),
            mean_length=sum(map(len, found)) / len(found),
            refusal_rate=sum(bool(REFUSAL.match(text)) for text in found) / len(found),
            battles=judged[name],
            both_bad_rate=both_bad[name] / judged[name] if judged[name] else None,
        )
        for name, found in texts.items()
    }


def _writer_is(field: str, name: str) -> Q:
    return Q(**{f"{field}__isnull": True}) if name == BASE else Q(**{field: name})


def project_leaderboard(*, project: Project, bootstrap_rounds: int = 1000) -> dict[str, Any]:
    """The project's leaderboard over all its battles, the base model at 0 (see selectors/leaderboard.py)."""
    battles = [row.battle() for row in battle_rows(project=project)]
    return leaderboard(battles, anchor=BASE, bootstrap_rounds=bootstrap_rounds)
