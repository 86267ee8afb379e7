"""Battles: asking for one (service, API, command, page), writing and serving it, the leaderboard, export, gate."""

import io
import json
import shutil
import uuid

import pytest
from django.core.exceptions import ValidationError
from django.core.management import CommandError, call_command
from django.test import Client
from django.urls import reverse
from rest_framework.test import APIClient

from feedback.models import Completion, Membership, ModelVersion, PairwiseJudgement, Project, Round
from feedback.selectors.battles import battle_rows, battle_writer_answers
from feedback.selectors.preferences import ExportOptionsError, PreferenceExportOptions, preference_rows
from feedback.services.generation import round_write
from feedback.services.promotion_gate import promotion_gate_check, promotion_gate_open, promotion_gate_tick
from feedback.services.rounds import battle_request, round_request
from feedback.services.training_runs import judgements_since
from tests.factories import (
    CompletionFactory,
    MembershipFactory,
    ModelVersionFactory,
    ProjectFactory,
    PromptFactory,
    UserFactory,
)
from tests.feedback.queue_helpers import lease, submit

pytestmark = pytest.mark.django_db


def _world(tiny_model_dir, settings, *, evaluation_prompts: int = 12, training_prompts: int = 10, **project_fields):
    project = ProjectFactory(
        slug="arena",
        mode="ranking",
        completions_per_prompt=4,
        base_model=str(tiny_model_dir),
        max_new_tokens=4,
        **project_fields,
    )
    for _ in range(training_prompts):
        CompletionFactory.create_batch(4, prompt=PromptFactory(project=project))
    for _ in range(evaluation_prompts):
        PromptFactory(project=project, split="eval")
    shutil.copytree(tiny_model_dir, settings.MODEL_VERSIONS_DIR / "arena" / "v1")
    v1 = ModelVersionFactory(project=project, name="v1", weights_path="arena/v1")
    return project, v1


@pytest.fixture
def arena(tiny_model_dir, settings):
    return _world(tiny_model_dir, settings)


@pytest.fixture
def written(arena):
    """The arena with a battle of v1 against the base model written on its 12 evaluation prompts."""
    project, v1 = arena
    battle = battle_request(project=project, candidate="v1")
    round_write(round_id=battle.pk)
    battle.refresh_from_db()
    return project, v1, battle


def _stored():
    return list(Round.objects.values_list("pk", "kind", "status")), Completion.objects.count()


@pytest.mark.parametrize(
    ("kwargs", "field", "message"),
    [
        ({"candidate": "v9"}, "candidate", "'v9' is not a version of project 'arena'"),
        ({"candidate": "elsewhere"}, "candidate", "'elsewhere' is a version of project 'other', not of 'arena'"),
        ({"candidate": "rm1"}, "candidate", "'rm1' is a reward model: it scores completions and writes none"),
        ({"candidate": "base"}, "candidate", "the base model can only be the opponent"),
        ({"candidate": "v1", "against": "v1"}, "against", "A version cannot battle itself"),
        ({"candidate": "v1", "against": "v9"}, "against", "'v9' is not a version of project 'arena'"),
        ({"candidate": "v1", "prompts": 5}, "prompts", "A battle needs at least 10 evaluation prompts, not 5."),
        (
            {"candidate": "v1", "prompts": 13},
            "prompts",
            "A battle needs 13 evaluation prompts; project 'arena' has 12.",
        ),
    ],
)
def test_a_bad_battle_request_names_the_field_and_writes_nothing(arena, kwargs, field, message):
    project, _ = arena
    ModelVersionFactory(project=ProjectFactory(slug="other"), name="elsewhere")
    ModelVersionFactory(project=project, name="rm1", kind=ModelVersion.Kind.REWARD)
    before = _stored()
    with pytest.raises(ValidationError) as raised:
        battle_request(project=project, **kwargs)
    assert message in " ".join(raised.value.message_dict[field])
    assert _stored() == before


def test_a_project_with_too_few_evaluation_prompts_cannot_battle(tiny_model_dir, settings):
    project, _ = _world(tiny_model_dir, settings, evaluation_prompts=9)
    with pytest.raises(ValidationError) as raised:
        battle_request(project=project, candidate="v1")
    assert raised.value.message_dict["prompts"] == [
        "A battle needs 10 evaluation prompts; project 'arena' has 9. Import prompts with split 'eval', "
        "or mark some for evaluation in the admin."
    ]
    assert not Round.objects.filter(kind=Round.Kind.BATTLE).exists()


def test_a_battle_waits_for_an_open_round_and_an_ordinary_round_for_an_open_battle(arena):
    project, _ = arena
    battle = battle_request(project=project, candidate="v1")
    with pytest.raises(ValidationError) as raised:
        round_request(project=project)
    assert raised.value.message_dict["round"] == [
        f"Round {battle.number} (a battle) is queued; ask for a new round when it has been written."
    ]
    assert Round.objects.get(pk=battle.pk).status == Round.Status.QUEUED  # not replaced by the ordinary request
    again = battle_request(project=project, candidate="v1", prompts=10)  # a queued battle is replaced by a battle
    assert list(Round.objects.filter(kind=Round.Kind.BATTLE).values_list("pk", "prompt_limit")) == [(again.pk, 10)]


def test_a_battle_round_answers_each_evaluation_prompt_once_by_each_writer(written):
    project, v1, battle = written
    assert battle.kind == Round.Kind.BATTLE and battle.status == Round.Status.DONE
    assert battle.writers == ["v1", "base"] and battle.sampling["k"] == 2
    evaluation = set(project.prompts.filter(split="eval").values_list("pk", flat=True))
    assert set(battle.round_prompts.values_list("prompt_id", flat=True)) == evaluation
    for prompt_id in evaluation:
        answers = Completion.objects.filter(round=battle, prompt_id=prompt_id)
        assert sorted((c.model_version_id or 0, c.source_model) for c in answers) == [
            (0, str(project.base_model)),
            (v1.pk, ""),
        ]


def _serve(project, annotator, tasks):
    """Lease and judge ``tasks`` tasks in order; battle pairs get A, rankings the shown order. Returns the kinds."""
    kinds = []
    for _ in range(tasks):
        assignment = lease(project, annotator)
        assert assignment is not None
        if assignment.completion_a_id:
            submit(
                project=project,
                annotator=annotator,
                task_id=assignment.pk,
                client_uuid=uuid.uuid4(),
                kind="pairwise",
                choice="a",
            )
            kinds.append("battle")
        else:
            submit(
                project=project,
                annotator=annotator,
                task_id=assignment.pk,
                client_uuid=uuid.uuid4(),
                kind="ranking",
                ranking=[[c] for c in assignment.display_order],
            )
            kinds.append("ranking")
    return kinds


def test_battle_pairs_come_at_the_projects_share_of_an_annotators_tasks(written):
    project, _, battle = written
    annotator = UserFactory()
    # 20 %: the fifth and the tenth task are battles; the ranking tasks are the project's ordinary items
    assert _serve(project, annotator, 10) == ["ranking"] * 4 + ["battle"] + ["ranking"] * 4 + ["battle"]
    assert PairwiseJudgement.objects.filter(round=battle, annotator=annotator).count() == 2
    assert not PairwiseJudgement.objects.exclude(round=battle).exists()


def test_a_battle_share_of_zero_serves_no_battles(written):
    project, _, _ = written
    Project.objects.filter(pk=project.pk).update(battle_share=0.0)
    project.refresh_from_db()
    annotator = UserFactory()
    assert _serve(project, annotator, 10) == ["ranking"] * 10
    assert lease(project, annotator) is None  # the ordinary items are done; the battle's are not served at all


def test_a_battle_task_is_judged_as_a_pair_even_in_a_ranking_project(written):
    project, _, _ = written
    Project.objects.filter(pk=project.pk).update(battle_share=1.0)
    project.refresh_from_db()
    annotator = MembershipFactory(project=project, role=Membership.Role.ANNOTATOR).user
    task = lease(project, annotator)
    assert task.completion_a_id and task.completion_b_id and task.item_key.startswith("c")
    with pytest.raises(ValidationError) as raised:
        submit(
            project=project,
            annotator=annotator,
            task_id=task.pk,
            client_uuid=uuid.uuid4(),
            kind="ranking",
            ranking=[[task.completion_a_id], [task.completion_b_id]],
        )
    assert raised.value.message_dict["kind"] == [
        "This task is a blind comparison of two answers; send kind 'pairwise'."
    ]
    client = APIClient()
    client.force_authenticate(annotator)
    answer = client.post(
        "/api/v1/projects/arena/judgements/",
        {"task_id": task.pk, "client_uuid": str(uuid.uuid4()), "kind": "pairwise", "choice": "tie"},
        format="json",
    )
    assert answer.status_code == 201 and answer.json()["kind"] == "pairwise"
    assert PairwiseJudgement.objects.get(assignment=task).choice == "tie"


def test_battle_judgements_never_become_training_data(written):
    project, _, battle = written
    Project.objects.filter(pk=project.pk).update(battle_share=0.5)
    project.refresh_from_db()
    annotator = UserFactory()
    kinds = _serve(project, annotator, 6)
    assert kinds.count("battle") == 3
    battle_completions = set(Completion.objects.filter(round=battle).values_list("pk", flat=True))
    for fmt in ("dpo", "grpo", "judgements"):
        for split in (None, "eval"):
            rows = list(preference_rows(project=project, options=PreferenceExportOptions(format=fmt, split=split)))
            named = {c for row in rows for key in ("chosen_id", "rejected_id") if key in row for c in [row[key]]}
            named |= {c for row in rows for c in row.get("completion_ids") or []}
            assert not named & battle_completions
            if split is None and fmt != "judgements":
                assert rows  # the ordinary judgements are there
    assert judgements_since(project=project, since=None) == 3  # the three rankings; battles do not count


def test_the_battles_export_writes_fastchat_battles(written, tmp_path):
    project, v1, battle = written
    Project.objects.filter(pk=project.pk).update(battle_share=1.0)
    project.refresh_from_db()
    annotator = UserFactory()
    _serve(project, annotator, 3)
    out = tmp_path / "battles.jsonl"
    call_command("export_preferences", "arena", "--format", "battles", "--out", str(out), stdout=io.StringIO())
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3
    for row in rows:
        judgement = PairwiseJudgement.objects.get(pk=row["judgement_id"])
        a, b = judgement.left, judgement.right
        assert row["model_a"] == ("v1" if a.model_version_id == v1.pk else "base")
        assert {row["model_a"], row["model_b"]} == {"v1", "base"}
        assert row["winner"] == "model_a"  # every pair was judged A
        assert (row["length_a"], row["length_b"]) == (len(a.text), len(b.text))
        assert row["annotator"] == str(annotator.pk) and row["round"] == battle.number
        assert row["prompt_id"] == judgement.prompt_id


def test_options_that_do_not_apply_to_battles_are_refused(written):
    project, _, _ = written
    with pytest.raises(ExportOptionsError) as raised:
        PreferenceExportOptions(format="battles", conversational=True)
    assert str(raised.value) == "conversational: does not apply to the battles format"
    client = APIClient()
    client.force_authenticate(MembershipFactory(project=project, role=Membership.Role.MANAGER).user)
    answer = client.get("/api/v1/projects/arena/export/?format=battles&split=train")
    assert answer.status_code == 400 and answer.json() == {"split": ["does not apply to the battles format"]}


def _battles(project, battle, *, v1_wins: int, v1_losses: int = 0, ties: int = 0):
    """Judge the battle's pairs through the service: v1's side ``v1_wins`` times, the other side ``v1_losses``."""
    Project.objects.filter(pk=project.pk).update(battle_share=1.0)
    project.refresh_from_db()
    outcomes = ["win"] * v1_wins + ["loss"] * v1_losses + ["tie"] * ties
    annotator = UserFactory()
    for outcome in outcomes:
        task = lease(project, annotator)
        assert task is not None and task.round_id == battle.pk
        a = Completion.objects.get(pk=task.completion_a_id)
        v1_is_a = a.model_version_id is not None
        choice = "tie" if outcome == "tie" else ("a" if (outcome == "win") == v1_is_a else "b")
        submit(
            project=project,
            annotator=annotator,
            task_id=task.pk,
            client_uuid=uuid.uuid4(),
            kind="pairwise",
            choice=choice,
        )


def test_the_leaderboard_ranks_the_writers_by_their_battles(written):
    project, _, battle = written
    _battles(project, battle, v1_wins=8, v1_losses=2, ties=2)
    reviewer = MembershipFactory(project=project, role=Membership.Role.REVIEWER).user
    client = APIClient()
    client.force_authenticate(reviewer)
    board = client.get("/api/v1/projects/arena/leaderboard/").json()
    by_name = {model["name"]: model for model in board["models"]}
    assert [model["name"] for model in board["models"]] == ["v1", "base"]
    assert (by_name["v1"]["wins"], by_name["v1"]["losses"], by_name["v1"]["ties"]) == (8, 2, 2)
    assert (by_name["base"]["wins"], by_name["base"]["losses"], by_name["base"]["battles"]) == (2, 8, 12)
    assert by_name["base"]["score"] == 0.0
    assert by_name["v1"]["score"] == pytest.approx(1.0986, abs=0.01)  # log(9 / 3): ties count half each way
    assert by_name["v1"]["win_rate"] == pytest.approx(9 / 12)
    assert board["matrix"]["v1"]["base"] == pytest.approx(9 / 12)
    annotator = MembershipFactory(project=project, role=Membership.Role.ANNOTATOR).user
    client.force_authenticate(annotator)
    assert client.get("/api/v1/projects/arena/leaderboard/").status_code == 403


def _gated(tiny_model_dir, settings):
    project, v1 = _world(tiny_model_dir, settings, evaluation_prompts=20, promote_when_preferred=True)
    promotion_gate_open(version=v1)
    v1.refresh_from_db()
    battle = Round.objects.get(kind=Round.Kind.BATTLE)
    round_write(round_id=battle.pk)
    return project, v1, battle


def test_the_gate_promotes_once_people_prefer_the_candidate(tiny_model_dir, settings):
    project, v1, battle = _gated(tiny_model_dir, settings)
    assert v1.gate["decision"] == "wait" and v1.gate["against"] == "base" and v1.gate["round"] == battle.number
    _battles(project, battle, v1_wins=16)
    assert promotion_gate_check(project=project) == []
    v1.refresh_from_db()
    assert v1.gate["decision"] == "wait" and v1.gate["wins"] == 16 and not v1.is_active
    # 16 wins: log-likelihood ratio 16 log 1.2 = 2.92 < log 20; the 17th crosses it
    _battles(project, battle, v1_wins=1)
    assert [version.name for version in promotion_gate_check(project=project)] == ["v1"]
    v1.refresh_from_db()
    assert v1.gate["decision"] == "promote" and v1.gate["wins"] == 17 and v1.is_active
    assert "decided_at" in v1.gate


def test_the_gate_rejects_a_candidate_people_do_not_prefer(tiny_model_dir, settings):
    project, v1, battle = _gated(tiny_model_dir, settings)
    _battles(project, battle, v1_wins=0, v1_losses=10, ties=3)
    promotion_gate_check(project=project)
    v1.refresh_from_db()
    assert v1.gate["decision"] == "wait" and (v1.gate["losses"], v1.gate["ties"]) == (10, 3)
    _battles(project, battle, v1_wins=0, v1_losses=1)  # 11 log 0.8 = -2.45 < log(0.1 / 0.95) = -2.25
    promotion_gate_check(project=project)
    v1.refresh_from_db()
    assert v1.gate["decision"] == "reject" and not v1.is_active


def test_a_gate_that_could_not_start_its_battle_says_why_and_starts_it_later(tiny_model_dir, settings):
    project, v1 = _world(tiny_model_dir, settings, evaluation_prompts=4, promote_when_preferred=True)
    promotion_gate_open(version=v1)
    v1.refresh_from_db()
    assert v1.gate["decision"] == "wait"
    assert v1.gate["problem"].startswith("No battle could start: A battle needs 10 evaluation prompts")
    assert not Round.objects.filter(kind=Round.Kind.BATTLE).exists()
    for _ in range(6):
        PromptFactory(project=project, split="eval")
    assert [version.name for version in promotion_gate_tick()] == ["v1"]
    v1.refresh_from_db()
    assert "problem" not in v1.gate and v1.gate["round"] == Round.objects.get(kind=Round.Kind.BATTLE).number


def test_the_api_starts_a_battle_or_names_what_is_wrong(arena):
    project, _ = arena
    client = APIClient()
    client.force_authenticate(MembershipFactory(project=project, role=Membership.Role.MANAGER).user)
    url = "/api/v1/projects/arena/evaluations/"
    wrong = client.post(url, {"candidate": "v9"}, format="json")
    assert wrong.status_code == 400 and wrong.json() == {
        "candidate": ["'v9' is not a version of project 'arena'; use a version name or 'base'."]
    }
    too_few = client.post(url, {"candidate": "v1", "prompts": 3}, format="json")
    assert too_few.status_code == 400 and "prompts" in too_few.json()
    assert not Round.objects.filter(kind=Round.Kind.BATTLE).exists()
    started = client.post(url, {"candidate": "v1", "against": "base", "prompts": 10}, format="json")
    assert started.status_code == 202
    assert (started.json()["kind"], started.json()["writers"], started.json()["prompts"]) == (
        "battle",
        ["v1", "base"],
        10,
    )
    Round.objects.filter(kind=Round.Kind.BATTLE).update(status=Round.Status.RUNNING)
    busy = client.post(url, {"candidate": "v1"}, format="json")
    assert busy.status_code == 409 and busy.json()["detail"].startswith("Round ")


def test_the_evaluate_command_queues_a_battle_or_names_the_option(arena):
    project, _ = arena
    with pytest.raises(CommandError) as raised:
        call_command("evaluate", "arena", "--candidate", "v1", "--against", "v1")
    assert str(raised.value) == "--against: A version cannot battle itself; choose an opponent other than 'v1'."
    with pytest.raises(CommandError) as raised:
        call_command("evaluate", "nowhere", "--candidate", "v1")
    assert str(raised.value) == "no project 'nowhere'"
    out = io.StringIO()
    call_command("evaluate", "arena", "--candidate", "v1", stdout=out)
    battle = Round.objects.get(kind=Round.Kind.BATTLE)
    assert out.getvalue().startswith(f"Queued battle round {battle.number} of 'arena': v1 against base;")


def test_the_evaluate_command_writes_the_battle_with_sync(arena):
    project, _ = arena
    out = io.StringIO()
    call_command("evaluate", "arena", "--candidate", "v1", "--prompts", "10", "--sync", stdout=out)
    battle = Round.objects.get(kind=Round.Kind.BATTLE)
    assert battle.status == Round.Status.DONE and Completion.objects.filter(round=battle).count() == 20
    assert "Battle v1 against base is ready for annotators" in out.getvalue()


def test_the_models_page_shows_the_leaderboard_and_the_gate_and_starts_battles(tiny_model_dir, settings):
    project, v1, battle = _gated(tiny_model_dir, settings)
    _battles(project, battle, v1_wins=17)
    promotion_gate_check(project=project)
    manager = MembershipFactory(project=project, role=Membership.Role.MANAGER).user
    client = Client()
    client.force_login(manager)
    page = client.get(reverse("models", args=["arena"])).content.decode()
    assert '<tr data-model="v1">' in page and '<tr data-model="base">' in page
    assert '<td class="decision">promote</td>' in page
    bad = client.post(reverse("models-evaluate", args=["arena"]), {"candidate": "v1", "against": "v1"})
    assert bad.status_code == 400 and "A version cannot battle itself" in bad.content.decode()
    Round.objects.update(status=Round.Status.DONE)  # the battle, and the round v1's promotion queued
    ModelVersionFactory(project=project, name="v2", weights_path="arena/v1")
    good = client.post(reverse("models-evaluate", args=["arena"]), {"candidate": "v2", "prompts": "10"})
    assert good.status_code == 302
    assert Round.objects.filter(kind=Round.Kind.BATTLE).latest("number").writers == ["v2", "v1"]  # v1 is active


def test_the_training_page_names_a_battles_writers_to_managers_only(written):
    project, _, battle = written
    annotator = MembershipFactory(project=project, role=Membership.Role.ANNOTATOR).user
    manager = MembershipFactory(project=project, role=Membership.Role.MANAGER).user
    client = Client()
    for user, shown in [(annotator, "<td>a blind battle</td>"), (manager, "<td>v1 + base (battle)</td>")]:
        client.force_login(user)
        rounds = client.get(reverse("training-rounds", args=["arena"])).content.decode()
        assert shown in rounds
        assert ("v1 + base" in rounds) == (user == manager)


def test_each_writers_answers_are_measured_for_the_models_page(written):
    project, v1, battle = written
    v1_answers = Completion.objects.filter(round=battle, model_version=v1).order_by("pk")
    Completion.objects.filter(pk=v1_answers[0].pk).update(text="I'm sorry, but I can't help with that.")
    Completion.objects.filter(pk=v1_answers[1].pk).update(text="As an AI, I cannot say.")
    Completion.objects.filter(round=battle, model_version=None).update(text="x" * 30)
    Project.objects.filter(pk=project.pk).update(battle_share=1.0)
    project.refresh_from_db()
    annotator = UserFactory()
    for judged in range(4):
        task = lease(project, annotator)
        submit(
            project=project,
            annotator=annotator,
            task_id=task.pk,
            client_uuid=uuid.uuid4(),
            kind="pairwise",
            choice="both_bad" if not judged else "a",
        )
    figures = battle_writer_answers(project=project, rows=list(battle_rows(project=project)))
    assert (figures["v1"].answers, figures["base"].answers) == (12, 12)
    assert figures["v1"].refusal_rate == pytest.approx(2 / 12) and figures["base"].refusal_rate == 0.0
    assert figures["base"].mean_length == 30.0
    assert (figures["v1"].battles, figures["v1"].both_bad_rate) == (4, 0.25)


@pytest.mark.django_db(transaction=True)
def test_with_the_gate_on_a_runs_version_battles_instead_of_being_promoted(tiny_model_dir):
    from feedback.services.training_runs import training_run_execute, training_run_start
    from tests.feedback.test_training_runs import SMALL, judge_everything

    project = ProjectFactory(
        slug="gated",
        mode="pairwise",
        completions_per_prompt=2,
        base_model=str(tiny_model_dir),
        training_config={**SMALL, "learning_rate": 1e-3},
        auto_promote=True,  # the gate replaces its rule
        promote_when_preferred=True,
    )
    for _ in range(10):
        PromptFactory(project=project, split="eval")
    judge_everything(project, UserFactory())
    run = training_run_execute(run_id=training_run_start(project=project, algorithm="dpo", enqueue=False).pk)
    assert run.status == "succeeded", run.error
    version = run.produced_version
    assert not version.is_active
    battle = Round.objects.get(project=project, kind=Round.Kind.BATTLE)
    assert battle.writers == [version.name, "base"]
    # queued on commit, and the test's queue runs tasks at once: the battle is written
    assert battle.status == Round.Status.DONE and Completion.objects.filter(round=battle).count() == 20
    assert version.gate["decision"] == "wait" and version.gate["round"] == battle.number
