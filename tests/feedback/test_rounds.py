"""Rounds: asking for one (service, API, command, page), writing it, resuming it, and serving its items."""

import io
import shutil
import threading
import time

import pytest
from django.contrib.auth.models import User
from django.core.cache import cache
from django.core.exceptions import ValidationError
from django.core.management import CommandError, call_command
from django.db import connection
from django.test import Client
from huey.contrib.djhuey import HUEY
from rest_framework.test import APIClient

from feedback.models import Assignment, Completion, Membership, Project, RankingJudgement, Round, RoundPrompt
from feedback.selectors.tasks import judgements_left
from feedback.services.generation import prompts_by_uncertainty, round_write
from feedback.services.model_versions import model_version_promote
from feedback.services.rounds import round_request
from tests.factories import (
    CompletionFactory,
    MembershipFactory,
    ModelVersionFactory,
    ProjectFactory,
    PromptFactory,
    RoundFactory,
    UserFactory,
)
from tests.feedback.export_helpers import compare, rank
from tests.feedback.queue_helpers import judge, lease, work_until_done

pytestmark = pytest.mark.django_db


@pytest.fixture
def project(tiny_model_dir):
    """Three prompts with K=2 completions each in round 1, every item judged once."""
    project = ProjectFactory(slug="loop", base_model=str(tiny_model_dir), completions_per_prompt=2, max_new_tokens=4)
    for _ in range(3):
        CompletionFactory.create_batch(2, prompt=PromptFactory(project=project))
    work_until_done(project, UserFactory(username="ann"))
    return project


@pytest.fixture
def v1(project, tiny_model_dir, settings):
    shutil.copytree(tiny_model_dir, settings.MODEL_VERSIONS_DIR / "loop" / "v1")
    return ModelVersionFactory(project=project, name="v1", weights_path="loop/v1", is_active=True)


def stored():
    return (
        list(Round.objects.values_list("pk", "status")),
        Completion.objects.count(),
        RoundPrompt.objects.count(),
        Assignment.objects.count(),
    )


def test_a_round_on_a_judged_project_writes_k_new_completions_per_prompt_and_new_tasks(project, v1):
    ann = project.assignments.first().annotator
    assert judgements_left(project=project) == 0 and lease(project, ann) is None

    second = round_request(project=project, prompts=2, writers=["v1", "base"])
    result = round_write(round_id=second.pk)

    second.refresh_from_db()
    assert (second.number, second.status, second.prompts_total, second.prompts_written) == (2, "done", 2, 2)
    assert second.started_at is not None and second.finished_at >= second.started_at
    first_two = list(project.prompts.order_by("pk").values_list("pk", flat=True)[:2])
    assert second.prompt_ids == first_two  # every prompt's latest round is round 1: oldest first by id
    assert (result.prompts, result.completions) == (2, 4)
    written = Completion.objects.filter(round=second)
    assert len(written) == 4  # K = 2 for each prompt, one from each writer
    assert {(c.prompt_id, c.model_version_id, c.source_model) for c in written} == {
        *((pk, v1.pk, "") for pk in first_two),
        *((pk, None, str(project.base_model)) for pk in first_two),
    }
    assert judgements_left(project=project) == 2

    # the same annotator judges the same prompts again, newest round first, one round per task
    again = [lease(project, ann), None]
    judge(project, ann, again[0])
    again[1] = lease(project, ann)
    judge(project, ann, again[1])
    assert lease(project, ann) is None
    for assignment in again:
        assert assignment.round == second and assignment.item_key == f"p{assignment.prompt_id}-r{second.pk}"
        assert set(Completion.objects.filter(pk__in=assignment.display_order).values_list("round", flat=True)) == {
            second.pk
        }
    per_round = RankingJudgement.objects.filter(annotator=ann).values_list("prompt_id", "round__number")
    every_prompt = project.prompts.values_list("pk", flat=True)
    assert sorted(per_round) == sorted([(pk, 1) for pk in every_prompt] + [(pk, 2) for pk in first_two])


def test_the_newest_round_is_served_before_an_older_one_with_items_left(project):
    Project.objects.filter(pk=project.pk).update(overlap=2)  # round 1's items each have a slot left
    project.refresh_from_db()
    newcomer = UserFactory()
    older = project.rounds.get()
    newer = RoundFactory(project=project, number=2)
    prompt = project.prompts.last()
    CompletionFactory.create_batch(2, prompt=prompt, round=newer)
    assignment = lease(project, newcomer)
    assert (assignment.round, assignment.prompt) == (newer, prompt)
    assert lease(project, newcomer, exclude_ids=[assignment.pk]).round == older


@pytest.mark.parametrize(
    ("fields", "field", "message"),
    [
        ({"prompts": 0}, "prompts", "The number of prompts must be at least 1, not 0."),
        ({"strategy": "loudest_first"}, "strategy", "'loudest_first' is not a strategy; use one of "),
        ({"writers": ["v9"]}, "versions", "'v9' is not a version of project 'loop'; use a version name or 'base'."),
        ({"writers": ["elsewhere"]}, "versions", "'elsewhere' is a version of project 'other', not of 'loop'."),
        ({"writers": []}, "versions", "Name at least one writer"),
        ({"writers": ["base", "base"]}, "versions", "Each writer is named once; base appear"),
        ({"strategy": "uncertain_first"}, "strategy", "uncertain_first orders prompts by the active version's"),
    ],
)
def test_bad_requests_name_the_field_and_write_nothing(project, fields, field, message):
    ModelVersionFactory(project=ProjectFactory(slug="other"), name="elsewhere")
    before = stored()
    with pytest.raises(ValidationError) as raised:
        round_request(project=project, **fields)
    assert list(raised.value.message_dict) == [field]
    assert raised.value.message_dict[field][0].startswith(message)
    assert stored() == before


def test_a_queued_round_is_replaced_and_a_running_one_refuses(project, v1):
    queued = round_request(project=project, writers=["base"])
    newer = round_request(project=project, prompts=1)
    assert not Round.objects.filter(pk=queued.pk).exists()
    assert (newer.number, newer.writers, newer.prompt_limit) == (2, ["v1"], 1)  # it takes the number over
    Round.objects.filter(pk=newer.pk).update(status=Round.Status.RUNNING, prompts_total=1)
    before = stored()
    with pytest.raises(ValidationError) as raised:
        round_request(project=project)
    assert raised.value.message_dict == {
        "round": ["Round 2 is being written (0 of 1 prompts); ask for a new round when it has finished."]
    }
    assert stored() == before


@pytest.mark.django_db(transaction=True)
def test_two_concurrent_requests_make_one_round(tiny_model_dir):
    project = ProjectFactory(base_model=str(tiny_model_dir))
    PromptFactory(project=project)
    barrier = threading.Barrier(2)
    outcomes = []

    def ask() -> None:
        barrier.wait()
        try:
            outcomes.append(round_request(project=project).number)
        except ValidationError as error:
            outcomes.append(error.message_dict["round"][0])
        finally:
            connection.close()

    threads = [threading.Thread(target=ask) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(outcomes) == 2
    assert Round.objects.filter(project=project).count() == 1
    assert Round.objects.get(project=project).status == Round.Status.QUEUED


def test_a_round_killed_mid_way_resumes_from_what_it_committed_without_duplicates(project, monkeypatch):
    from training import generate

    for _ in range(3):
        PromptFactory(project=project)
    second = round_request(project=project, writers=["base"])
    real = generate.generate_completions
    calls = {"n": 0}

    def dies_on_the_third_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # the worker is killed: nothing of this batch is committed
        return real(*args, **kwargs)

    monkeypatch.setattr(generate, "generate_completions", dies_on_the_third_batch)
    with pytest.raises(KeyboardInterrupt):
        round_write(round_id=second.pk, batch_size=2)
    second.refresh_from_db()
    assert (second.status, second.prompts_total, second.prompts_written) == ("running", 6, 4)
    assert Completion.objects.filter(round=second).count() == 8
    chosen = list(second.prompt_ids)

    monkeypatch.setattr(generate, "generate_completions", real)
    result = round_write(round_id=second.pk, batch_size=2)

    second.refresh_from_db()
    assert (second.status, second.prompt_ids, second.prompts_written, result.prompts) == ("done", chosen, 6, 2)
    per_prompt = Completion.objects.filter(round=second).values_list("prompt_id", flat=True)
    assert sorted(per_prompt) == sorted(chosen * 2)
    assert RoundPrompt.objects.filter(round=second).count() == 6
    assert round_write(round_id=second.pk).prompts == 0  # a finished round is not written twice


def test_oldest_round_first_takes_never_answered_prompts_then_the_oldest_latest_round(project):
    fresh = PromptFactory(project=project)
    first, middle, last = project.prompts.exclude(pk=fresh.pk).order_by("pk")
    newer = RoundFactory(project=project, number=2)
    CompletionFactory.create_batch(2, prompt=first, round=newer)
    request = round_request(project=project, prompts=3, writers=["base"])
    round_write(round_id=request.pk)
    request.refresh_from_db()
    assert request.prompt_ids == [fresh.pk, middle.pk, last.pk]


def test_unjudged_first_takes_the_prompts_with_fewest_judgements(project):
    first, middle, last = project.prompts.order_by("pk")  # each judged once in round 1
    RoundPrompt.objects.filter(prompt=middle).update(judgement_count=5)
    RoundPrompt.objects.filter(prompt=first).update(judgement_count=3)
    request = round_request(project=project, prompts=2, strategy="unjudged_first", writers=["base"])
    round_write(round_id=request.pk)
    request.refresh_from_db()
    assert request.prompt_ids == [last.pk, first.pk]


def test_uncertain_first_orders_by_the_models_margin_on_the_latest_judged_round(monkeypatch):
    project = ProjectFactory(completions_per_prompt=2, mode=Project.Mode.RANKING)
    ann, bea = UserFactory.create_batch(2)
    prompts = {}
    logps = {}
    # name -> (log-prob of the preferred completion, log-prob of the rejected one)
    cases = {"sure": (-1.0, -9.0), "unsure": (-4.0, -4.5), "disagrees": (-8.0, -2.0)}
    for name, (good, bad) in cases.items():
        prompt = PromptFactory(project=project)
        best, worst = (CompletionFactory(prompt=prompt, text=f"{name} {side}") for side in ("best", "worst"))
        logps |= {best.text: good, worst.text: bad}
        rank(ann, prompt, [[best], [worst]])
        prompts[name] = prompt
    # an older round where the model was very unsure of "sure" no longer counts: its latest judged round does
    older_only = PromptFactory(project=project)
    a, b = (CompletionFactory(prompt=older_only, text=f"old {n}") for n in range(2))
    logps |= {a.text: -3.0, b.text: -3.0}
    rank(bea, older_only, [[a, b]])  # a tie gives no pair
    never = PromptFactory(project=project)
    second = RoundFactory(project=project, number=2)
    again = [CompletionFactory(prompt=prompts["sure"], round=second, text=f"sure again {n}") for n in range(2)]
    logps |= {again[0].text: -2.0, again[1].text: -2.5}
    rank(bea, prompts["sure"], [[again[0]], [again[1]]], round=second)

    def fake_logps(model, tokenizer, examples, **kwargs):
        assert model == "the active model"
        return [logps[text] for _, text in examples]

    monkeypatch.setattr("training.logprobs.completion_logprob_sums", fake_logps)
    order = prompts_by_uncertainty(project=project, limit=None, model="the active model", tokenizer=None)
    # disagrees: -6; sure (round 2 only): +0.5; unsure: +0.5, the lower id first; then the prompts without a
    # pair, by oldest_round_first: the one no round has answered, then the one only tied in round 1
    assert order == [prompts["disagrees"].pk, prompts["sure"].pk, prompts["unsure"].pk, never.pk, older_only.pk]
    assert prompts_by_uncertainty(project=project, limit=2, model="the active model", tokenizer=None) == order[:2]


def test_pairwise_votes_enter_the_margin_and_ties_do_not(monkeypatch):
    project = ProjectFactory(completions_per_prompt=3, mode=Project.Mode.PAIRWISE)
    ann = UserFactory()
    prompt = PromptFactory(project=project)
    x, y, z = (CompletionFactory(prompt=prompt, text=t) for t in "xyz")
    compare(ann, x, y, "b")  # y over x
    compare(ann, x, z, "tie")
    other = PromptFactory(project=project)
    p, q = (CompletionFactory(prompt=other, text=t) for t in "pq")
    compare(ann, p, q, "a")  # p over q
    logps = {"x": -1.0, "y": -3.0, "z": -9.0, "p": -1.0, "q": -1.5}
    monkeypatch.setattr(
        "training.logprobs.completion_logprob_sums", lambda m, t, examples, **k: [logps[s] for _, s in examples]
    )
    assert prompts_by_uncertainty(project=project, limit=None, model=None, tokenizer=None) == [prompt.pk, other.pk]


def test_a_promotion_queues_a_round_by_the_new_version_and_its_parent_over_the_round_size(
    project, v1, django_capture_on_commit_callbacks, queue
):
    Project.objects.filter(pk=project.pk).update(round_size=2)
    v2 = ModelVersionFactory(project=project, name="v2", parent=v1)
    with django_capture_on_commit_callbacks(execute=True):
        model_version_promote(version=v2)
    asked = Round.objects.get(status=Round.Status.QUEUED)
    assert (asked.writers, asked.prompt_limit, queue.args("round_write_task")) == (["v2", "v1"], 2, [(asked.pk,)])

    Round.objects.filter(pk=asked.pk).update(status=Round.Status.RUNNING)
    with django_capture_on_commit_callbacks(execute=True):
        model_version_promote(version=v1)  # a round is being written: the promotion stands, no round is queued
    assert ModelVersionFactory._meta.model.objects.get(is_active=True) == v1
    assert queue.args("round_write_task") == [(asked.pk,)] and Round.objects.filter(project=project).count() == 2


def api_for(project, role):
    user = MembershipFactory(project=project, role=role).user
    client = APIClient()
    client.force_authenticate(user)
    return client


def test_the_api_asks_for_a_round_and_lists_rounds(project, v1, django_capture_on_commit_callbacks, queue):
    manager = api_for(project, Membership.Role.MANAGER)
    with django_capture_on_commit_callbacks(execute=True):
        response = manager.post(
            "/api/v1/projects/loop/rounds/",
            {"prompts": 2, "strategy": "unjudged_first", "versions": ["v1", "base"]},
            format="json",
        )
    assert response.status_code == 202, response.content
    body = response.json()
    assert {k: body[k] for k in ("number", "writers", "strategy", "prompts", "status", "completions")} == {
        "number": 2,
        "writers": ["v1", "base"],
        "strategy": "unjudged_first",
        "prompts": 2,
        "status": "queued",
        "completions": 0,
    }
    assert queue.args("round_write_task") == [(body["id"],)]
    listed = api_for(project, Membership.Role.ANNOTATOR).get("/api/v1/projects/loop/rounds/").json()
    assert [(r["number"], r["status"], r["completions"], r["judgements"]) for r in listed] == [
        (2, "queued", 0, 0),
        (1, "done", 6, 3),
    ]


@pytest.mark.parametrize(
    ("body", "status", "answer"),
    [
        ({"prompts": 0}, 400, {"prompts": ["Ensure this value is greater than or equal to 1."]}),
        (
            {"versions": ["v7"]},
            400,
            {"versions": ["'v7' is not a version of project 'loop'; use a version name or 'base'."]},
        ),
        ({"strategy": "nope"}, 400, {"strategy": ['"nope" is not a valid choice.']}),
        ({"strategy": "uncertain_first"}, 400, None),
        ({"prompts": "many"}, 400, {"prompts": ["A valid integer is required."]}),
    ],
)
def test_the_api_refuses_bad_input_naming_the_field(project, body, status, answer):
    before = stored()
    response = api_for(project, Membership.Role.MANAGER).post("/api/v1/projects/loop/rounds/", body, format="json")
    assert response.status_code == status
    if answer is not None:
        assert response.json() == answer
    else:
        assert list(response.json()) == ["strategy"]
    assert stored() == before


def test_the_api_answers_409_while_a_round_is_written(project):
    RoundFactory(project=project, number=2, status=Round.Status.RUNNING, prompts_total=3, prompts_written=1)
    response = api_for(project, Membership.Role.MANAGER).post("/api/v1/projects/loop/rounds/", {}, format="json")
    assert response.status_code == 409
    assert response.json() == {
        "detail": "Round 2 is being written (1 of 3 prompts); ask for a new round when it has finished."
    }


def test_the_command_writes_a_round_and_names_the_option_at_fault(project, v1):
    call_command("generate", "loop", "--round", "--prompts", "1", "--versions", "v1", "--sync")
    written = Round.objects.get(number=2)
    assert (written.status, written.writers, Completion.objects.filter(round=written).count()) == ("done", ["v1"], 2)
    call_command("generate", "loop", "--round", "--mix", "--sync")
    mixed = Round.objects.get(number=3)
    assert (mixed.writers, mixed.prompts_total, Completion.objects.filter(round=mixed).count()) == (
        ["v1", "base"],
        3,
        6,
    )
    before = stored()
    for args, message in [
        (["--versions", "v1,nope"], "--versions: 'nope' is not a version of project 'loop'"),
        (["--strategy", "random"], "--strategy: 'random' is not a strategy"),
        (["--prompts", "0"], "--prompts must be at least 1, not 0"),
    ]:
        with pytest.raises(CommandError, match=message):
            call_command("generate", "loop", "--round", *args, "--sync")
    with pytest.raises(CommandError, match="add --round"):
        call_command("generate", "loop", "--strategy", "unjudged_first")
    assert stored() == before


def test_the_training_page_asks_for_a_round_and_lists_rounds_with_progress(
    client, project, django_capture_on_commit_callbacks, queue
):
    manager = MembershipFactory(project=project, role=Membership.Role.MANAGER).user
    client.force_login(manager)
    with django_capture_on_commit_callbacks(execute=True):
        response = client.post("/projects/loop/training/rounds/new/", {"prompts": "2", "versions": "base"}, follow=True)
    page = response.content.decode()
    assert "Round 2 by base is queued." in page
    assert 'id="round-2"' in page and 'hx-trigger="every 2s"' in page  # polls while a round is open
    Round.objects.filter(number=2).update(status=Round.Status.RUNNING, prompts_total=2, prompts_written=1)
    part = client.get("/projects/loop/training/rounds/").content.decode()
    assert '<progress max="2" value="1">50%</progress>' in part
    Round.objects.filter(number=2).update(status=Round.Status.DONE, prompts_written=2)
    assert "every 2s" not in client.get("/projects/loop/training/rounds/").content.decode()

    response = client.post("/projects/loop/training/rounds/new/", {"versions": "v9"}, follow=True)
    assert (
        "Could not ask for a round: versions: &#x27;v9&#x27; is not a version of project" in response.content.decode()
    )
    assert Round.objects.count() == 2


def test_imported_completions_make_a_round_of_their_own(project):
    from feedback.services.prompts import prompts_import_records

    prompts_import_records(
        project=project,
        records=[
            {"prompt": "New one?", "completions": [{"text": "yes", "model": "gpt"}, {"text": "no", "model": "gpt"}]},
            {"prompt": "Bare?"},
        ],
    )
    imported = Round.objects.get(number=2)
    assert (imported.strategy, imported.writers, imported.status, imported.prompts_total) == (
        "imported",
        ["gpt"],
        "done",
        1,
    )
    assert list(RoundPrompt.objects.filter(round=imported).values_list("prompt__messages", flat=True)) == [
        [{"role": "user", "content": "New one?"}]
    ]
    newcomer = UserFactory()
    assert lease(project, newcomer).round == imported


def two_judged_rounds():
    """A ranking project, K=2: round 1 by base on two prompts, round 2 by v1 on the first; each judged once."""
    project = ProjectFactory(slug="exp", completions_per_prompt=2)
    v1 = ModelVersionFactory(project=project, name="v1")
    ann = UserFactory()
    first_prompt, other_prompt = PromptFactory.create_batch(2, project=project)
    one = RoundFactory(project=project, number=1)
    two = RoundFactory(project=project, number=2, writers=["v1"])
    for prompt in (first_prompt, other_prompt):
        a, b = (CompletionFactory(prompt=prompt, round=one, source_model="base-model") for _ in range(2))
        rank(ann, prompt, [[a], [b]], round=one)
    c, d = (CompletionFactory(prompt=first_prompt, round=two, model_version=v1, source_model="") for _ in range(2))
    rank(ann, first_prompt, [[d], [c]], round=two)
    return project, first_prompt


def export(project, **options):
    from feedback.selectors.preferences import PreferenceExportOptions, preference_rows

    return list(preference_rows(project=project, options=PreferenceExportOptions(**options)))


def test_exports_cover_every_round_with_its_number_and_can_be_limited():
    project, first_prompt = two_judged_rounds()
    assert [(r["prompt_id"], r["round"]) for r in export(project)] == [
        (first_prompt.pk, 1),
        (first_prompt.pk, 2),
        (first_prompt.pk + 1, 1),
    ]
    assert [r["round"] for r in export(project, rounds=(2,))] == [2]
    assert [r["round"] for r in export(project, since_round=2)] == [2]
    assert [r["round"] for r in export(project, writers=("v1",))] == [2]
    assert [r["round"] for r in export(project, writers=("base",))] == [1, 1]
    groups = export(project, format="grpo")
    assert [(g["prompt_id"], g["round"], len(g["completion_ids"])) for g in groups] == [
        (first_prompt.pk, 1, 2),
        (first_prompt.pk, 2, 2),
        (first_prompt.pk + 1, 1, 2),
    ]
    assert [r["round"] for r in export(project, format="judgements", rounds=(1,))] == [1, 1]


def test_export_command_limits_rounds_and_names_bad_options(tmp_path):
    project, _ = two_judged_rounds()
    out = tmp_path / "round2.jsonl"
    call_command("export_preferences", "exp", "--format", "dpo", "--rounds", "2", "--out", str(out))
    assert [line.endswith('"round": 2}') for line in out.read_text().splitlines()] == [True]
    for args, message in [
        (["--writers", "v1,v9"], "--writers: exp has no version 'v9'"),
        (["--rounds", "0"], "--rounds: must be round numbers, 1 or more"),
        (["--since-round", "0"], "--since-round: must be a round number, 1 or more"),
    ]:
        with pytest.raises(CommandError, match=message):
            call_command("export_preferences", "exp", "--format", "dpo", *args, "--out", str(tmp_path / "x.jsonl"))
    assert not (tmp_path / "x.jsonl").exists()


def test_a_worker_starting_up_writes_again_the_rounds_a_dead_worker_left_running(project, monkeypatch):
    from feedback.tasks import release_dead_runs_on_startup

    resumed = []
    monkeypatch.setattr("feedback.tasks.round_write_task", resumed.append)  # called directly by the worker
    left = RoundFactory(project=project, number=2, status=Round.Status.RUNNING)
    RoundFactory(project=ProjectFactory(), number=1, status=Round.Status.QUEUED)  # still on the queue
    release_dead_runs_on_startup()
    assert resumed == [left.pk]


def test_the_export_api_limits_rounds(client):
    import json

    project, _ = two_judged_rounds()
    client.force_login(MembershipFactory(project=project, role=Membership.Role.MANAGER).user)
    response = client.get("/api/v1/projects/exp/export/?format=dpo&rounds=2")
    assert response.status_code == 200
    rows = [json.loads(line) for line in b"".join(response.streaming_content).decode().splitlines()]
    assert [row["round"] for row in rows] == [2]
    assert client.get("/api/v1/projects/exp/export/?format=dpo&since_round=0").status_code == 400


def kill_mid_round(project, round, monkeypatch):
    """Write ``round`` under the project's generation lock until the process is killed in its second batch."""
    from feedback.queue import generation_writing
    from training import generate

    real = generate.generate_completions
    calls = {"n": 0}

    def dies_on_the_second_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(generate, "generate_completions", dies_on_the_second_batch)
    lock = HUEY.lock_task(f"generation-project-{project.pk}")
    with pytest.raises(KeyboardInterrupt), generation_writing(project.pk):
        round_write(round_id=round.pk, first_batch=1, batch_size=2)
    monkeypatch.setattr(generate, "generate_completions", real)
    lock.acquire()  # a killed worker never released it
    cache.set(f"generation-heartbeat-project-{project.pk}", time.time(), timeout=None)  # its last beat


def test_the_schedule_resumes_a_round_whose_worker_died_once_its_lock_is_stale(project, settings, monkeypatch):
    from feedback.tasks import training_schedule_task

    settings.TRAINING_RUN_STALE_SECONDS = 60
    second = round_request(project=project, writers=["base"])
    kill_mid_round(project, second, monkeypatch)
    second.refresh_from_db()
    assert (second.status, second.prompts_written) == ("running", 1)

    training_schedule_task.call_local()  # the heartbeat is fresh: the worker may still be writing
    assert Round.objects.get(pk=second.pk).status == "running"

    beat = f"generation-heartbeat-project-{project.pk}"
    cache.set(beat, time.time() - 61, timeout=None)
    training_schedule_task.call_local()  # stale: the lock is freed and the round queued again (run here at once)

    second.refresh_from_db()
    assert (second.status, second.prompts_written) == ("done", 3)
    assert sorted(Completion.objects.filter(round=second).values_list("prompt_id", flat=True)) == sorted(
        second.prompt_ids * 2
    )
    assert not HUEY.is_locked(f"generation-project-{project.pk}") and cache.get(beat) is None


def test_the_schedule_queues_again_a_running_round_whose_lock_is_free(project, monkeypatch):
    from feedback.tasks import training_schedule_task

    queued_again = []
    monkeypatch.setattr("feedback.tasks.round_write_task", queued_again.append)
    left = RoundFactory(project=project, number=2, status=Round.Status.RUNNING)
    busy = RoundFactory(project=ProjectFactory(), number=1, status=Round.Status.RUNNING)
    HUEY.lock_task(f"generation-project-{busy.project_id}").acquire()  # a live worker writes it
    cache.set(f"generation-heartbeat-project-{busy.project_id}", time.time(), timeout=None)
    training_schedule_task.call_local()
    training_schedule_task.call_local()
    assert queued_again == [left.pk, left.pk]  # at every tick until a worker takes it; the second writes nothing


def test_an_unexpected_error_fails_the_round_with_it_and_a_new_round_is_accepted(project, monkeypatch, queue):
    from training import generate

    second = round_request(project=project, writers=["base"])

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(generate, "generate_completions", out_of_memory)
    with pytest.raises(RuntimeError, match="CUDA out of memory"):
        round_write(round_id=second.pk)
    second.refresh_from_db()
    assert (second.status, second.error) == ("failed", "RuntimeError: CUDA out of memory")
    assert second.finished_at is not None

    manager = api_for(project, Membership.Role.MANAGER)
    listed = manager.get("/api/v1/projects/loop/rounds/").json()
    assert [(r["number"], r["status"], r["error"]) for r in listed] == [
        (2, "failed", "RuntimeError: CUDA out of memory"),
        (1, "done", ""),
    ]
    page = Client()
    page.force_login(User.objects.get(memberships__project=project, memberships__role=Membership.Role.MANAGER))
    assert "RuntimeError: CUDA out of memory" in page.get("/projects/loop/training/rounds/").content.decode()

    response = manager.post("/api/v1/projects/loop/rounds/", {"versions": ["base"]}, format="json")
    assert response.status_code == 202, response.content
    assert response.json()["number"] == 3


def test_generate_sync_finishes_a_round_its_writer_left_then_asks_for_a_new_one(project, settings, monkeypatch):
    settings.TRAINING_RUN_STALE_SECONDS = 60
    second = round_request(project=project, writers=["base"])
    kill_mid_round(project, second, monkeypatch)

    with pytest.raises(CommandError, match="Round 2 is being written"):  # its heartbeat is fresh
        call_command("generate", "loop", "--round", "--sync")
    cache.set(f"generation-heartbeat-project-{project.pk}", time.time() - 61, timeout=None)
    out = io.StringIO()
    call_command("generate", "loop", "--round", "--prompts", "1", "--sync", stdout=out)
    assert "Round 2 was left unfinished; writing the rest of it here." in out.getvalue()
    assert "Round 2: wrote 4 completions for 2 prompts" in out.getvalue()
    second.refresh_from_db()
    assert (second.status, Completion.objects.filter(round=second).count()) == ("done", 6)

    call_command("generate", "loop", "--round", "--prompts", "1", "--sync", stdout=io.StringIO())
    assert list(Round.objects.order_by("number").values_list("number", "status", "prompts_total")) == [
        (1, "done", 0),
        (2, "done", 3),
        (3, "done", 1),
    ]


def test_generate_sync_while_a_worker_holds_the_lock_queues_the_round_for_it(
    project, queue, django_capture_on_commit_callbacks
):
    HUEY.lock_task(f"generation-project-{project.pk}").acquire()
    with (
        django_capture_on_commit_callbacks(execute=True),
        pytest.raises(CommandError, match="A worker is writing completions for 'loop'; round 2 is queued for it."),
    ):
        call_command("generate", "loop", "--round", "--versions", "base", "--sync")
    asked = Round.objects.get(number=2)
    assert asked.status == "queued" and queue.args("round_write_task") == [(asked.pk,)]


OTHER_VERSION = "'elsewhere' is a version of project 'other', not of 'loop'."


@pytest.fixture
def elsewhere(project):
    return ModelVersionFactory(project=ProjectFactory(slug="other"), name="elsewhere")


@pytest.mark.parametrize(
    ("body", "answer"),
    [
        ({"versions": ["elsewhere"]}, {"versions": [OTHER_VERSION]}),
        ({"versions": ["base", "elsewhere"]}, {"versions": [OTHER_VERSION]}),
        ({"prompts": 2**31}, {"prompts": ["Ensure this value is less than or equal to 2147483647."]}),
        ({"prompts": 10**30}, {"prompts": ["Ensure this value is less than or equal to 2147483647."]}),
    ],
)
def test_the_api_refuses_another_projects_version_and_an_absurd_n(project, elsewhere, body, answer):
    before = stored()
    response = api_for(project, Membership.Role.MANAGER).post("/api/v1/projects/loop/rounds/", body, format="json")
    assert (response.status_code, response.json()) == (400, answer)
    assert stored() == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--versions", "elsewhere"], f"--versions: {OTHER_VERSION}"),
        (["--versions", "base,elsewhere"], f"--versions: {OTHER_VERSION}"),
        (["--prompts", "2147483648"], "--prompts must be at most 2147483647, not 2147483648"),
        (["--prompts", str(10**30)], f"--prompts must be at most 2147483647, not {10**30}"),
    ],
)
def test_the_command_refuses_another_projects_version_and_an_absurd_n(project, elsewhere, args, message):
    before = stored()
    for sync in ([], ["--sync"]):
        with pytest.raises(CommandError) as raised:
            call_command("generate", "loop", "--round", *args, *sync)
        assert str(raised.value) == message
    assert stored() == before


def test_the_service_refuses_an_absurd_n(project):
    with pytest.raises(ValidationError) as raised:
        round_request(project=project, prompts=2**31)
    assert raised.value.message_dict == {
        "prompts": ["The number of prompts must be at most 2147483647, not 2147483648."]
    }
    assert Round.objects.count() == 1


@pytest.mark.parametrize(
    ("form", "message"),
    [
        ({"prompts": "0"}, "prompts\n  * Ensure this value is greater than or equal to 1."),
        ({"prompts": "-3"}, "prompts\n  * Ensure this value is greater than or equal to 1."),
        ({"prompts": "2147483648"}, "prompts\n  * Ensure this value is less than or equal to 2147483647."),
        ({"prompts": "9" * 5000}, "prompts\n  * Enter a whole number."),
        ({"strategy": "loudest_first"}, "strategy\n  * Select a valid choice. loudest_first is not one of"),
        ({"versions": "elsewhere"}, f"versions: {OTHER_VERSION}"),
        ({"versions": "base, elsewhere"}, f"versions: {OTHER_VERSION}"),
    ],
)
def test_the_new_round_form_refuses_bad_input_with_a_message_and_writes_nothing(
    client, project, elsewhere, form, message
):
    from django.utils.html import escape

    client.force_login(MembershipFactory(project=project, role=Membership.Role.MANAGER).user)
    before = stored()
    response = client.post("/projects/loop/training/rounds/new/", form, follow=True)
    assert response.status_code == 200
    shown = [str(m) for m in response.context["messages"]]
    assert len(shown) == 1 and shown[0].startswith("Could not ask for a round: ")
    assert message in shown[0]
    assert escape(shown[0]) in response.content.decode()
    assert stored() == before


@pytest.mark.django_db(transaction=True)
def test_two_concurrent_new_round_requests_over_http_make_one_round(tiny_model_dir, queue):
    project = ProjectFactory(slug="race", base_model=str(tiny_model_dir))
    PromptFactory(project=project)
    manager = MembershipFactory(project=project, role=Membership.Role.MANAGER).user
    barrier = threading.Barrier(2)
    answers = {}

    def ask(name: str) -> None:
        client = APIClient()
        client.force_authenticate(manager)
        barrier.wait()
        try:
            response = client.post("/api/v1/projects/race/rounds/", {"versions": ["base"]}, format="json")
            answers[name] = (response.status_code, response.json())
        finally:
            connection.close()

    threads = [threading.Thread(target=ask, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    # The requests take turns: the later one replaces the earlier one's round, still queued, and takes its number.
    assert [status for status, _ in answers.values()] == [202, 202]
    assert [(body["number"], body["status"]) for _, body in answers.values()] == [(1, "queued"), (1, "queued")]
    kept = Round.objects.get(project=project)
    ids = {name: body["id"] for name, (_, body) in answers.items()}
    assert kept.pk in ids.values() and len(set(ids.values())) == 2
    assert (kept.number, kept.status, kept.writers) == (1, "queued", ["base"])
    assert sorted(queue.args("round_write_task")) == sorted((pk,) for pk in ids.values())
    replaced = next(pk for pk in ids.values() if pk != kept.pk)
    assert round_write(round_id=replaced).prompts == 0  # the worker finds it gone and writes nothing
