"""Reliability-weighted pair labels, and reviewers' verdicts, in exports and training snapshots."""

import json
import random
import uuid
from pathlib import Path

import numpy as np
import pytest
from django.core.management import CommandError, call_command
from rest_framework.test import APIClient

from feedback.models import Completion, Membership, PairwiseJudgement, Prompt
from feedback.selectors.preferences import ExportOptionsError, PreferenceExportOptions, preference_rows
from feedback.selectors.reliability import reliability_estimate
from feedback.services.adjudications import adjudication_record, adjudication_undo
from feedback.services.training_runs import TrainingRunError, run_dir, training_run_start
from tests.factories import MembershipFactory, ProjectFactory, UserFactory, first_round
from tests.feedback.export_helpers import compare, make_prompt, rank

pytestmark = pytest.mark.django_db

KINDS = ("careful", "careful", "careful", "random", "always_a", "adversarial")


def simulated(project, *, pairs: int = 300, seed: int = 7) -> dict[int, int]:
    """6 annotators judge every pair of a pairwise project; returns prompt id -> the truly better completion id.

    3 careful annotators are right 90 % of the time, 1 picks at random, 1 always picks A (which answer is shown
    as A is shuffled), 1 is wrong 80 % of the time."""
    rng = random.Random(seed)
    round_one = first_round(project)
    prompts = Prompt.objects.bulk_create(
        [Prompt(project=project, messages=[{"role": "user", "content": f"Question {i}?"}]) for i in range(pairs)]
    )
    completions = Completion.objects.bulk_create(
        [Completion(prompt=p, round=round_one, text=f"answer {j} to {p.pk}", html="") for p in prompts for j in (0, 1)]
    )
    by_prompt = {p.pk: (completions[2 * i], completions[2 * i + 1]) for i, p in enumerate(prompts)}
    truth = {prompt_id: rng.choice(pair).pk for prompt_id, pair in by_prompt.items()}
    annotators = [
        MembershipFactory(project=project, user=UserFactory(username=f"{kind}{i}")).user for i, kind in enumerate(KINDS)
    ]
    judgements = []
    for annotator, kind in zip(annotators, KINDS, strict=True):
        for prompt_id, (first, second) in by_prompt.items():
            left, right = (first, second) if rng.random() < 0.5 else (second, first)
            right_answer = "a" if truth[prompt_id] == left.pk else "b"
            wrong_answer = "b" if right_answer == "a" else "a"
            choice = {
                "careful": right_answer if rng.random() < 0.9 else wrong_answer,
                "random": rng.choice("ab"),
                "always_a": "a",
                "adversarial": right_answer if rng.random() < 0.2 else wrong_answer,
            }[kind]
            judgements.append(
                PairwiseJudgement(
                    project=project,
                    annotator=annotator,
                    prompt_id=prompt_id,
                    round=round_one,
                    left=left,
                    right=right,
                    item_key=f"c{first.pk}-{second.pk}",
                    choice=choice,
                    client_uuid=uuid.uuid4(),
                )
            )
    PairwiseJudgement.objects.bulk_create(judgements)
    return truth


def accuracy(rows: list[dict], truth: dict[int, int]) -> float:
    """The share of all pairs whose chosen answer is the truly better one (a pair left out counts as missed)."""
    return sum(row["chosen_id"] == truth[row["prompt_id"]] for row in rows) / len(truth)


def test_reliability_weighted_labels_recover_the_truth_where_the_plain_majority_does_not():
    project = ProjectFactory(mode="pairwise", completions_per_prompt=2)
    truth = simulated(project)

    weighted = list(preference_rows(project=project, options=PreferenceExportOptions()))
    raw = list(preference_rows(project=project, options=PreferenceExportOptions(weighting="raw")))

    assert len(weighted) == 300  # no weighted vote is tied
    assert accuracy(weighted, truth) >= 0.95
    assert 0.55 <= accuracy(raw, truth) <= 0.85  # ties (3 to 3) are left out and splits go wrong
    assert {row["votes"] for row in weighted} == {6}
    # weight is the reliability-weighted share for the chosen side; agreement stays the raw share
    assert all(0.5 < row["weight"] <= 1.0 for row in weighted)
    assert any(row["agreement"] < 0.5 for row in weighted)  # the weighted side outvoted by a plain majority


def test_a_dpo_run_snapshot_carries_the_weighted_labels_and_says_so(tiny_model_dir):
    project = ProjectFactory(mode="pairwise", completions_per_prompt=2, base_model=str(tiny_model_dir))
    simulated(project, pairs=120)
    exported = {
        (row["chosen_id"], row["rejected_id"]): row["weight"]
        for row in preference_rows(project=project, options=PreferenceExportOptions())
    }

    run = training_run_start(project=project, algorithm="dpo", enqueue=False)

    snapshot = []
    for name in ("train.jsonl", "held_out.jsonl"):
        snapshot += [json.loads(line) for line in (run_dir(run) / name).read_text().splitlines()]
    assert {(row["chosen_id"], row["rejected_id"]): row["weight"] for row in snapshot} == exported
    assert run.data_counts["weighting"] == "reliability"
    assert len({round(weight, 6) for weight in exported.values()}) > 10  # the weights differ pair by pair


def test_a_raw_run_and_a_raw_project_label_by_plain_majority(tiny_model_dir):
    project = ProjectFactory(mode="pairwise", completions_per_prompt=2, base_model=str(tiny_model_dir))
    simulated(project, pairs=60)
    raw = list(preference_rows(project=project, options=PreferenceExportOptions(weighting="raw")))

    run = training_run_start(project=project, algorithm="dpo", enqueue=False, weighting="raw")

    snapshot = []
    for name in ("train.jsonl", "held_out.jsonl"):
        snapshot += [json.loads(line) for line in (run_dir(run) / name).read_text().splitlines()]
    assert sorted(row["weight"] for row in snapshot) == sorted(row["weight"] for row in raw)
    assert run.data_counts["weighting"] == "raw"


def test_a_bad_weighting_is_refused_everywhere_and_starts_nothing(tiny_model_dir, staff_user, tmp_path):
    project = ProjectFactory(slug="w", mode="pairwise", completions_per_prompt=2, base_model=str(tiny_model_dir))
    simulated(project, pairs=20)
    with pytest.raises(ExportOptionsError, match="weighting: must be reliability or raw, not 'majority'"):
        PreferenceExportOptions(weighting="majority")  # type: ignore[arg-type]
    with pytest.raises(TrainingRunError, match="weighting: must be reliability or raw, not 'majority'"):
        training_run_start(project=project, algorithm="dpo", enqueue=False, weighting="majority")
    with pytest.raises(CommandError, match="invalid choice: 'majority'"):
        call_command("export_preferences", "w", "--format", "dpo", "--weighting", "majority", "--out", "x.jsonl")

    api = APIClient()
    api.force_authenticate(staff_user)
    export = api.get("/api/v1/projects/w/export/", {"format": "dpo", "weighting": "majority"})
    start = api.post("/api/v1/projects/w/training-runs/", {"weighting": "majority"}, format="json")

    assert export.status_code == 400 and export.json() == {"weighting": ['"majority" is not a valid choice.']}
    assert start.status_code == 400 and start.json() == {"weighting": ['"majority" is not a valid choice.']}
    assert project.training_runs.count() == 0


def test_the_export_command_and_api_take_the_weighting(staff_user, tmp_path):
    project = ProjectFactory(slug="w", mode="pairwise", completions_per_prompt=2)
    simulated(project, pairs=40)
    expected = {
        weighting: list(preference_rows(project=project, options=PreferenceExportOptions(weighting=weighting)))
        for weighting in ("raw", "reliability")
    }
    assert expected["raw"] != expected["reliability"]
    api = APIClient()
    api.force_authenticate(staff_user)
    for weighting, rows in expected.items():
        out = tmp_path / f"{weighting}.jsonl"
        call_command("export_preferences", "w", "--format", "dpo", "--weighting", weighting, "--out", str(out))
        response = api.get("/api/v1/projects/w/export/", {"format": "dpo", "weighting": weighting})
        streamed = b"".join(response.streaming_content).decode()
        assert [json.loads(line) for line in out.read_text().splitlines()] == rows
        assert [json.loads(line) for line in streamed.splitlines()] == rows


def test_the_estimate_weighs_gold_and_agreement_and_waits_for_enough_votes():
    # annotator 1 agrees with gold on 5 gold pairs; annotator 2 votes twice on pairs nobody else judged
    low = np.array([10, 12, 14, 16, 18, 30, 32])
    high = low + 1
    annotators = np.array([1, 1, 1, 1, 1, 2, 2])
    for_low = np.array([True, True, True, True, True, False, False])
    gold = {(10, 11): True, (12, 13): True, (14, 15): True, (16, 17): True, (18, 19): True}

    estimate = reliability_estimate(annotators=annotators, low=low, high=high, for_low=for_low, gold=gold)

    first, second = estimate.annotators[1], estimate.annotators[2]
    assert (first.gold_votes, first.own, second.own) == (5, True, False)
    assert first.estimate == pytest.approx((5 + 1) / (5 + 2))  # five right, with the Beta(2, 2) prior
    assert second.reliability == estimate.mean == first.reliability
    assert estimate.weight(99) == pytest.approx(first.weight)  # someone with no vote yet gets the mean's weight


# --- verdicts ------------------------------------------------------------------------------------------------


@pytest.fixture
def reviewer():
    return UserFactory(username="rev")


def pairwise_project(reviewer):
    project = ProjectFactory(mode="pairwise", completions_per_prompt=2)
    MembershipFactory(project=project, user=reviewer, role=Membership.Role.REVIEWER)
    _, (first, second) = make_prompt(project, k=2)
    voters = [UserFactory(username=f"v{i}") for i in range(3)]
    for voter in voters:
        compare(voter, first, second, "a")  # all three prefer the first (lower id)
    return project, first, second


def dpo(project, **options) -> list[dict]:
    return list(preference_rows(project=project, options=PreferenceExportOptions(**options)))


@pytest.mark.parametrize("weighting", ["raw", "reliability"])
def test_a_verdict_replaces_the_majority_and_undoing_it_brings_the_votes_back(reviewer, weighting):
    project, first, second = pairwise_project(reviewer)
    key = f"c{first.pk}-{second.pk}"
    before = dpo(project, weighting=weighting)
    assert [(r["chosen_id"], r["weight"], r["adjudicated"]) for r in before] == [(first.pk, 1.0, False)]

    verdict = adjudication_record(project=project, reviewer=reviewer, item_key=key, verdict="b", note="B cites")
    ruled = dpo(project, weighting=weighting)
    adjudication_undo(project=project, user=reviewer, adjudication_id=verdict.pk)
    after = dpo(project, weighting=weighting)

    assert [
        (r["chosen_id"], r["rejected_id"], r["weight"], r["votes"], r["agreement"], r["adjudicated"]) for r in ruled
    ] == [(second.pk, first.pk, 1.0, 3, 0.0, True)]
    assert after == before


@pytest.mark.parametrize("verdict", ["tie", "both_bad", "unusable"])
def test_a_verdict_without_an_order_leaves_the_pair_out(reviewer, verdict):
    project, first, second = pairwise_project(reviewer)
    adjudication_record(project=project, reviewer=reviewer, item_key=f"c{first.pk}-{second.pk}", verdict=verdict)

    assert dpo(project) == []


def test_the_judgements_export_marks_what_a_verdict_superseded_and_holds_the_verdict(reviewer):
    project, first, second = pairwise_project(reviewer)
    verdict = adjudication_record(
        project=project, reviewer=reviewer, item_key=f"c{first.pk}-{second.pk}", verdict="b", note="B cites"
    )

    rows = dpo(project, format="judgements")

    judged = [row for row in rows if row["kind"] == "pairwise"]
    assert [(row["adjudicated"], row["superseded_by"]) for row in judged] == [(False, verdict.pk)] * 3
    (ruling,) = [row for row in rows if row["kind"] == "adjudication"]
    assert (ruling["judgement_id"], ruling["annotator"], ruling["choice"], ruling["rationale"]) == (
        verdict.pk,
        "rev",
        "b",
        "B cites",
    )
    assert (ruling["completion_ids"], ruling["adjudicated"], ruling["superseded_by"]) == (
        [first.pk, second.pk],
        True,
        None,
    )


def ranking_project(reviewer):
    project = ProjectFactory(mode="ranking", completions_per_prompt=3)
    MembershipFactory(project=project, user=reviewer, role=Membership.Role.REVIEWER)
    prompt, (c0, c1, c2) = make_prompt(project, k=3)
    for i in range(2):
        rank(UserFactory(username=f"r{i}"), prompt, [[c0], [c1], [c2]])
    return project, prompt, (c0, c1, c2)


def test_a_ranking_verdict_is_the_group_and_the_pairs_of_a_ranked_item(reviewer):
    project, prompt, (c0, c1, c2) = ranking_project(reviewer)
    key = f"p{prompt.pk}-r{first_round(project).pk}"
    adjudication_record(
        project=project,
        reviewer=reviewer,
        item_key=key,
        verdict="ranking",
        ranks={str(c2.pk): 1, str(c0.pk): 2, str(c1.pk): 2},
    )

    (group,) = dpo(project, format="grpo")
    pairs = dpo(project)

    assert (group["completion_ids"], group["ranks"], group["annotators"], group["adjudicated"]) == (
        [c0.pk, c1.pk, c2.pk],
        [2.5, 2.5, 1.0],
        1,
        True,
    )
    # c2 beats both; the tied c0 and c1 form no pair, although both annotators put c0 first
    assert sorted((r["chosen_id"], r["rejected_id"], r["votes"], r["adjudicated"]) for r in pairs) == sorted(
        [(c2.pk, c0.pk, 2, True), (c2.pk, c1.pk, 2, True)]
    )


def test_an_unusable_ranked_item_leaves_training_altogether(reviewer):
    project, prompt, _ = ranking_project(reviewer)
    key = f"p{prompt.pk}-r{first_round(project).pk}"
    adjudication_record(project=project, reviewer=reviewer, item_key=key, verdict="unusable")

    assert (dpo(project), dpo(project, format="grpo")) == ([], [])
    assert [row["kind"] for row in dpo(project, format="judgements")] == ["ranking", "ranking", "adjudication"]


def test_a_training_snapshot_takes_the_verdict(reviewer, tiny_model_dir):
    project, first, second = pairwise_project(reviewer)
    project.base_model = str(tiny_model_dir)
    project.save()
    adjudication_record(project=project, reviewer=reviewer, item_key=f"c{first.pk}-{second.pk}", verdict="b")

    run = training_run_start(project=project, algorithm="dpo", enqueue=False, test_fraction=0.01)

    rows = []
    for name in ("train.jsonl", "held_out.jsonl"):
        rows += [json.loads(line) for line in Path(run_dir(run) / name).read_text().splitlines()]
    assert [(row["chosen_id"], row["adjudicated"]) for row in rows] == [(second.pk, True)]
