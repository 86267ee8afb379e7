"""A large JSONL export shared between processes gives exactly the text of one process, and fails cleanly."""

import json
import multiprocessing
import os

import pytest
from django.core.management import call_command
from rest_framework.test import APIClient

from feedback.selectors.preferences import PreferenceExportOptions, preference_rows
from feedback.services import exports
from feedback.services.exports import ExportError, export_jsonl, export_jsonl_chunks
from tests.factories import ProjectFactory, UserFactory
from tests.feedback.export_helpers import bulk_rankings, compare, fast_password_hashing, make_prompt, rank

# Forked processes read committed rows only: these tests commit theirs.
pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def _fast_hashing(settings):
    fast_password_hashing(settings)


@pytest.fixture
def project():
    """40 bulk-ranked prompts, then prompts with ties, disagreement and pairwise judgements, and one never judged."""
    project = ProjectFactory(slug="wide")
    one, two = UserFactory(username="one"), UserFactory(username="two")
    bulk_rankings(project, prompts=40, annotators=[one, two])
    for _ in range(5):
        prompt, (a, b, c, d) = make_prompt(project)
        rank(one, prompt, [[a], [b, c], [d]])
        rank(two, prompt, [[b], [a], [d], [c]])
        compare(one, a, d, "a")
        compare(two, a, d, "tie")
    make_prompt(project)
    return project


def one_process_text(project, options: PreferenceExportOptions) -> bytes:
    return "".join(export_jsonl_chunks(rows=preference_rows(project=project, options=options))).encode()


@pytest.mark.parametrize(
    "options",
    [
        {"format": "dpo"},
        {"format": "dpo", "conversational": True, "pairs": "adjacent", "split": "train", "test_fraction": 0.3},
        {"format": "grpo"},
        {"format": "judgements", "pseudonymise": True},
    ],
    ids=lambda o: "-".join(str(v) for v in o.values()),
)
def test_several_processes_write_the_text_of_one(project, options):
    options = PreferenceExportOptions(**options)
    progress: list[int] = []
    text = b"".join(
        export_jsonl(project=project, options=options, on_prompt=progress.append, workers=3, slice_prompts=7)
    )
    assert text
    assert text == one_process_text(project, options)
    # This process counts its own prompts one by one and a helper's slice of 7 at once.
    assert 7 in progress
    assert sum(progress) == project.prompts.count() == 46
    assert multiprocessing.active_children() == []


def test_inside_a_transaction_one_process_exports_alone(project):
    from django.db import transaction

    options = PreferenceExportOptions(format="dpo")
    progress: list[int] = []
    with transaction.atomic():
        text = b"".join(
            export_jsonl(project=project, options=options, on_prompt=progress.append, workers=3, slice_prompts=7)
        )
    assert text == one_process_text(project, options)
    assert set(progress) == {1}


def test_slices_cover_every_prompt_once(project):
    slices = exports._prompt_slices(project=project, size=7)
    ids = list(project.prompts.order_by("id").values_list("id", flat=True))
    assert [prompts for _, _, prompts in slices] == [7, 7, 7, 7, 7, 7, 4]
    assert [sum(first <= i < end for first, end, _ in slices) for i in ids] == [1] * len(ids)
    assert all(end <= next_first for (_, end, _), (next_first, _, _) in zip(slices, slices[1:], strict=False))


def test_a_project_without_prompts_exports_nothing():
    empty = ProjectFactory(slug="empty")
    assert exports._prompt_slices(project=empty, size=7) == []
    assert list(export_jsonl(project=empty, options=PreferenceExportOptions(), workers=2, slice_prompts=7)) == []


def test_command_and_api_share_the_work_with_the_same_result(project, settings, monkeypatch, tmp_path, staff_user):
    settings.EXPORT_WORKERS = 2
    monkeypatch.setattr(exports, "SLICE_PROMPTS", 9)
    expected = one_process_text(project, PreferenceExportOptions(format="dpo"))

    out = tmp_path / "wide.jsonl"
    call_command("export_preferences", "wide", "--format", "dpo", "--out", str(out))
    assert out.read_bytes() == expected

    client = APIClient()
    client.force_login(staff_user)
    response = client.get("/api/v1/projects/wide/export/", {"format": "dpo"})
    assert response.status_code == 200
    assert b"".join(response.streaming_content) == expected
    assert [json.loads(line)["prompt_id"] for line in expected.splitlines()] == sorted(
        json.loads(line)["prompt_id"] for line in expected.splitlines()
    )


def test_a_failing_helper_stops_the_export_with_its_error(project, monkeypatch):
    slices = exports._prompt_slices(project=project, size=7)
    real_rows = exports.preference_rows

    def rows(**kwargs):
        if kwargs.get("id_range") == slices[1][:2]:  # the first slice a helper exports
            raise RuntimeError("the disk is full")
        return real_rows(**kwargs)

    monkeypatch.setattr(exports, "preference_rows", rows)
    with pytest.raises(ExportError, match="an export process failed: RuntimeError: the disk is full"):
        b"".join(export_jsonl(project=project, options=PreferenceExportOptions(), workers=2, slice_prompts=7))
    assert multiprocessing.active_children() == []


def test_a_helper_that_dies_is_reported(project, monkeypatch):
    real_rows = exports.preference_rows
    parent = os.getpid()

    def rows(**kwargs):
        if os.getpid() != parent:
            os._exit(3)
        return real_rows(**kwargs)

    monkeypatch.setattr(exports, "preference_rows", rows)
    with pytest.raises(ExportError, match="stopped before it had written its part"):
        b"".join(export_jsonl(project=project, options=PreferenceExportOptions(), workers=2, slice_prompts=7))
    assert multiprocessing.active_children() == []


def test_a_reader_that_stops_early_leaves_no_process_behind(project):
    chunks = export_jsonl(project=project, options=PreferenceExportOptions(), workers=3, slice_prompts=7)
    assert next(chunks)
    chunks.close()
    assert multiprocessing.active_children() == []
    # The database connection this process had before is usable again.
    assert project.prompts.count() == 46


def test_helpers_open_their_own_connection_whatever_this_process_left_open(project, monkeypatch):
    """A connection opened before an event loop runs in a thread (as under Playwright's sync API) stays open,
    out of connections.close_all()'s reach there, yet it is the one a process forked from that thread sees as
    its own: the helpers must neither query it nor close it. (In a thread of its own, so as to start with no
    loop and no connection, whatever this one has.)"""
    import asyncio
    import threading

    from django.db import connections

    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    expected = one_process_text(project, PreferenceExportOptions())
    outcome: dict[str, object] = {}

    def export_with_a_loop_running() -> None:
        before_the_loop = connections["default"]
        before_the_loop.ensure_connection()
        loop = asyncio.new_event_loop()
        asyncio.events._set_running_loop(loop)
        try:
            outcome["hidden"] = connections["default"] is not before_the_loop
            chunks = export_jsonl(project=project, options=PreferenceExportOptions(), workers=3, slice_prompts=7)
            outcome["text"] = b"".join(chunks)
            connections.close_all()
        finally:
            asyncio.events._set_running_loop(None)
            loop.close()
        outcome["usable"] = connections["default"] is before_the_loop and before_the_loop.is_usable()
        connections.close_all()

    thread = threading.Thread(target=export_with_a_loop_running)
    thread.start()
    thread.join(timeout=120)
    assert outcome == {"hidden": True, "text": expected, "usable": True}  # usable: no helper ended its session
