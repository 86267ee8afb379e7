"""Training over rounds: a run's snapshot limited by round or writer, and the reference cache across rounds."""

import json

import pytest
from django.core.management import CommandError, call_command
from rest_framework.test import APIClient

from feedback.models import Membership, TrainingRun
from feedback.selectors.preferences import PreferenceExportOptions, preference_rows
from feedback.services.training_runs import (
    TrainingRunError,
    run_dir,
    training_run_execute,
    training_run_start,
)
from tests.factories import (
    CompletionFactory,
    MembershipFactory,
    ModelVersionFactory,
    ProjectFactory,
    PromptFactory,
    RoundFactory,
    UserFactory,
)
from tests.feedback.export_helpers import rank
from tests.feedback.test_training_runs import SMALL

pytestmark = pytest.mark.django_db


@pytest.fixture
def project(tiny_model_dir):
    """Ten prompts ranked in round 1 (by base); the first six again in round 2 (by v1), one answer the same text."""
    project = ProjectFactory(
        slug="loop", completions_per_prompt=2, base_model=str(tiny_model_dir), training_config=SMALL
    )
    v1 = ModelVersionFactory(project=project, name="v1")
    ann = UserFactory()
    one = RoundFactory(project=project, number=1)
    two = RoundFactory(project=project, number=2, writers=["v1"])
    for i in range(10):
        prompt = PromptFactory(project=project, messages=[{"role": "user", "content": f"Question {i}: cats?"}])
        good, bad = (CompletionFactory(prompt=prompt, round=one, text=text) for text in ("Cats are great.", "No."))
        rank(ann, prompt, [[good], [bad]], round=one)
        if i < 6:
            same = CompletionFactory(
                prompt=prompt, round=two, model_version=v1, source_model="", text="Cats are great."
            )
            new = CompletionFactory(prompt=prompt, round=two, model_version=v1, source_model="", text=f"Cats purr {i}.")
            rank(ann, prompt, [[new], [same]], round=two)
    return project


def snapshot(run):
    rows = []
    for name in ("train.jsonl", "held_out.jsonl"):
        rows += [json.loads(line) for line in (run_dir(run) / name).read_text().splitlines()]
    return sorted(rows, key=lambda row: (row["prompt_id"], row["round"]))


def test_a_run_limited_to_round_2_trains_only_on_round_2_rows(project):
    run = training_run_start(project=project, algorithm="dpo", limits={"rounds": [2]}, enqueue=False)

    rows = snapshot(run)
    assert [row["round"] for row in rows] == [2] * 6
    assert {row["chosen"] for row in rows} == {f"Cats purr {i}." for i in range(6)}
    every_round_2_row = preference_rows(project=project, options=PreferenceExportOptions(rounds=(2,)))
    assert rows == sorted(every_round_2_row, key=lambda row: row["prompt_id"])
    counts = run.data_counts
    assert (counts["train"] + counts["held_out"], counts["limits"]) == (6, {"rounds": [2]})
    run = training_run_execute(run_id=run.pk)
    assert run.status == TrainingRun.Status.SUCCEEDED, run.error


@pytest.mark.parametrize(
    ("limits", "rounds"),
    [
        ({}, [1] * 10 + [2] * 6),
        ({"rounds": [1, 2]}, [1] * 10 + [2] * 6),
        ({"since_round": 2}, [2] * 6),
        ({"writers": ["base"]}, [1] * 10),
        ({"writers": ["v1"]}, [2] * 6),
        ({"writers": ["v1", "base"], "since_round": 1}, [1] * 10 + [2] * 6),
    ],
)
def test_snapshots_take_every_round_unless_limited(project, limits, rounds):
    run = training_run_start(project=project, limits=limits, enqueue=False)
    assert sorted(row["round"] for row in snapshot(run)) == rounds
    assert run.data_counts.get("limits", {}) == limits


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        ({"rounds": [0]}, "rounds: must be round numbers, 1 or more"),
        ({"since_round": 0}, "since_round: must be a round number, 1 or more"),
        ({"writers": ["v1", "v9"]}, "writers: loop has no version 'v9'"),
        ({"rounds": "2"}, "rounds: must be a list of ids"),
        ({"split": "test"}, "split does not limit a snapshot; use rounds, since_round, writers"),
        ({"rounds": [7]}, "no pairs to train on yet: collect more judgements first"),
    ],
)
def test_bad_limits_are_refused_and_start_nothing(project, limits, message):
    with pytest.raises(TrainingRunError) as raised:
        training_run_start(project=project, limits=limits, enqueue=False)
    assert str(raised.value) == message
    assert not TrainingRun.objects.exists()


def test_the_command_limits_the_snapshot(project, capsys):
    call_command("train", "loop", "--rounds", "2", "--writers", "v1, base")
    run = TrainingRun.objects.get()
    assert run.status == "queued" and run.data_counts["limits"] == {"rounds": [2], "writers": ["v1", "base"]}
    assert [row["round"] for row in snapshot(run)] == [2] * 6
    run.delete()
    call_command("train", "loop", "--since-round", "2")
    assert TrainingRun.objects.get().data_counts["limits"] == {"since_round": 2}
    TrainingRun.objects.all().delete()
    for args, message in [
        (["--rounds", "2,x"], "expected round numbers separated by commas, like 2,3; not '2,x'"),
        (["--rounds", "0"], "rounds: must be round numbers, 1 or more"),
        (["--since-round", "0"], "since_round: must be a round number, 1 or more"),
        (["--writers", "v9"], "writers: loop has no version 'v9'"),
    ]:
        with pytest.raises(CommandError, match=message):
            call_command("train", "loop", *args)
    assert not TrainingRun.objects.exists()


def test_the_api_limits_the_snapshot(project):
    client = APIClient()
    client.force_authenticate(MembershipFactory(project=project, role=Membership.Role.MANAGER).user)
    url = "/api/v1/projects/loop/training-runs/"
    for body, answer in [
        ({"rounds": [0]}, {"rounds": {"0": ["Ensure this value is greater than or equal to 1."]}}),
        ({"since_round": 0}, {"since_round": ["Ensure this value is greater than or equal to 1."]}),
        ({"writers": ["v9"]}, {"detail": "writers: loop has no version 'v9'"}),
    ]:
        response = client.post(url, body, format="json")
        assert (response.status_code, response.json()) == (400, answer)
    assert not TrainingRun.objects.exists()

    response = client.post(url, {"rounds": [2], "writers": ["v1"]}, format="json")
    assert response.status_code == 201, response.content
    assert response.json()["data_counts"]["limits"] == {"rounds": [2], "writers": ["v1"]}
    assert [row["round"] for row in snapshot(TrainingRun.objects.get())] == [2] * 6


def test_the_reference_cache_hits_across_rounds(project):
    first = training_run_execute(
        run_id=training_run_start(project=project, algorithm="dpo", limits={"rounds": [1]}, enqueue=False).pk
    )
    assert first.status == "succeeded", first.error
    assert (
        first.produced_version.metrics["reference_computed"],
        first.produced_version.metrics["reference_cached"],
    ) == (
        20,
        0,
    )

    # Same reference (the base model: nothing was promoted). Round 2's "Cats are great." answers are other
    # completions, of another round, but the same sequences as round 1's: cached. Its new answers are computed.
    second = training_run_execute(
        run_id=training_run_start(project=project, algorithm="dpo", limits={"rounds": [2]}, enqueue=False).pk
    )
    assert second.status == "succeeded", second.error
    assert second.parent_version is None and first.parent_version is None
    metrics = second.produced_version.metrics
    assert (metrics["reference_computed"], metrics["reference_cached"]) == (6, 6)
