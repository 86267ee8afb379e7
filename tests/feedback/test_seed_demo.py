import json
import os
import stat

import pytest
from django.contrib.auth import authenticate
from django.core.management import call_command

from feedback.models import Membership, Project
from feedback.services import demo
from tests.conftest import PASSWORD
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db


def test_the_demo_is_seeded_once_with_logins_that_work(settings, capsys, queue, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        call_command("seed_demo")
    out = capsys.readouterr().out

    project = Project.objects.get(slug="demo")
    assert project.prompts.count() >= 60
    topics = {p.metadata["topic"] for p in project.prompts.all()}
    assert topics == {"coding", "facts", "writing", "advice", "multi-turn"}
    assert any(len(p.messages) > 1 for p in project.prompts.all())
    # completions are written by the worker, not while the command waits
    assert queue.args("generate_completions_task") == [(project.pk,)]

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


def test_an_existing_account_with_a_demo_name_is_left_as_it_is(settings, capsys, queue):
    alice = UserFactory(username="alice", is_staff=True)
    password_hash = alice.password
    call_command("seed_demo")
    out = capsys.readouterr().out

    alice.refresh_from_db()
    assert (alice.password, alice.is_staff, alice.is_superuser) == (password_hash, True, False)
    assert authenticate(username="alice", password=PASSWORD) == alice
    assert not Membership.objects.filter(user=alice).exists()
    credentials = json.loads((settings.DATA_DIR / "demo-credentials.json").read_text())
    assert set(credentials) == {"admin", "bob"}
    assert "alice  is an account that existed before the demo: left as it is, with no demo password." in out
    assert authenticate(username="bob", password=credentials["bob"]) is not None


def test_the_credentials_file_is_private_from_its_first_byte(settings, monkeypatch):
    path = settings.DATA_DIR / "demo-credentials.json"
    path.write_text("{}")
    path.chmod(0o644)  # an earlier, readable file is replaced, not reused
    modes_while_written = []
    real_dump = demo.json.dump

    def dump(data, file):
        modes_while_written.append(stat.S_IMODE(os.fstat(file.fileno()).st_mode))
        real_dump(data, file)

    monkeypatch.setattr(demo.json, "dump", dump)
    previous = os.umask(0)
    try:
        demo.demo_seed()
    finally:
        os.umask(previous)
    assert modes_while_written == [0o600]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
