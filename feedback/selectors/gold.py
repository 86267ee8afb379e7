"""Gold items: prompts with a known answer, and what that answer says of the completions people judge.

A gold answer refers to the completions a prompt was imported with, by their order in the import
(index 0 is the first): ``{"choice": "a"}`` or ``{"choice": "b"}`` for a prompt with exactly two, or
``{"ranking": [[0], [1, 2], [3]]}`` for any number (groups of indices, best first; a group's
completions are equally good), which also gives every pair's truth in a pairwise project with K > 2.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from feedback.models import Completion, Judgement, PairwiseJudgement, Project, Prompt, RankingJudgement, Round


class GoldError(ValueError):
    """A gold answer that cannot be used; the message says why."""


def gold_check(gold: Any, *, completions: int) -> dict[str, Any] | None:
    """The gold answer as it is stored, for a prompt imported with ``completions`` completions; None for none."""
    if gold is None:
        return None
    if not isinstance(gold, dict) or len(gold) != 1 or next(iter(gold)) not in ("choice", "ranking"):
        raise GoldError('must be {"choice": "a" or "b"} or {"ranking": [[index, ...], ...]}')
    if completions < 2:
        raise GoldError(f"needs the prompt's completions to judge; it has {completions}")
    if "choice" in gold:
        if gold["choice"] not in ("a", "b"):
            raise GoldError(f"choice must be 'a' or 'b' (the first or the second completion), not {gold['choice']!r}")
        if completions != 2:
            raise GoldError(f"a choice needs exactly two completions; this prompt has {completions}, give a ranking")
        return {"choice": gold["choice"]}
    ranking = gold["ranking"]
    if not isinstance(ranking, list) or not all(isinstance(group, list) and group for group in ranking):
        raise GoldError("ranking must be a list of non-empty groups of completion indices, best first")
    named = [index for group in ranking for index in group]
    if not all(type(index) is int for index in named):
        raise GoldError("ranking names completions by their index in the import: whole numbers from 0")
    outside = sorted({index for index in named if not 0 <= index < completions})
    if outside:
        raise GoldError(
            f"ranking names completion {outside[0]}, which the prompt does not have (indices 0 to {completions - 1})"
        )
    repeated = sorted({index for index in named if named.count(index) > 1})
    if repeated:
        raise GoldError(f"ranking names completion {repeated[0]} more than once")
    if len(named) != completions:
        missing = sorted(set(range(completions)) - set(named))
        raise GoldError(f"ranking must place every completion; {', '.join(map(str, missing))} missing")
    return {"ranking": ranking}


def gold_ranks(gold: dict[str, Any]) -> list[int]:
    """Each imported completion's rank (1 = best; equally good ones share one), in import order."""
    if "choice" in gold:
        return [1, 2] if gold["choice"] == "a" else [2, 1]
    ranks = [0] * sum(len(group) for group in gold["ranking"])
    for rank, group in enumerate(gold["ranking"], start=1):
        for index in group:
            ranks[index] = rank
    return ranks


def imported_completion_ids(*, prompt_ids: Iterable[int]) -> dict[int, tuple[int, list[int]]]:
    """Each prompt's import round and the ids of the completions it was imported with, in import order."""
    found: dict[int, tuple[int, list[int]]] = {}
    rows = (
        Completion.objects.filter(prompt_id__in=list(prompt_ids), round__strategy=Round.Strategy.IMPORTED)
        .order_by("prompt_id", "round__number", "pk")
        .values_list("prompt_id", "round_id", "pk")
    )
    for prompt_id, round_id, completion_id in rows:
        first_round, ids = found.setdefault(prompt_id, (round_id, []))
        if round_id == first_round:
            ids.append(completion_id)
    return found


def gold_completion_ranks(*, prompts: Iterable[Prompt]) -> dict[int, dict[int, int]]:
    """For gold prompts: completion id -> its gold rank, over the completions each was imported with."""
    gold = {prompt.pk: prompt.gold for prompt in prompts if prompt.gold}
    ranks: dict[int, dict[int, int]] = defaultdict(dict)
    for prompt_id, (_, ids) in imported_completion_ids(prompt_ids=gold).items():
        expected = gold_ranks(gold[prompt_id])
        if len(expected) == len(ids):  # a gold answer always covers the import; a mismatch is never scored
            ranks[prompt_id] = dict(zip(ids, expected, strict=True))
    return dict(ranks)


def gold_feedback(*, project: Project, judgement: Judgement) -> str | None:
    """What to tell the annotator after a wrong answer on a gold item, when the project allows it; else None.

    Said in the task's own terms (A and B, or the answers' places as shown), never by completion id."""
    if not project.gold_feedback:
        return None
    prompt = Prompt.objects.filter(pk=judgement.prompt_id, gold__isnull=False).first()
    expected = gold_completion_ranks(prompts=[prompt]).get(judgement.prompt_id) if prompt else None
    if not expected:
        return None
    intro = "That was a check item with a known answer: "
    if isinstance(judgement, PairwiseJudgement):
        left, right = expected.get(judgement.left_id), expected.get(judgement.right_id)
        if left is None or right is None:
            return None
        truth = "tie" if left == right else ("a" if left < right else "b")
        if judgement.choice == truth:
            return None
        return intro + {"a": "A is better.", "b": "B is better.", "tie": "they are equally good."}[truth]
    if not isinstance(judgement, RankingJudgement):
        return None
    shown = judgement.assignment.display_order if judgement.assignment else []
    given = dict(judgement.ranked.values_list("completion_id", "rank"))
    ordered = [(a, b) for a in shown for b in shown if a in expected and b in expected and expected[a] < expected[b]]
    if all(given.get(a, 0) < given.get(b, 0) for a, b in ordered):
        return None
    place = {completion_id: number for number, completion_id in enumerate(shown, start=1)}
    groups: dict[int, list[str]] = defaultdict(list)
    for completion_id in shown:
        if completion_id in expected:
            groups[expected[completion_id]].append(f"answer {place[completion_id]}")
    order = " > ".join(" = ".join(group) for _, group in sorted(groups.items()))
    return intro + f"{order} (answers numbered as they were shown, top first)."
