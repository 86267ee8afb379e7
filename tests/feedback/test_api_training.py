"""REST training runs: who may list, start, read and cancel them; what a refused start answers."""

import pytest
from rest_framework.test import APIClient

from feedback.models import Membership, ModelVersion, Project, TrainingRun
from tests.factories import MembershipFactory, ModelVersionFactory, ProjectFactory, TrainingRunFactory, UserFactory
from tests.feedback.export_helpers import compare, make_prompt

pytestmark = pytest.mark.django_db

RUNS = "/api/v1/projects/loop/training-runs/"


@pytest.fixture
def project():
    project = ProjectFactory(slug="loop", mode=Project.Mode.PAIRWISE, completions_per_prompt=2)
    annotator = MembershipFactory(project=project).user
    for _ in range(8):
        _, (good, bad) = make_prompt(project, k=2)
        compare(annotator, good, bad, "a")
    return project


@pytest.fixture
def users(project, staff_user):
    return {
        "anonymous": None,
        "annotator": MembershipFactory(project=project).user,
        "other annotator": MembershipFactory(project=ProjectFactory()).user,
        "other manager": MembershipFactory(project=ProjectFactory(), role=Membership.Role.MANAGER).user,
        "manager": MembershipFactory(project=project, role=Membership.Role.MANAGER).user,
        "staff": staff_user,
    }


def client_for(user) -> APIClient:
    client = APIClient()
    if user is not None:
        client.force_authenticate(user)
    return client


@pytest.fixture
def manager_api(users):
    return client_for(users["manager"])


# who: (list, start, read a run, cancel a run)
MATRIX = {
    "anonymous": (401, 401, 401, 401),
    "annotator": (200, 403, 200, 403),
    "other annotator": (404, 404, 404, 404),
    "other manager": (404, 404, 404, 404),
    "manager": (200, 201, 200, 200),
    "staff": (200, 201, 200, 200),
}


@pytest.mark.parametrize("who", MATRIX)
def test_who_may_list_start_read_and_cancel(project, users, queue, who, django_capture_on_commit_callbacks):
    listing, start, read, cancel = MATRIX[who]
    api = client_for(users[who])
    ended = TrainingRunFactory(project=project, status=TrainingRun.Status.SUCCEEDED)

    assert api.get(RUNS).status_code == listing
    with django_capture_on_commit_callbacks(execute=True):
        started = api.post(RUNS, {"algorithm": "dpo", "config": {"epochs": 2}}, format="json")
    assert started.status_code == start, started.content
    run = TrainingRun.objects.filter(status="queued").first() or TrainingRunFactory(project=project)
    assert api.get(f"/api/v1/training-runs/{run.pk}/").status_code == read
    assert api.get(f"/api/v1/training-runs/{ended.pk}/").status_code == read
    assert api.post(f"/api/v1/training-runs/{run.pk}/cancel/").status_code == cancel
    run.refresh_from_db()
    assert (run.status == "cancelled") == (cancel == 200)
    if start == 201:
        assert queue.args("training_run_task") == [(run.pk,)] and started.json()["id"] == run.pk
        assert run.triggered_by == users[who] and run.trigger == TrainingRun.Trigger.API
    else:
        assert queue.sent == []


def test_a_started_run_answers_with_its_snapshot_and_full_config(manager_api, users, queue):
    response = manager_api.post(RUNS, {"config": {"epochs": 2, "beta": 0.25}}, format="json")

    assert response.status_code == 201
    body = response.json()
    assert body["status"] == "queued" and body["algorithm"] == "dpo" and body["project"] == "loop"
    assert body["config"]["epochs"] == 2 and body["config"]["beta"] == 0.25 and "learning_rate" in body["config"]
    assert body["data_counts"]["train"] > 0 and body["data_counts"]["format"] == "dpo" and len(body["data_hash"]) == 64
    assert body["trigger"] == "api" and body["triggered_by"] == users["manager"].get_username()
    assert body["metrics"] == [] and body["produced_version"] is None and body["cancel_requested"] is False


def test_a_run_reads_with_its_progress_metrics_error_and_version(project, manager_api):
    run = TrainingRunFactory(
        project=project,
        status=TrainingRun.Status.SUCCEEDED,
        step=4,
        total_steps=4,
        metrics=[{"step": 4, "loss": 0.5, "rewards/accuracies": 1.0}],
    )
    version = ModelVersionFactory(project=project, produced_by_run=run)

    body = manager_api.get(f"/api/v1/training-runs/{run.pk}/").json()

    assert body["step"] == body["total_steps"] == 4 and body["metrics"][0]["loss"] == 0.5
    assert body["produced_version"] == version.pk and body["error"] == "" and body["triggered_by"] is None


def test_the_list_is_paginated_newest_first(project, manager_api):
    runs = [TrainingRunFactory(project=project, status=TrainingRun.Status.FAILED) for _ in range(3)]
    TrainingRunFactory(project=ProjectFactory(), status=TrainingRun.Status.FAILED)

    body = manager_api.get(RUNS).json()

    assert body["count"] == 3 and [r["id"] for r in body["results"]] == [r.pk for r in reversed(runs)]
    assert manager_api.get(RUNS + "?page=2").status_code == 404


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        ({"algorithm": "sft"}, "algorithm", "is not a valid choice"),
        ({"config": [1, 2]}, "config", "Expected a dictionary"),
        ({"config": {"beta": -1}}, "detail", "beta must be positive"),
        ({"config": {"learning_rate": "fast"}}, "detail", "learning_rate must be a number, not 'fast'"),
        ({"config": {"betta": 0.1}}, "detail", "unknown dpo setting 'betta'"),
        ({"algorithm": "grpo"}, "detail", "GRPO trains on ranked groups"),
    ],
)
def test_bad_input_is_a_400_that_says_why_and_starts_nothing(manager_api, queue, body, field, message):
    response = manager_api.post(RUNS, body, format="json")

    assert response.status_code == 400
    assert message in str(response.json()[field])
    assert not TrainingRun.objects.exists() and queue.sent == []


def test_nothing_to_train_on_is_a_400(users, queue):
    ProjectFactory(slug="empty", mode=Project.Mode.PAIRWISE)
    response = client_for(users["staff"]).post("/api/v1/projects/empty/training-runs/", {}, format="json")
    assert response.status_code == 400 and "no pairs to train on yet" in response.json()["detail"]


@pytest.mark.parametrize("status", ["queued", "running"])
def test_a_second_run_while_one_is_active_is_a_409(project, manager_api, queue, status):
    active = TrainingRunFactory(project=project, status=status)

    response = manager_api.post(RUNS, {}, format="json")

    assert response.status_code == 409
    assert response.json()["detail"] == f"Run {active.pk} of loop is already {status}; wait or cancel it."
    assert list(TrainingRun.objects.all()) == [active]


def test_cancel_a_running_run_asks_it_to_stop(project, manager_api):
    run = TrainingRunFactory(project=project, status=TrainingRun.Status.RUNNING)

    body = manager_api.post(f"/api/v1/training-runs/{run.pk}/cancel/").json()

    assert body["status"] == "running" and body["cancel_requested"] is True


@pytest.mark.parametrize("status", ["succeeded", "failed", "cancelled"])
def test_cancel_of_an_ended_run_is_a_409(project, manager_api, status):
    run = TrainingRunFactory(project=project, status=status)

    response = manager_api.post(f"/api/v1/training-runs/{run.pk}/cancel/")

    assert response.status_code == 409 and response.json()["detail"] == f"run {run.pk} has already ended ({status})"
    run.refresh_from_db()
    assert run.status == status and not run.cancel_requested


@pytest.mark.parametrize("run_id", ["0", "abc", "99999", str(2**63), "-1", "1.5"])
def test_ids_that_name_no_run_are_json_404s(manager_api, run_id):
    for response in (
        manager_api.get(f"/api/v1/training-runs/{run_id}/"),
        manager_api.post(f"/api/v1/training-runs/{run_id}/cancel/"),
    ):
        assert response.status_code == 404 and response.json() == {"detail": "No such training run."}


@pytest.mark.parametrize(("who", "status"), [("annotator", 403), ("other manager", 404), ("manager", 200)])
def test_promote_a_version_and_roll_back(project, users, queue, who, status):
    old = ModelVersionFactory(project=project, name="v1", is_active=True)
    new = ModelVersionFactory(project=project, name="v2", parent=old)
    api = client_for(users[who])

    response = api.post(f"/api/v1/model-versions/{new.pk}/promote/", {}, format="json")

    assert response.status_code == status
    assert ModelVersion.objects.get(is_active=True) == (new if status == 200 else old)
    if status == 200:
        assert response.json()["is_active"] is True
        assert api.post(f"/api/v1/model-versions/{old.pk}/promote/", {}, format="json").status_code == 200
        assert ModelVersion.objects.get(is_active=True) == old


def test_the_session_needs_a_csrf_token_to_start_a_run(project, users, queue):
    client = APIClient(enforce_csrf_checks=True)
    client.force_login(users["manager"])
    assert client.post(RUNS, {}, format="json").status_code == 403
    assert not TrainingRun.objects.exists()


def test_a_staff_user_without_membership_starts_a_run(queue):
    staff = UserFactory(is_staff=True)
    ProjectFactory(slug="solo", mode=Project.Mode.PAIRWISE)
    response = client_for(staff).post("/api/v1/projects/solo/training-runs/", {}, format="json")
    assert response.status_code == 400  # allowed to try: refused only for having nothing to train on
