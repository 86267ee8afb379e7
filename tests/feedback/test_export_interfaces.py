"""The three ways out (selector, command, API) give the same rows; Parquet round trip; the command's errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from django.core.management import CommandError, call_command
from rest_framework.test import APIClient

from feedback.models import Membership
from feedback.selectors.preferences import PreferenceExportOptions, preference_rows
from feedback.services.exports import export_jsonl_chunks, export_schema
from tests.factories import (
    CompletionFactory,
    MembershipFactory,
    ModelVersionFactory,
    ProjectFactory,
    PromptFactory,
    UserFactory,
)
from tests.feedback.export_helpers import bulk_rankings, compare, fast_password_hashing, make_prompt, rank

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _fast_hashing(settings):
    fast_password_hashing(settings)


@pytest.fixture
def project():
    """Rankings with ties and disagreement, pairwise judgements, a multi-turn prompt, non-ASCII text."""
    project = ProjectFactory(slug="gamma")
    one, two = UserFactory(username="one"), UserFactory(username="two")
    for _ in range(6):
        prompt, (a, b, c, d) = make_prompt(project)
        rank(one, prompt, [[a], [b, c], [d]])
        rank(two, prompt, [[b], [a], [d], [c]])
    prompt = PromptFactory(
        project=project,
        messages=[{"role": "system", "content": "Réponds en français."}, {"role": "user", "content": "Bonjour ?"}],
    )
    x = CompletionFactory(prompt=prompt, text="Bonjour ! Comment puis-je aider ?")
    y = CompletionFactory(prompt=prompt, text="Salut.")
    compare(one, x, y, "b", strength="clear", rationale="plus précis", time_ms=900)
    compare(two, y, x, "tie")
    return project


VARIANTS = [
    {"format": "dpo"},
    {"format": "dpo", "conversational": True, "pairs": "adjacent", "min_agreement": 0.6},
    {"format": "grpo"},
    {"format": "grpo", "conversational": True},
    {"format": "judgements", "pseudonymise": True},
    {"format": "judgements", "conversational": True, "split": "test", "test_fraction": 0.5},
]


def command_args(options: dict) -> list[str]:
    args = ["--format", options["format"]]
    if options.get("conversational"):
        args.append("--conversational")
    if "pairs" in options:
        args += ["--pairs", options["pairs"]]
    if "min_agreement" in options:
        args += ["--min-agreement", str(options["min_agreement"])]
    if "split" in options:
        args += ["--split", options["split"], "--test-fraction", str(options["test_fraction"])]
    if options.get("pseudonymise"):
        args.append("--pseudonymise")
    return args


@pytest.mark.parametrize("options", VARIANTS, ids=lambda o: "-".join(str(v) for v in o.values()))
def test_selector_command_and_api_give_the_same_rows(project, options, tmp_path, staff_user):
    expected = list(preference_rows(project=project, options=PreferenceExportOptions(**options)))
    assert expected

    jsonl, parquet = tmp_path / "out.jsonl", tmp_path / "out.parquet"
    call_command("export_preferences", "gamma", *command_args(options), "--out", str(jsonl))
    call_command("export_preferences", "gamma", *command_args(options), "--out", str(parquet))
    assert [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines()] == expected
    table = pq.read_table(parquet)
    assert table.schema.equals(export_schema(options=PreferenceExportOptions(**options)))
    assert table.to_pylist() == expected

    client = APIClient()
    client.force_login(staff_user)
    query = {k: str(v).lower() if isinstance(v, bool) else v for k, v in options.items()}
    response = client.get("/api/v1/projects/gamma/export/", query)
    assert response.status_code == 200
    assert [json.loads(line) for line in b"".join(response.streaming_content).splitlines()] == expected


def test_conversational_parquet_holds_message_structs(project, tmp_path):
    out = tmp_path / "conv.parquet"
    call_command("export_preferences", "gamma", "--format", "dpo", "--conversational", "--out", str(out))
    schema = pq.read_schema(out)
    assert str(schema.field("prompt").type) == "list<element: struct<role: string, content: string>>"
    assert str(schema.field("chosen").type) == str(schema.field("prompt").type)


def test_command_filters_by_annotator_and_model_version(project, tmp_path):
    out = tmp_path / "one.jsonl"
    call_command("export_preferences", "gamma", "--format", "judgements", "--annotator", "two", "--out", str(out))
    two = UserFactory(username="two")
    assert {json.loads(line)["annotator"] for line in out.read_text().splitlines()} == {str(two.pk)}
    version = ModelVersionFactory(project=project, name="v7")
    call_command("export_preferences", "gamma", "--format", "dpo", "--model-version", "v7", "--out", str(out))
    assert out.read_text() == ""
    assert version.completions.count() == 0


def test_empty_parquet_export_still_has_the_schema(tmp_path):
    ProjectFactory(slug="empty")
    out = tmp_path / "empty.parquet"
    call_command("export_preferences", "empty", "--format", "grpo", "--out", str(out))
    table = pq.read_table(out)
    assert table.num_rows == 0 and "rewards" in table.schema.names


@pytest.mark.parametrize(
    "args, message",
    [
        (["nosuch", "--format", "dpo", "--out", "{tmp}/x.jsonl"], "no project with the slug 'nosuch'"),
        (["gamma", "--format", "dpo", "--out", "{tmp}/x.csv"], "must end in .jsonl or .parquet"),
        (["gamma", "--format", "dpo", "--out", "{tmp}/missing/x.jsonl"], "no such directory"),
        (["gamma", "--format", "dpo", "--out", "{tmp}"], "must end in .jsonl or .parquet"),
        (["gamma", "--format", "dpo", "--min-agreement", "1.5", "--out", "{tmp}/x.jsonl"], "--min-agreement"),
        (["gamma", "--format", "dpo", "--test-fraction", "0", "--split", "test", "--out", "{tmp}/x.jsonl"], "--test"),
        (["gamma", "--format", "dpo", "--annotator", "ghost", "--out", "{tmp}/x.jsonl"], "no user named 'ghost'"),
        (["gamma", "--format", "dpo", "--model-version", "v99", "--out", "{tmp}/x.jsonl"], "no version 'v99'"),
        (
            ["gamma", "--format", "dpo", "--since", "2026-02-01", "--until", "2026-01-01", "--out", "{tmp}/x.jsonl"],
            "--",
        ),
    ],
)
def test_command_errors_name_the_problem(project, tmp_path, args, message):
    with pytest.raises(CommandError, match=message.replace("(", r"\(").replace(".", r"\.")):
        call_command("export_preferences", *[a.format(tmp=tmp_path) for a in args])
    assert not list(tmp_path.glob("**/*.part"))


def test_command_refuses_a_directory_it_cannot_write_in(project, tmp_path):
    # Under a regular file nobody can write, root included (a read-only mode would not stop root).
    (tmp_path / "out").mkdir()
    plain = tmp_path / "out" / "notes.txt"
    plain.write_text("kept")
    with pytest.raises(CommandError, match="notes.txt: is not a directory, so nothing can be written in it"):
        call_command("export_preferences", "gamma", "--format", "dpo", "--out", str(plain / "x.jsonl"))
    assert [p.name for p in plain.parent.iterdir()] == ["notes.txt"] and plain.read_text() == "kept"


def test_command_reports_file_system_errors_without_a_traceback(project, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("feedback.services.exports.tempfile.mkstemp", refuse)
    with pytest.raises(CommandError, match="Permission denied"):
        call_command("export_preferences", "gamma", "--format", "dpo", "--out", str(tmp_path / "x.jsonl"))


def test_command_refuses_a_path_where_the_file_would_be_a_directory(project, tmp_path):
    (tmp_path / "taken.jsonl").mkdir()
    with pytest.raises(CommandError, match="is a directory"):
        call_command("export_preferences", "gamma", "--format", "dpo", "--out", str(tmp_path / "taken.jsonl"))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--format", "csv", "--out", "x.jsonl"], "invalid choice: 'csv'"),
        (["--format", "dpo", "--out", "x.txt"], "must end in .jsonl or .parquet"),
    ],
)
def test_command_line_errors_exit_non_zero_without_a_traceback(tmp_path, args, message):
    manage = Path(__file__).resolve().parents[2] / "manage.py"
    result = subprocess.run(
        [sys.executable, str(manage), "export_preferences", "gamma", *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "RANKWISE_DATA_DIR": str(tmp_path)},
        timeout=120,
    )
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_manager_gets_the_same_stream_as_staff(project):
    manager = MembershipFactory(project=project, role=Membership.Role.MANAGER).user
    client = APIClient()
    client.force_login(manager)
    response = client.get("/api/v1/projects/gamma/export/?format=grpo")
    rows = [json.loads(line) for line in b"".join(response.streaming_content).splitlines()]
    assert rows == list(preference_rows(project=project, options=PreferenceExportOptions(format="grpo")))


AWKWARD_TEXTS = [
    'quote " and \\ backslash',
    "line\nbreak\ttab\r",
    "control \x01\x1f del \x7f",
    "ünï ✓ 中文 😀 𝄞",
    "a\u2028b",
    "",
]


@pytest.mark.parametrize("options", [*VARIANTS, {"format": "dpo", "pairs": "best_vs_rest"}], ids=str)
def test_jsonl_lines_are_exactly_what_json_writes(project, options):
    # Not NUL: the import refuses it, and PostgreSQL cannot store it in text or JSON.
    prompt = PromptFactory(project=project, messages=[{"role": "user", "content": '\\ " ✓ \x02?'}])
    awkward = [CompletionFactory(prompt=prompt, text=text) for text in AWKWARD_TEXTS]
    rank(UserFactory(), prompt, [[c] for c in awkward])
    rank(UserFactory(), prompt, [awkward[3:], awkward[:3]])
    rows = list(preference_rows(project=project, options=PreferenceExportOptions(**options)))
    if "split" not in options:
        assert prompt.pk in {row["prompt_id"] for row in rows}
    text = "".join(export_jsonl_chunks(rows=rows))
    assert text == "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def test_jsonl_chunks_end_on_whole_lines():
    project = ProjectFactory()
    bulk_rankings(project, prompts=200, annotators=[UserFactory(), UserFactory()])
    rows = list(preference_rows(project=project, options=PreferenceExportOptions()))
    chunks = list(export_jsonl_chunks(rows=rows))
    assert len(rows) == 1200 and len(chunks) == 2
    assert all(chunk.endswith("\n") for chunk in chunks)
    assert "".join(chunks) == "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    assert list(export_jsonl_chunks(rows=[])) == []


def test_an_exported_file_has_the_permissions_of_a_new_file(project, tmp_path):
    out = tmp_path / "perm.jsonl"
    call_command("export_preferences", "gamma", "--format", "dpo", "--out", str(out))
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask
    assert not list(tmp_path.glob(".*.part"))
