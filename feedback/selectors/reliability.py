"""Each annotator's reliability, from gold items and agreement together, and the weight it gives their votes.

The model is Dawid and Skene's (1979, "Maximum likelihood estimation of observer error-rates using the EM
algorithm", Applied Statistics 28(1)) in its one-coin form: on a pair of completions one of the two is
better, and annotator j names the better one with probability ``p_j`` whatever the pair. Every vote on
a pair is an outcome: a pairwise judgement that chose a side, and each pair a ranking puts in order
(every pair with different ranks). Tie and both-bad votes, and tied places, say nothing about the order
and are left out. Pairs are unordered completion ids, so an item's votes meet however it was shown.

Expectation-maximisation from ``p_j = START`` for everyone (the first E step is then a plain majority):

- E: each pair's log-odds that its lower-id completion is better, ``sum_j ±logit(p_j)`` over its
  votes (+ for a vote for it, - against). A gold pair's truth is known and stays fixed.
- M: ``p_j`` = (expected right votes + PRIOR_RIGHT) / (votes + PRIOR_RIGHT + PRIOR_WRONG): a Beta(2, 2)
  prior that keeps an annotator with few votes near 0.5 instead of at 0 or 1.

An annotator's own estimate counts once they have ``MIN_GOLD`` votes on gold pairs or ``MIN_SHARED`` votes
on pairs others voted on too; before that they get the mean of those who qualify (START when nobody does).
A vote's weight is ``logit(p_j)``, with p clipped to [P_MIN, P_MAX] so no one vote outweighs every other:
0 for a coin-flipper or someone who always picks the left answer (right half the time on shuffled pairs),
negative for someone mostly wrong, whose vote then counts for the other side.

Battles (versions against each other, not training data) and excluded annotators are left out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from django.contrib.auth import get_user_model

from feedback.models import PairwiseJudgement, Project, Prompt, RankedCompletion, Round
from feedback.selectors.annotators import excluded_annotator_ids
from feedback.selectors.gold import gold_completion_ranks

METHOD = "Dawid-Skene (one-coin) EM over pairwise outcomes, Beta(2, 2) prior"
START = 0.7
PRIOR_RIGHT = PRIOR_WRONG = 1.0  # Beta(2, 2): one imaginary right and one wrong vote
MIN_GOLD = 5
MIN_SHARED = 20
P_MIN, P_MAX = 0.02, 0.98
MAX_ITERATIONS = 100
TOLERANCE = 1e-6


@dataclass(frozen=True, kw_only=True)
class AnnotatorReliability:
    annotator_id: int
    username: str
    votes: int  # votes on the order of a pair
    gold_votes: int  # of them, on gold pairs
    shared_votes: int  # of them, on pairs others voted on too
    estimate: float  # the model's p for this annotator, from their own votes
    own: bool  # whether the estimate is used (enough gold or shared votes); else the project's mean
    reliability: float  # the p their votes are weighted with
    weight: float  # logit(reliability): what one vote of theirs counts


@dataclass(frozen=True, kw_only=True)
class Reliability:
    method: str
    annotators: dict[int, AnnotatorReliability]  # by annotator id
    mean: float  # what an annotator without their own estimate gets
    pairs: int  # pairs with at least one vote on their order
    iterations: int

    def weight(self, annotator_id: int) -> float:
        """What a vote of this annotator counts: their weight, or the mean's for someone with no vote yet."""
        found = self.annotators.get(annotator_id)
        return found.weight if found is not None else float(_logit(np.array(self.mean)))


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, P_MIN, P_MAX)
    return np.log(p / (1 - p))


def project_reliability(*, project: Project) -> Reliability:
    """Every annotator's reliability in the project, from all its non-battle votes (see the module's docstring)."""
    annotators, low, high, for_low = _votes(project)
    return reliability_estimate(
        annotators=annotators,
        low=low,
        high=high,
        for_low=for_low,
        gold=_gold_pairs(project),
        usernames=_usernames(set(annotators.tolist())),
    )


def reliability_estimate(
    *,
    annotators: np.ndarray,
    low: np.ndarray,
    high: np.ndarray,
    for_low: np.ndarray,
    gold: dict[tuple[int, int], bool],
    usernames: dict[int, str] | None = None,
) -> Reliability:
    """The EM on votes given as arrays, one entry per vote: the annotator, the pair (its lower and higher completion
    id) and whether the vote is for the lower id. ``gold`` gives known truths: (low, high) -> lower id better."""
    usernames = usernames or {}
    if len(annotators) == 0:
        return Reliability(method=METHOD, annotators={}, mean=START, pairs=0, iterations=0)
    people, person = np.unique(annotators, return_inverse=True)
    completions = np.unique(np.concatenate([low, high]))
    pairs, pair = np.unique(_pair_keys(low, high, completions), return_inverse=True)
    pair = pair.reshape(-1)
    sign = np.where(for_low, 1.0, -1.0)

    gold_pairs = np.array(list(gold), dtype=np.int64).reshape(-1, 2)
    gold_keys = _pair_keys(gold_pairs[:, 0], gold_pairs[:, 1], completions)
    gold_truth = np.array(list(gold.values()), dtype=float)
    where = np.searchsorted(pairs, gold_keys)
    matched = (gold_keys >= 0) & (where < len(pairs))
    matched[matched] = pairs[where[matched]] == gold_keys[matched]
    known = np.zeros(len(pairs), dtype=bool)
    truth = np.zeros(len(pairs))
    known[where[matched]] = True
    truth[where[matched]] = gold_truth[matched]
    voters_per_pair = np.bincount(pair, minlength=len(pairs))
    votes = np.bincount(person, minlength=len(people))
    gold_votes = np.bincount(person, weights=known[pair], minlength=len(people)).astype(int)
    shared_votes = np.bincount(person, weights=voters_per_pair[pair] >= 2, minlength=len(people)).astype(int)
    own = (gold_votes >= MIN_GOLD) | (shared_votes >= MIN_SHARED)

    p = np.full(len(people), START)
    estimate = p
    iterations = 0
    for iterations in range(1, MAX_ITERATIONS + 1):  # noqa: B007 (the count is reported)
        used = np.where(own, p, p[own].mean() if own.any() else START)
        log_odds = np.bincount(pair, weights=sign * _logit(used)[person], minlength=len(pairs))
        low_better = np.where(known, truth, 1.0 / (1.0 + np.exp(-log_odds)))
        right = np.where(for_low, low_better[pair], 1.0 - low_better[pair])
        estimate = (np.bincount(person, weights=right, minlength=len(people)) + PRIOR_RIGHT) / (
            votes + PRIOR_RIGHT + PRIOR_WRONG
        )
        change = np.abs(estimate - p).max()
        p = estimate
        if change < TOLERANCE:
            break
    mean = float(p[own].mean()) if own.any() else START
    used = np.where(own, p, mean)
    found = {
        int(person_id): AnnotatorReliability(
            annotator_id=int(person_id),
            username=usernames.get(int(person_id), str(person_id)),
            votes=int(votes[i]),
            gold_votes=int(gold_votes[i]),
            shared_votes=int(shared_votes[i]),
            estimate=float(estimate[i]),
            own=bool(own[i]),
            reliability=float(used[i]),
            weight=float(_logit(used[i : i + 1])[0]),
        )
        for i, person_id in enumerate(people.tolist())
    }
    return Reliability(method=METHOD, annotators=found, mean=mean, pairs=len(pairs), iterations=iterations)


_PAIRWISE = np.dtype([("annotator", np.int64), ("left", np.int64), ("right", np.int64)])
_PLACES = np.dtype([("judgement", np.int64), ("annotator", np.int64), ("completion", np.int64), ("rank", np.int16)])


def _pair_keys(low: np.ndarray, high: np.ndarray, completions: np.ndarray) -> np.ndarray:
    """One sortable int64 per (low id, high id) pair: the two ids' places among ``completions`` (sorted, distinct),
    -1 for a pair with an id not among them."""
    places = [np.searchsorted(completions, ids) for ids in (low, high)]
    inside = np.ones(len(low), dtype=bool)
    for ids, place in zip((low, high), places, strict=True):
        inside &= place < len(completions)
        inside[inside] = completions[place[inside]] == ids[inside]
    return np.where(inside, (places[0].astype(np.int64) << 32) | places[1], -1)


def _votes(project: Project) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(annotator, low id, high id, for low) arrays over every vote on a pair's order, read straight into arrays
    (the estimate peaks near 175 bytes a vote: tests/feedback/test_export_memory.py)."""
    battles = list(Round.objects.filter(project=project, kind=Round.Kind.BATTLE).values_list("pk", flat=True))
    excluded = excluded_annotator_ids(project=project)
    judged = (
        PairwiseJudgement.objects.filter(project=project)
        .exclude(round_id__in=battles)
        .exclude(annotator_id__in=excluded)
        .order_by()
    )
    parts = []
    for choice in ("a", "b"):  # the winner first: left for "a", right for "b"
        winner, loser = ("left_id", "right_id") if choice == "a" else ("right_id", "left_id")
        rows = judged.filter(choice=choice).values_list("annotator_id", winner, loser).iterator(20_000)
        votes = np.fromiter(rows, dtype=_PAIRWISE)
        parts.append(_pair_votes(votes["annotator"], votes["left"], votes["right"]))

    ranked = (
        RankedCompletion.objects.filter(judgement__project=project)
        .exclude(judgement__round_id__in=battles)
        .exclude(judgement__annotator_id__in=excluded)
        .order_by("judgement_id")
        .values_list("judgement_id", "judgement__annotator_id", "completion_id", "rank")
    )
    places = np.fromiter(ranked.iterator(20_000), dtype=_PLACES)
    judgement = places["judgement"]
    longest = int(np.unique(judgement, return_counts=True)[1].max()) if len(judgement) else 0
    # every pair of one ranking: rows `offset` apart within the same judgement (a ranking holds a few completions)
    for offset in range(1, longest):
        first, second = places[:-offset], places[offset:]
        keep = (first["judgement"] == second["judgement"]) & (first["rank"] != second["rank"])
        first, second = first[keep], second[keep]
        first_won = first["rank"] < second["rank"]
        winner = np.where(first_won, first["completion"], second["completion"])
        loser = np.where(first_won, second["completion"], first["completion"])
        parts.append(_pair_votes(first["annotator"], winner, loser))
    annotators, lows, highs, for_low = (np.concatenate([part[i] for part in parts]) for i in range(4))
    return annotators, lows, highs, for_low


def _pair_votes(annotator: np.ndarray, winner: np.ndarray, loser: np.ndarray) -> tuple[np.ndarray, ...]:
    return annotator, np.minimum(winner, loser), np.maximum(winner, loser), winner < loser


def _gold_pairs(project: Project) -> dict[tuple[int, int], bool]:
    """(low id, high id) -> whether the lower id is better, for every pair of a gold prompt's completions in order."""
    gold = Prompt.objects.filter(project=project, gold__isnull=False).only("pk", "gold")
    truths: dict[tuple[int, int], bool] = {}
    for ranks in gold_completion_ranks(prompts=gold).values():
        for a, rank_a in ranks.items():
            for b, rank_b in ranks.items():
                if a < b and rank_a != rank_b:
                    truths[(a, b)] = rank_a < rank_b
    return truths


def _usernames(ids: set[int]) -> dict[int, str]:
    return dict(get_user_model().objects.filter(pk__in=ids).values_list("pk", "username"))
