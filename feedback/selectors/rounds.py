"""Reading rounds: which prompts a new round takes, and how far each round is."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import groupby
from operator import itemgetter

from django.db.models import Count, F, Max, Sum
from django.db.models.functions import Coalesce

from feedback.models import PairwiseJudgement, Project, Prompt, RankedCompletion, RankingJudgement, Round


def round_prompts_by_latest_round(*, project: Project, limit: int | None) -> list[int]:
    """Training prompt ids whose latest round is oldest first; prompts never answered come before any.

    Evaluation prompts are never chosen for an ordinary round (nor by ``round_prompts_by_judgements``)."""
    prompts = (
        Prompt.objects.filter(project=project, split=Prompt.Split.TRAIN)
        .annotate(latest=Max("round_prompts__round__number"))
        .order_by(F("latest").asc(nulls_first=True), "pk")
        .values_list("pk", flat=True)
    )
    return list(prompts[:limit] if limit else prompts)


def round_prompts_by_judgements(*, project: Project, limit: int | None) -> list[int]:
    """Training prompt ids with the fewest judgements over all their rounds first; ties go to the oldest latest
    round."""
    prompts = (
        Prompt.objects.filter(project=project, split=Prompt.Split.TRAIN)
        .annotate(
            judged=Coalesce(Sum("round_prompts__judgement_count"), 0),
            latest=Max("round_prompts__round__number"),
        )
        .order_by("judged", F("latest").asc(nulls_first=True), "pk")
        .values_list("pk", flat=True)
    )
    return list(prompts[:limit] if limit else prompts)


def round_judged_pairs(*, project: Project) -> dict[int, list[tuple[int, int]]]:
    """Each judged prompt's (preferred, rejected) completion pairs from its latest round with a judgement.

    A pairwise judgement gives its chosen side over the other (ties and both-bad give none); a
    ranking gives every better-ranked completion over every worse-ranked one. One pair per vote.
    """
    pairwise = project.mode == Project.Mode.PAIRWISE
    judgements = PairwiseJudgement if pairwise else RankingJudgement
    latest = dict(
        judgements.objects.filter(project=project)
        .values("prompt_id")
        .annotate(number=Max("round__number"))
        .values_list("prompt_id", "number")
    )
    pairs: dict[int, list[tuple[int, int]]] = {prompt_id: [] for prompt_id in latest}
    if pairwise:
        votes = PairwiseJudgement.objects.filter(project=project, choice__in=["a", "b"]).values_list(
            "prompt_id", "round__number", "left_id", "right_id", "choice"
        )
        for prompt_id, number, left, right, choice in votes.iterator():
            if number == latest[prompt_id]:
                pairs[prompt_id].append((left, right) if choice == "a" else (right, left))
        return pairs
    ranked = RankedCompletion.objects.filter(judgement__project=project).order_by("judgement_id")
    rows = ranked.values_list(
        "judgement_id", "judgement__prompt_id", "judgement__round__number", "completion_id", "rank"
    )
    for _, group in groupby(rows.iterator(), key=itemgetter(0)):
        entries = list(group)
        prompt_id, number = entries[0][1], entries[0][2]
        if number != latest[prompt_id]:
            continue
        pairs[prompt_id] += [(a[3], b[3]) for a in entries for b in entries if a[4] < b[4]]
    return pairs


@dataclass(frozen=True)
class RoundProgress:
    round: Round
    completions: int
    judgements: int

    @property
    def percent_written(self) -> int:
        total = self.round.prompts_total
        return 100 if not total else round(100 * self.round.prompts_written / total)


def round_list(*, project: Project) -> list[RoundProgress]:
    """The project's rounds, newest first, with the completions written and the judgements made so far (a ranking
    project's battles are pairwise judgements)."""
    rounds = Round.objects.filter(project=project).order_by("-number")
    completions = dict(rounds.annotate(n=Count("completions")).values_list("pk", "n"))
    judged = dict(rounds.annotate(n=Count("rankingjudgements")).values_list("pk", "n"))
    for pk, n in rounds.annotate(n=Count("pairwisejudgements")).values_list("pk", "n"):
        judged[pk] += n
    return [RoundProgress(round=r, completions=completions[r.pk], judgements=judged[r.pk]) for r in rounds]
