"""Excluding an annotator: their judgements leave exports, snapshots and battles, stay stored, and come back."""

import io
import uuid

import pytest
from django.core.management import CommandError, call_command
from django.test import Client
from rest_framework.test import APIClient

from feedback.models import AnnotatorExclusion, Membership, PairwiseJudgement
from feedback.selectors.preferences import PreferenceExportOptions, preference_rows
from tests.factories import MembershipFactory, UserFactory
from tests.feedback.queue_helpers import lease, make_project, submit

pytestmark = pytest.mark.django_db


@pytest.fixture
def judged():
    """A pairwise project (K=2, overlap 2) of 6 prompts that two annotators judged in full, each choosing A."""
    project = make_project(mode="pairwise", prompts=6, k=2, overlap=2, slug="ex")
    people = {}
    for name in ("good", "bad"):
        user = MembershipFactory(project=project, role=Membership.Role.ANNOTATOR, user=UserFactory(username=name)).user
        people[name] = user
        while (task := lease(project, user)) is not None:
            submit(
                project=project, annotator=user, task_id=task.pk, client_uuid=uuid.uuid4(), kind="pairwise", choice="a"
            )
    return project, people


def _votes(project):
    rows = list(preference_rows(project=project, options=PreferenceExportOptions(format="judgements")))
    return sorted({row["annotator"] for row in rows}), len(rows)


def test_an_excluded_annotator_leaves_exports_and_comes_back(judged):
    project, people = judged
    client = APIClient()
    client.force_authenticate(MembershipFactory(project=project, role=Membership.Role.MANAGER).user)
    assert _votes(project) == (sorted([str(people["bad"].pk), str(people["good"].pk)]), 12)
    out = client.post("/api/v1/projects/ex/annotators/bad/exclude/", {"reason": "always A"}, format="json")
    assert out.status_code == 200 and out.json() == {"username": "bad", "excluded": True, "changed": True}
    assert AnnotatorExclusion.objects.get(project=project).reason == "always A"
    assert _votes(project) == ([str(people["good"].pk)], 6)
    assert PairwiseJudgement.objects.filter(annotator=people["bad"]).count() == 6  # nothing deleted
    again = client.post("/api/v1/projects/ex/annotators/bad/exclude/", {}, format="json").json()
    assert again["changed"] is False
    quality = client.get("/api/v1/projects/ex/quality/").json()
    assert quality["excluded"] == ["bad"] and {a["username"] for a in quality["annotators"]} == {"good", "bad"}
    back = client.post("/api/v1/projects/ex/annotators/bad/include/", {}, format="json")
    assert back.json() == {"username": "bad", "excluded": False, "changed": True}
    assert _votes(project)[1] == 12
    assert client.post("/api/v1/projects/ex/annotators/bad/include/", {}, format="json").json()["changed"] is False


def test_someone_who_never_annotated_here_is_a_404_and_a_long_reason_a_400(judged):
    project, _ = judged
    UserFactory(username="stranger")
    client = APIClient()
    client.force_authenticate(MembershipFactory(project=project, role=Membership.Role.MANAGER).user)
    missing = client.post("/api/v1/projects/ex/annotators/stranger/exclude/", {}, format="json")
    assert missing.status_code == 404
    assert missing.json() == {"detail": "'stranger' has not annotated in project 'ex'."}
    long = client.post("/api/v1/projects/ex/annotators/bad/exclude/", {"reason": "x" * 501}, format="json")
    assert long.status_code == 400 and "reason" in long.json()
    number = client.post("/api/v1/projects/ex/annotators/bad/exclude/", {"reason": 7}, format="json")
    assert number.status_code == 400 and "reason" in number.json()
    assert not AnnotatorExclusion.objects.exists()


def test_the_command_excludes_and_includes_or_names_the_problem(judged):
    project, _ = judged
    out = io.StringIO()
    call_command("annotator", "ex", "bad", "--exclude", "--reason", "spam", stdout=out)
    assert out.getvalue() == "bad's judgements are now left out of 'ex''s exports, training and battles.\n"
    assert AnnotatorExclusion.objects.filter(annotator__username="bad").exists()
    with pytest.raises(CommandError, match="'nobody' has not annotated in project 'ex'."):
        call_command("annotator", "ex", "nobody", "--include")
    with pytest.raises(CommandError, match="no project 'nope'"):
        call_command("annotator", "nope", "bad", "--include")
    call_command("annotator", "ex", "bad", "--include", stdout=io.StringIO())
    assert not AnnotatorExclusion.objects.exists()


def test_the_quality_page_has_the_button_for_managers_only(judged):
    project, _ = judged
    manager = MembershipFactory(project=project, role=Membership.Role.MANAGER).user
    reviewer = MembershipFactory(project=project, role=Membership.Role.REVIEWER).user
    client = Client()
    client.force_login(reviewer)
    assert 'value="exclude"' not in client.get("/projects/ex/quality/").content.decode()
    client.force_login(manager)
    page = client.get("/projects/ex/quality/").content.decode()
    assert page.count('value="exclude"') == 2
    done = client.post("/projects/ex/quality/annotators/bad/exclusion/", {"action": "exclude"}, follow=True)
    html = done.content.decode()
    assert "bad&#x27;s judgements are left out of exports, training and battles." in html
    assert html.count('value="include"') == 1 and html.count('<strong class="excluded">excluded</strong>') == 1
    client.post("/projects/ex/quality/annotators/bad/exclusion/", {"action": "include"})
    assert not AnnotatorExclusion.objects.exists()
    wrong = client.post("/projects/ex/quality/annotators/ghost/exclusion/", {"action": "exclude"}, follow=True)
    assert "&#x27;ghost&#x27; has not annotated in project &#x27;ex&#x27;." in wrong.content.decode()


def test_an_excluded_annotators_battles_leave_the_leaderboard(tiny_model_dir, settings):
    from feedback.selectors.battles import battle_rows
    from feedback.services.annotators import annotator_exclude
    from feedback.services.generation import round_write
    from feedback.services.rounds import battle_request
    from tests.feedback.test_battles import _battles, _world

    project, _ = _world(tiny_model_dir, settings)
    battle = battle_request(project=project, candidate="v1")
    round_write(round_id=battle.pk)
    _battles(project, battle, v1_wins=3)
    judge = PairwiseJudgement.objects.filter(round=battle).first().annotator
    assert len(list(battle_rows(project=project))) == 3
    annotator_exclude(project=project, username=judge.username)
    assert list(battle_rows(project=project)) == []
