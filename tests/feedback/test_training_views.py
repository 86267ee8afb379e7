"""The training page: who sees what, the buttons as plain posts and with htmx, the live panel's polling."""

import html
import json

import pytest
from django.contrib.messages import get_messages

from feedback.models import Membership, ModelVersion, Project, TrainingRun
from tests.factories import MembershipFactory, ModelVersionFactory, ProjectFactory, TrainingRunFactory, UserFactory
from tests.feedback.export_helpers import compare, make_prompt

pytestmark = pytest.mark.django_db

HTMX = {"HTTP_HX_REQUEST": "true"}
POLLING = 'hx-trigger="every 2s"'


@pytest.fixture
def project():
    return ProjectFactory(slug="loop", name="Loop", mode=Project.Mode.PAIRWISE, completions_per_prompt=2)


@pytest.fixture
def judged(project):
    """Pairwise judgements on enough prompts for a training split."""
    annotator = MembershipFactory(project=project).user
    for _ in range(8):
        _, (good, bad) = make_prompt(project, k=2)
        compare(annotator, good, bad, "a")
    return project


@pytest.fixture
def manager(project):
    return MembershipFactory(project=project, role=Membership.Role.MANAGER).user


@pytest.fixture
def member(project):
    return MembershipFactory(project=project, role=Membership.Role.ANNOTATOR).user


def messages_of(response) -> list[str]:
    return [str(m) for m in get_messages(response.wsgi_request)]


def running_run(project, **kwargs):
    defaults = {
        "status": TrainingRun.Status.RUNNING,
        "step": 3,
        "total_steps": 10,
        "metrics": [{"step": s, "loss": 0.7 - s / 100, "rewards/accuracies": s / 10} for s in (1, 2, 3)],
        "data_counts": {"train": 12, "held_out": 2, "format": "dpo"},
        "config": {"beta": 0.1, "epochs": 1},
    }
    return TrainingRunFactory(project=project, **defaults | kwargs)


def versions(project):
    before = {"logp_accuracy": 0.25, "logp_accuracy_per_token": 0.375, "logp_margin": -1.5, "pairs": 8}
    after = {"logp_accuracy": 0.875, "logp_accuracy_per_token": 0.75, "logp_margin": 2.25, "pairs": 8}
    metrics = {"eval_before": before, "eval_after": after | {"accuracy": 0.9375, "margin": 0.42}}
    old = ModelVersionFactory(project=project, name="v1", metrics=metrics)
    new = ModelVersionFactory(project=project, name="v2", parent=old, metrics=metrics)
    return old, new


@pytest.mark.parametrize(
    ("who", "status"),
    [("anonymous", 302), ("outsider", 404), ("annotator", 200), ("manager", 200), ("staff", 200)],
)
def test_who_may_open_the_page(client, project, staff_user, who, status):
    users = {
        "outsider": MembershipFactory(project=ProjectFactory()).user,
        "annotator": MembershipFactory(project=project).user,
        "manager": MembershipFactory(project=project, role=Membership.Role.MANAGER).user,
        "staff": staff_user,
    }
    if who in users:
        client.force_login(users[who])
    response = client.get("/projects/loop/training/")
    assert response.status_code == status
    if status == 200:
        assert (b"Retrain now</button>" in response.content) == (who in ("manager", "staff"))


def test_the_page_shows_runs_versions_and_settings(client, project, staff_user):
    old, new = versions(project)
    finished = TrainingRunFactory(
        project=project,
        status=TrainingRun.Status.FAILED,
        error="ValueError: learning_rate too high",
        triggered_by=staff_user,
        trigger=TrainingRun.Trigger.ADMIN,
    )
    project.auto_train, project.auto_train_threshold = True, 50
    project.save()
    client.force_login(staff_user)

    page = client.get(f"/projects/loop/training/?run={finished.pk}").content.decode()

    assert "ValueError: learning_rate too high" in page
    assert "Django admin by staff" in page
    assert POLLING not in page  # a failed run is not polled
    assert "0.250 → 0.875" in page and "per token 0.375 → 0.750" in page and "-1.500 → 2.250" in page
    implicit = page.split('class="implicit-reward">')[1].split("</td>")[0]
    assert "0.938" in implicit and "margin 0.420" in implicit and "→" not in implicit  # after training only
    assert page.count(">Promote</button>") == 2  # nothing active yet
    assert "data-metrics=" in page and "chart-4.6.1.umd.min.js" in page
    assert 'name="auto_train" id="id_auto_train" checked' in page and 'value="50"' in page
    assert " style=" not in page and "<script>" not in page  # the Content Security Policy forbids both


def test_the_live_panel_polls_only_while_the_run_goes(client, project, member):
    run = running_run(project)
    client.force_login(member)

    page = client.get("/projects/loop/training/").content.decode()
    assert POLLING in page and f'hx-get="/projects/loop/training/runs/{run.pk}/"' in page
    assert '<progress id="run-progress" max="10" value="3">' in page
    assert "Cancel</button>" not in page  # members watch; managers act

    live = client.get(f"/projects/loop/training/runs/{run.pk}/", **HTMX)
    assert POLLING in live.content.decode() and "HX-Trigger" not in live
    metrics = json.loads(html.unescape(live.content.decode().split('data-metrics="')[1].split('"')[0]))
    assert metrics == {"algorithm": "dpo", "metrics": run.metrics}

    TrainingRun.objects.filter(pk=run.pk).update(status=TrainingRun.Status.SUCCEEDED, step=10)
    ended = client.get(f"/projects/loop/training/runs/{run.pk}/", **HTMX)
    assert POLLING not in ended.content.decode() and 'value="10"' in ended.content.decode()
    assert json.loads(ended["HX-Trigger"]) == {"rankwise:run-ended": {"run": run.pk}}

    history = client.get("/projects/loop/training/history/", **HTMX).content.decode()
    assert history.lstrip().startswith('<div id="history"') and f"#{run.pk}</a>" in history and "succeeded" in history


WATCHING = 'hx-trigger="every 10s"'


def test_a_run_started_elsewhere_appears_without_a_reload(client, project, member):
    ended = TrainingRunFactory(project=project, status=TrainingRun.Status.SUCCEEDED)
    client.force_login(member)
    page = client.get("/projects/loop/training/").content.decode()
    assert WATCHING in page and f"/projects/loop/training/watch/?after={ended.pk}" in page

    nothing_new = client.get(f"/projects/loop/training/watch/?after={ended.pk}", **HTMX)
    assert nothing_new.status_code == 204 and nothing_new.content == b""

    started = running_run(project, trigger=TrainingRun.Trigger.SCHEDULE)
    shown = client.get(f"/projects/loop/training/watch/?after={ended.pk}", **HTMX).content.decode()
    assert shown.lstrip().startswith('<div id="runs">')
    assert f"Run #{started.pk}" in shown and "Schedule" in shown
    assert POLLING in shown  # the new run's panel goes live
    assert WATCHING not in shown  # no watching while a run goes


def test_the_watch_is_off_while_a_run_goes_and_back_when_it_ends(client, project, member):
    run = running_run(project)
    client.force_login(member)
    assert WATCHING not in client.get("/projects/loop/training/").content.decode()
    TrainingRun.objects.filter(pk=run.pk).update(status=TrainingRun.Status.CANCELLED)
    history = client.get(f"/projects/loop/training/history/?run={run.pk}", **HTMX).content.decode()
    assert WATCHING in history and f"?after={run.pk}" in history


@pytest.mark.parametrize("after", ["", "abc", "-1", "1.5"])
def test_the_watch_refuses_a_bad_after(client, project, member, after):
    client.force_login(member)
    response = client.get(f"/projects/loop/training/watch/?after={after}", **HTMX)
    assert response.status_code == 400 and b"after: expected the id of the newest run shown" in response.content


def test_only_members_may_watch(client, project):
    assert client.get("/projects/loop/training/watch/?after=0").status_code == 302
    client.force_login(MembershipFactory(project=ProjectFactory()).user)
    assert client.get("/projects/loop/training/watch/?after=0").status_code == 404


def test_retrain_now_as_a_plain_post_queues_a_run(client, judged, manager, queue, django_capture_on_commit_callbacks):
    client.force_login(manager)

    with django_capture_on_commit_callbacks(execute=True):
        response = client.post("/projects/loop/training/retrain/", {"algorithm": "dpo"})

    run = TrainingRun.objects.get()
    assert response.status_code == 302 and response["Location"] == f"/projects/loop/training/?run={run.pk}"
    assert queue.args("training_run_task") == [(run.pk,)]
    assert run.triggered_by == manager and run.trigger == TrainingRun.Trigger.MANUAL and run.status == "queued"
    page = client.get(response["Location"]).content.decode()
    assert f"Run #{run.pk} (dpo) is queued" in page and POLLING in page and "Cancel</button>" in page


def test_retrain_now_with_htmx_answers_the_page_part_with_the_new_run(client, judged, staff_user, queue):
    client.force_login(staff_user)

    response = client.post("/projects/loop/training/retrain/", {"algorithm": ""}, **HTMX)

    run = TrainingRun.objects.get()
    body = response.content.decode()
    assert response.status_code == 200 and body.lstrip().startswith('<div id="training"')
    assert f"Run #{run.pk} (dpo) is queued" in body and POLLING in body
    assert response["HX-Push-Url"] == f"/projects/loop/training/?run={run.pk}"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({}, "no pairs to train on yet"),
        ({"algorithm": "grpo"}, "GRPO trains on ranked groups"),
        ({"algorithm": "sft"}, "Select a valid choice"),
    ],
)
def test_a_run_that_cannot_start_is_a_message_not_an_error(client, project, manager, queue, data, message):
    client.force_login(manager)

    plain = client.post("/projects/loop/training/retrain/", data, follow=True)
    assert plain.status_code == 200 and message in plain.content.decode()
    htmx = client.post("/projects/loop/training/retrain/", data, **HTMX)
    assert htmx.status_code == 200 and message in htmx.content.decode()
    assert not TrainingRun.objects.exists() and queue.args("training_run_task") == []


def test_a_second_run_while_one_goes_is_refused_with_a_message(client, judged, manager, queue):
    active = running_run(judged)
    client.force_login(manager)

    response = client.post("/projects/loop/training/retrain/", {}, follow=True)

    assert "already queued or running" in response.content.decode()
    assert list(TrainingRun.objects.all()) == [active]


def test_cancel_a_queued_run_then_a_running_one_then_an_ended_one(client, project, manager):
    queued_run = TrainingRunFactory(project=project)
    client.force_login(manager)

    response = client.post(f"/projects/loop/training/runs/{queued_run.pk}/cancel/")
    queued_run.refresh_from_db()
    assert response.status_code == 302 and queued_run.status == "cancelled"
    assert messages_of(response) == [f"Run #{queued_run.pk} is cancelled."]

    running = running_run(project)
    response = client.post(f"/projects/loop/training/runs/{running.pk}/cancel/", **HTMX)
    running.refresh_from_db()
    assert running.status == "running" and running.cancel_requested
    assert "stops before its next step" in response.content.decode()
    assert "cancel requested" in response.content.decode()

    response = client.post(f"/projects/loop/training/runs/{queued_run.pk}/cancel/", follow=True)
    assert "has already ended (cancelled)" in response.content.decode()


def test_promote_then_roll_back(client, project, manager, queue, django_capture_on_commit_callbacks):
    old, new = versions(project)
    client.force_login(manager)

    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(f"/projects/loop/training/versions/{new.pk}/promote/")
    assert response.status_code == 302 and ModelVersion.objects.get(is_active=True) == new
    # the new active version and its parent write the next round
    assert queue.args("round_write_task") == [(project.rounds.get(status="queued").pk,)]
    assert project.rounds.get(status="queued").writers == [new.name, old.name]
    page = client.get("/projects/loop/training/").content.decode()
    assert ">Roll back</button>" in page and ">Promote</button>" not in page
    assert "v2</strong> <span" in page and "active</span>" in page

    response = client.post(f"/projects/loop/training/versions/{old.pk}/promote/", **HTMX)
    assert response.status_code == 200 and "v1 is now the active version" in response.content.decode()
    assert ModelVersion.objects.get(is_active=True) == old


def test_members_cannot_start_cancel_promote_or_change_settings(client, judged, member, queue):
    run = running_run(judged)
    old, _ = versions(judged)
    client.force_login(member)

    for url, data in [
        ("/projects/loop/training/retrain/", {}),
        (f"/projects/loop/training/runs/{run.pk}/cancel/", {}),
        (f"/projects/loop/training/versions/{old.pk}/promote/", {}),
        ("/projects/loop/training/settings/", {"auto_train": "on", "auto_train_threshold": "1"}),
    ]:
        assert client.post(url, data).status_code == 403
        assert client.post(url, data, **HTMX).status_code == 403
    run.refresh_from_db()
    judged.refresh_from_db()
    assert TrainingRun.objects.count() == 1 and not run.cancel_requested
    assert not ModelVersion.objects.filter(is_active=True).exists() and not judged.auto_train


def test_outsiders_get_404_for_every_action(client, project):
    run = running_run(project)
    client.force_login(MembershipFactory(project=ProjectFactory(), role=Membership.Role.MANAGER).user)
    assert client.post("/projects/loop/training/retrain/").status_code == 404
    assert client.post(f"/projects/loop/training/runs/{run.pk}/cancel/").status_code == 404
    assert client.get(f"/projects/loop/training/runs/{run.pk}/").status_code == 404


def settings_data(**overrides):
    data = {
        "auto_train": "on",
        "auto_train_threshold": "25",
        "auto_promote": "on",
        "promote_when_preferred": "on",
        "battle_share": "0.25",
        "round_size": "10",
        "training_algorithm": "dpo",
        "training_config": '{"epochs": 2, "beta": 0.2}',
        "weighting": "raw",
    }
    return data | overrides


def test_managers_change_the_training_settings(client, project, manager):
    client.force_login(manager)

    response = client.post("/projects/loop/training/settings/", settings_data())

    project.refresh_from_db()
    assert response.status_code == 302 and messages_of(response) == ["Training settings saved."]
    assert project.auto_train and project.auto_promote and project.auto_train_threshold == 25
    assert project.training_config == {"epochs": 2, "beta": 0.2} and project.round_size == 10
    assert project.promote_when_preferred and project.battle_share == 0.25 and project.weighting == "raw"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"training_config": '{"betta": 0.1}'}, "unknown dpo setting &#x27;betta&#x27;"),
        ({"training_config": '{"beta": -1}'}, "beta must be positive"),
        ({"training_config": "[1, 2]"}, "must be a JSON object"),
        ({"training_config": "{not json"}, "Enter a valid JSON"),
        ({"auto_train_threshold": "0"}, "greater than or equal to 1"),
        ({"battle_share": "1.5"}, "less than or equal to 1.0"),
        ({"battle_share": "-0.1"}, "greater than or equal to 0.0"),
        ({"weighting": "majority"}, "Select a valid choice. majority is not one of the available choices."),
    ],
)
def test_bad_settings_are_shown_at_their_field_and_not_saved(client, project, manager, overrides, message):
    client.force_login(manager)

    plain = client.post("/projects/loop/training/settings/", settings_data(**overrides))
    htmx = client.post("/projects/loop/training/settings/", settings_data(**overrides), **HTMX)

    assert plain.status_code == 400 and message in plain.content.decode()
    assert htmx.status_code == 200 and message in htmx.content.decode()
    project.refresh_from_db()
    assert not project.auto_train and project.training_config == {}


def test_the_home_page_links_to_training_for_managers_only(client, project, staff_user):
    annotator = MembershipFactory(project=project).user
    manager = MembershipFactory(project=project, role=Membership.Role.MANAGER, user=UserFactory()).user
    for user, shown in [(annotator, False), (manager, True), (staff_user, True)]:
        client.force_login(user)
        assert (b'href="/projects/loop/training/"' in client.get("/").content) == shown


def test_a_grpo_version_shows_kendall_tau_and_a_reward_model_its_own_accuracy(client, project, staff_user):
    figures = {"logp_accuracy": 0.5, "logp_accuracy_per_token": 0.5, "logp_margin": 0.0, "pairs": 6}
    ModelVersionFactory(
        project=project,
        name="v1",
        metrics={
            "eval_before": figures | {"kendall_tau": -0.25, "groups": 2},
            "eval_after": figures | {"kendall_tau": 0.75, "groups": 2, "accuracy": 1.0, "margin": 0.3},
        },
    )
    ModelVersionFactory(
        project=project,
        name="reward-1",
        kind="reward",
        metrics={
            "eval_before": {"accuracy": 0.4, "margin": 0.0, "pairs": 6},
            "eval_after": {"accuracy": 0.8, "margin": 1.5, "pairs": 6},
        },
    )
    client.force_login(staff_user)

    page = client.get("/projects/loop/training/").content.decode()

    assert "Kendall τ -0.250 → 0.750" in page
    assert "0.400 → 0.800" in page and "0.000 → 1.500" in page
