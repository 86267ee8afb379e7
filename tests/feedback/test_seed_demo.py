import json

import pytest
from django.contrib.auth import authenticate
from django.core.management import call_command

from feedback.management.commands import seed_demo
from feedback.models import Membership, Project

pytestmark = pytest.mark.django_db


def test_the_demo_is_seeded_once_with_logins_that_work(settings, monkeypatch, capsys):
    queued = []
    monkeypatch.setattr(seed_demo, "generate_completions_task", queued.append)
    call_command("seed_demo")
    out = capsys.readouterr().out

    project = Project.objects.get(slug="demo")
    assert project.prompts.count() >= 60
    topics = {p.metadata["topic"] for p in project.prompts.all()}
    assert topics == {"coding", "facts", "writing", "advice", "multi-turn"}
    assert any(len(p.messages) > 1 for p in project.prompts.all())
    assert queued == [project.pk]  # completions are written by the worker, not while the command waits

    credentials = json.loads((settings.DATA_DIR / "demo-credentials.json").read_text())
    assert set(credentials) == {"admin", "alice", "bob"}
    for name, password in credentials.items():
        assert f"{name}" in out and password in out
        user = authenticate(username=name, password=password)
        assert user is not None
    roles = dict(Membership.objects.filter(project=project).values_list("user__username", "role"))
    assert roles == {"admin": "manager", "alice": "annotator", "bob": "annotator"}

    call_command("seed_demo")
    assert Project.objects.count() == 1 and project.prompts.count() == 62
    assert "Found the demo project" in capsys.readouterr().out
    assert authenticate(username="alice", password=credentials["alice"]) is not None
