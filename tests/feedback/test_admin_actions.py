"""Django admin actions: Retrain now on projects, cancel on training runs."""

import pytest
from django.contrib.messages import ERROR, SUCCESS, get_messages

from feedback.models import Project, TrainingRun
from tests.factories import MembershipFactory, ProjectFactory, TrainingRunFactory
from tests.feedback.export_helpers import compare, make_prompt

pytestmark = pytest.mark.django_db


def judged_project(slug: str) -> Project:
    project = ProjectFactory(slug=slug, name=slug.title(), mode=Project.Mode.PAIRWISE, completions_per_prompt=2)
    annotator = MembershipFactory(project=project).user
    for _ in range(6):
        _, (good, bad) = make_prompt(project, k=2)
        compare(annotator, good, bad, "a")
    return project


def act(client, model: str, action: str, objects) -> list[tuple[int, str]]:
    response = client.post(
        f"/admin/feedback/{model}/",
        {"action": action, "_selected_action": [o.pk for o in objects]},
        follow=True,
    )
    assert response.status_code == 200
    return sorted((m.level, str(m)) for m in get_messages(response.wsgi_request))


def test_retrain_now_starts_a_run_per_project_and_reports_each_refusal(
    client, staff_user, queue, django_capture_on_commit_callbacks
):
    ready = judged_project("ready")
    busy = judged_project("busy")
    active = TrainingRunFactory(project=busy, status=TrainingRun.Status.RUNNING)
    empty = ProjectFactory(slug="empty", name="Empty", mode=Project.Mode.PAIRWISE)
    client.force_login(staff_user)

    with django_capture_on_commit_callbacks(execute=True):
        messages = act(client, "project", "retrain_now", [ready, busy, empty])

    run = TrainingRun.objects.get(project=ready)
    assert run.trigger == TrainingRun.Trigger.ADMIN and run.triggered_by == staff_user
    assert queue.args("training_run_task") == [(run.pk,)]
    assert messages == sorted(
        [
            (SUCCESS, f"Ready: run {run.pk} (dpo) is queued."),
            (ERROR, "Busy: a training run of busy is already queued or running"),
            (ERROR, "Empty: no pairs to train on yet: collect more judgements first"),
        ]
    )
    assert list(TrainingRun.objects.filter(project=busy)) == [active]
    assert not TrainingRun.objects.filter(project=empty).exists()


def test_cancel_action_cancels_queued_stops_running_and_reports_ended_runs(client, staff_user):
    project = ProjectFactory()
    queued = TrainingRunFactory(project=project, status=TrainingRun.Status.QUEUED)
    running = TrainingRunFactory(project=ProjectFactory(), status=TrainingRun.Status.RUNNING)
    ended = TrainingRunFactory(project=project, status=TrainingRun.Status.SUCCEEDED)
    client.force_login(staff_user)

    messages = act(client, "trainingrun", "cancel_runs", [queued, running, ended])

    assert messages == sorted(
        [
            (SUCCESS, f"Run {queued.pk} cancelled."),
            (SUCCESS, f"Run {running.pk} stops before its next step."),
            (ERROR, f"Run {ended.pk}: run {ended.pk} has already ended (succeeded)"),
        ]
    )
    queued.refresh_from_db()
    running.refresh_from_db()
    ended.refresh_from_db()
    assert queued.status == "cancelled" and running.cancel_requested and ended.status == "succeeded"
