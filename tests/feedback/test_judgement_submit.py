import uuid

import pytest
from django.core.exceptions import ValidationError

from feedback.models import Assignment, PairwiseJudgement, RankedCompletion, RankingJudgement, RoundPrompt
from feedback.services.assignments import assignment_skip
from feedback.services.judgements import judgement_ranking
from tests.factories import CompletionFactory, ProjectFactory, PromptFactory, UserFactory
from tests.feedback.queue_helpers import lease, submit

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _fast_password_hashing(settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


def leased(mode: str, k: int = 4):
    project = ProjectFactory(mode=mode, completions_per_prompt=k)
    CompletionFactory.create_batch(k, prompt=PromptFactory(project=project))
    annotator = UserFactory()
    return project, annotator, lease(project, annotator)


def errors_of(excinfo) -> dict[str, list[str]]:
    return excinfo.value.message_dict


def nothing_stored():
    return (
        not PairwiseJudgement.objects.exists()
        and not RankingJudgement.objects.exists()
        and not RankedCompletion.objects.exists()
        and not Assignment.objects.filter(state="done").exists()
        and set(RoundPrompt.objects.values_list("judgement_count", flat=True)) <= {0}
    )


def test_a_ranking_with_ties_is_stored_with_shared_ranks_and_shown_positions():
    project, annotator, assignment = leased("ranking")
    a, b, c, d = assignment.display_order
    result = submit(
        project=project,
        annotator=annotator,
        task_id=assignment.pk,
        client_uuid=uuid.uuid4(),
        kind="ranking",
        ranking=[[c], [a, d], [b]],
        rationale="  c is the only correct one  ",
        time_ms=5400,
    )
    assert result.created
    judgement = result.judgement
    assert judgement.rationale == "c is the only correct one" and judgement.time_ms == 5400
    assert {(r.completion_id, r.rank, r.position) for r in judgement.ranked.all()} == {
        (c, 1, 2),
        (a, 2, 0),
        (d, 2, 3),
        (b, 3, 1),
    }
    assert judgement_ranking(judgement=judgement) == [[c], [a, d], [b]]
    assignment.refresh_from_db()
    assert assignment.state == "done" and assignment.finished_at is not None
    assert judgement.assignment == assignment
    assert RoundPrompt.objects.get().judgement_count == 1


def test_a_pairwise_choice_is_stored_against_the_completions_as_shown():
    project, annotator, assignment = leased("pairwise", k=2)
    result = submit(
        project=project,
        annotator=annotator,
        task_id=assignment.pk,
        client_uuid=uuid.uuid4(),
        kind="pairwise",
        choice="b",
        strength="clear",
    )
    judgement = result.judgement
    assert (judgement.left_id, judgement.right_id) == tuple(assignment.display_order)
    assert (judgement.choice, judgement.strength, judgement.item_key) == ("b", "clear", assignment.item_key)


def test_a_repeated_client_uuid_returns_the_first_judgement_and_stores_nothing_new():
    project, annotator, assignment = leased("pairwise", k=2)
    client_uuid = uuid.uuid4()
    first = submit(
        project=project,
        annotator=annotator,
        task_id=assignment.pk,
        client_uuid=client_uuid,
        kind="pairwise",
        choice="a",
    )
    again = submit(
        project=project,
        annotator=annotator,
        task_id=assignment.pk,
        client_uuid=client_uuid,
        kind="pairwise",
        choice="b",
    )
    assert first.created and not again.created
    assert again.judgement.pk == first.judgement.pk and again.judgement.choice == "a"
    assert PairwiseJudgement.objects.count() == 1 and RoundPrompt.objects.get().judgement_count == 1


def test_a_client_uuid_used_for_another_task_is_refused():
    project, annotator, assignment = leased("pairwise", k=3)
    client_uuid = uuid.uuid4()
    submit(
        project=project,
        annotator=annotator,
        task_id=assignment.pk,
        client_uuid=client_uuid,
        kind="pairwise",
        choice="a",
    )
    other = lease(project, annotator)
    with pytest.raises(ValidationError) as excinfo:
        submit(
            project=project, annotator=annotator, task_id=other.pk, client_uuid=client_uuid, kind="pairwise", choice="a"
        )
    assert "client_uuid" in errors_of(excinfo)
    assert PairwiseJudgement.objects.count() == 1


@pytest.mark.parametrize(
    ("ranking", "message"),
    [
        ("none", "Rank the completions"),
        ("no-groups", "Rank the completions"),
        ("first-three", "appear more than once"),
        ("missing-one", "are missing"),
        ("unknown", "are not part of this task"),
        ("empty-group", "empty"),
    ],
)
def test_a_ranking_must_cover_the_tasks_completions_exactly_once(ranking, message):
    project, annotator, assignment = leased("ranking")
    a, b, c, d = assignment.display_order
    rankings = {
        "none": None,
        "no-groups": [],
        "first-three": [[a], [b, a], [c]],
        "missing-one": [[a], [b], [c]],
        "unknown": [[a], [b], [c, CompletionFactory().pk]],
        "empty-group": [[a], [], [b, c, d]],
    }
    with pytest.raises(ValidationError) as excinfo:
        submit(
            project=project,
            annotator=annotator,
            task_id=assignment.pk,
            client_uuid=uuid.uuid4(),
            kind="ranking",
            ranking=rankings[ranking],
        )
    assert message in errors_of(excinfo)["ranking"][0]
    assert nothing_stored()


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"choice": ""}, "choice"),
        ({"choice": "maybe"}, "choice"),
        ({"choice": "a", "strength": "very"}, "strength"),
        ({"choice": "a", "ranking": [[1], [2]]}, "ranking"),
        ({"choice": "a", "rationale": "x" * 5001}, "rationale"),
        ({"choice": "a", "time_ms": -1}, "time_ms"),
        ({"choice": "a", "kind": "ranking"}, "kind"),
    ],
)
def test_an_invalid_pairwise_submission_names_its_field_and_stores_nothing(fields, field):
    project, annotator, assignment = leased("pairwise", k=2)
    arguments = {"kind": "pairwise"} | fields
    with pytest.raises(ValidationError) as excinfo:
        submit(project=project, annotator=annotator, task_id=assignment.pk, client_uuid=uuid.uuid4(), **arguments)
    assert field in errors_of(excinfo)
    assert nothing_stored()


def test_the_task_must_be_leased_to_the_annotator():
    project, annotator, assignment = leased("pairwise", k=2)
    with pytest.raises(ValidationError) as excinfo:
        submit(
            project=project,
            annotator=UserFactory(),
            task_id=assignment.pk,
            client_uuid=uuid.uuid4(),
            kind="pairwise",
            choice="a",
        )
    assert "someone else" in errors_of(excinfo)["task_id"][0]
    with pytest.raises(ValidationError) as excinfo:
        submit(
            project=project,
            annotator=annotator,
            task_id=assignment.pk + 999,
            client_uuid=uuid.uuid4(),
            kind="pairwise",
            choice="a",
        )
    assert "no such task" in errors_of(excinfo)["task_id"][0]
    assert nothing_stored()


def test_a_task_of_another_project_is_not_found():
    project, annotator, assignment = leased("pairwise", k=2)
    other = ProjectFactory(mode="pairwise")
    with pytest.raises(ValidationError) as excinfo:
        submit(
            project=other,
            annotator=annotator,
            task_id=assignment.pk,
            client_uuid=uuid.uuid4(),
            kind="pairwise",
            choice="a",
        )
    assert "task_id" in errors_of(excinfo)


def test_a_judged_or_skipped_task_cannot_be_judged_again():
    project, annotator, assignment = leased("pairwise", k=3)
    submit(
        project=project,
        annotator=annotator,
        task_id=assignment.pk,
        client_uuid=uuid.uuid4(),
        kind="pairwise",
        choice="a",
    )
    with pytest.raises(ValidationError, match="already judged"):
        submit(
            project=project,
            annotator=annotator,
            task_id=assignment.pk,
            client_uuid=uuid.uuid4(),
            kind="pairwise",
            choice="b",
        )
    second = lease(project, annotator)
    assignment_skip(project=project, annotator=annotator, task_id=second.pk)
    with pytest.raises(ValidationError, match="skipped"):
        submit(
            project=project,
            annotator=annotator,
            task_id=second.pk,
            client_uuid=uuid.uuid4(),
            kind="pairwise",
            choice="b",
        )
    assert PairwiseJudgement.objects.count() == 1


def test_skipping_a_judged_task_or_someone_elses_is_refused():
    project, annotator, assignment = leased("pairwise", k=3)
    with pytest.raises(ValidationError, match="not leased to you"):
        assignment_skip(project=project, annotator=UserFactory(), task_id=assignment.pk)
    submit(
        project=project,
        annotator=annotator,
        task_id=assignment.pk,
        client_uuid=uuid.uuid4(),
        kind="pairwise",
        choice="a",
    )
    with pytest.raises(ValidationError, match="already judged"):
        assignment_skip(project=project, annotator=annotator, task_id=assignment.pk)
    with pytest.raises(ValidationError) as excinfo:
        assignment_skip(
            project=project,
            annotator=annotator,
            task_id=lease(project, annotator).pk,
            reason="r" * 501,
        )
    assert "reason" in errors_of(excinfo)


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ("one-group", "The ranking names 32000 completions; this task has 4."),
        ("many-groups", "The ranking has 32000 groups; this task has 4 completions."),
        ("one-too-many", "The ranking names 5 completions; this task has 4."),
    ],
)
def test_a_ranking_longer_than_the_task_is_refused_by_its_length(shape, message):
    project, annotator, assignment = leased("ranking")
    a, b, c, d = assignment.display_order
    rankings = {
        "one-group": [list(range(1, 32_001))],
        "many-groups": [[n] for n in range(1, 32_001)],
        "one-too-many": [[a], [b], [c], [d, a]],
    }
    with pytest.raises(ValidationError) as excinfo:
        submit(
            project=project,
            annotator=annotator,
            task_id=assignment.pk,
            client_uuid=uuid.uuid4(),
            kind="ranking",
            ranking=rankings[shape],
        )
    assert errors_of(excinfo) == {"ranking": [message]}
    assert nothing_stored()
