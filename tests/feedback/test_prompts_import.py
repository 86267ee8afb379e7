import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from feedback.models import Completion, Project, Prompt
from feedback.rendering import markdown_to_safe_html
from feedback.services.prompts import (
    PromptImportError,
    prompts_import_csv,
    prompts_import_jsonl,
    prompts_import_records,
)
from tests.factories import ProjectFactory, PromptFactory, UserFactory

pytestmark = pytest.mark.django_db
ROOT = Path(__file__).resolve().parents[2]


def write_jsonl(path: Path, *records) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return path


def test_string_prompts_and_message_lists_import_with_their_completions(tmp_path):
    file = write_jsonl(
        tmp_path / "prompts.jsonl",
        {
            "prompt": "How do I reverse a list in Python?",
            "completions": ["Use reversed(xs) or xs[::-1].", {"text": "Call xs.reverse().", "model": "some-model"}],
            "id": "q-17",
            "metadata": {"topic": "python"},
        },
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]},
    )
    call_command("import_prompts", "new-project", str(file), "--mode", "pairwise", "--k", "2")

    project = Project.objects.get(slug="new-project")
    assert (project.mode, project.completions_per_prompt) == ("pairwise", 2)
    first, second = Prompt.objects.filter(project=project).order_by("id")
    assert first.messages == [{"role": "user", "content": "How do I reverse a list in Python?"}]
    assert (first.external_id, first.metadata) == ("q-17", {"topic": "python"})
    assert [(c.text, c.source_model) for c in first.completions.order_by("id")] == [
        ("Use reversed(xs) or xs[::-1].", ""),
        ("Call xs.reverse().", "some-model"),
    ]
    assert first.completions.first().html == "<p>Use reversed(xs) or xs[::-1].</p>\n"
    assert second.messages[0] == {"role": "system", "content": "Be brief."}
    assert not second.completions.exists()


def test_csv_with_prompt_and_completion_columns(tmp_path):
    file = tmp_path / "prompts.csv"
    file.write_text(
        'prompt,completion_1,completion_2,id,topic\n"Say hi, please",Hi!,Hello.,c-1,greeting\nSay bye,,,,\n'
    )
    call_command("import_prompts", "csv-project", str(file))
    prompts = list(Prompt.objects.filter(project__slug="csv-project").order_by("id"))
    assert [p.messages[0]["content"] for p in prompts] == ["Say hi, please", "Say bye"]
    assert prompts[0].external_id == "c-1"
    assert prompts[0].metadata == {"topic": "greeting"}
    assert sorted(prompts[0].completions.values_list("text", flat=True)) == ["Hello.", "Hi!"]
    assert prompts[1].completions.count() == 0


BAD_LINES = [
    ("{not json", "line 2", "not valid JSON"),
    (json.dumps(["a list"]), "line 2", "must be a JSON object"),
    (json.dumps({"completions": ["x"]}), "line 2, field 'prompt'", "missing"),
    (json.dumps({"prompt": 42}), "line 2, field 'prompt'", "string or a list"),
    (json.dumps({"prompt": "   "}), "line 2, field 'prompt'", "empty"),
    (json.dumps({"prompt": []}), "line 2, field 'prompt'", "no messages"),
    (json.dumps({"prompt": [{"role": "robot", "content": "hi"}]}), "field 'prompt[0].role'", "one of system"),
    (json.dumps({"prompt": [{"role": "user", "content": 3}]}), "field 'prompt[0].content'", "must be a string"),
    (
        json.dumps({"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}),
        "field 'prompt[1].role'",
        "end with a user turn",
    ),
    (json.dumps({"prompt": "q", "completions": "not a list"}), "field 'completions'", "must be a list"),
    (json.dumps({"prompt": "q", "completions": ["ok", ""]}), "field 'completions[1]'", "empty"),
    (json.dumps({"prompt": "q", "completions": [{"model": "m"}]}), "field 'completions[0].text'", "must be a string"),
    (json.dumps({"prompt": "q", "metadata": [1]}), "field 'metadata'", "must be an object"),
    (json.dumps({"prompt": "q", "id": {"x": 1}}), "field 'id'", "must be a string"),
    (json.dumps({"prompt": "q", "id": "dup"}), "field 'id'", "repeats line 1"),
    (json.dumps({"prompt": "q", "colour": "red"}), "field 'colour'", "not a known field"),
]


@pytest.mark.parametrize(("bad_line", "where", "why"), BAD_LINES)
def test_each_kind_of_bad_line_is_named_and_nothing_is_written(tmp_path, bad_line, where, why):
    file = write_jsonl(tmp_path / "bad.jsonl", {"prompt": "fine", "id": "dup", "completions": ["a"]}, bad_line)
    with pytest.raises(CommandError) as raised:
        call_command("import_prompts", "fresh", str(file))
    message = str(raised.value)
    assert where in message and why in message
    assert "nothing was imported" in message
    assert not Project.objects.filter(slug="fresh").exists()
    assert Prompt.objects.count() == 0 and Completion.objects.count() == 0


def test_a_bad_file_into_an_existing_project_keeps_what_was_stored(tmp_path):
    project = ProjectFactory(slug="kept")
    PromptFactory(project=project, external_id="q-1")
    file = write_jsonl(tmp_path / "bad.jsonl", {"prompt": "new one"}, {"prompt": "again", "id": "q-1"})
    with pytest.raises(CommandError, match="line 2, field 'id': 'q-1' is already in project kept"):
        call_command("import_prompts", "kept", str(file))
    assert list(project.prompts.values_list("external_id", flat=True)) == ["q-1"]


def test_every_problem_is_reported_not_only_the_first():
    records = [{"prompt": ""}, {"prompt": "ok"}, {"prompt": None}, "text"]
    with pytest.raises(PromptImportError) as raised:
        prompts_import_records(project=ProjectFactory(), records=records)
    assert [(p.line, p.field) for p in raised.value.problems] == [(1, "prompt"), (3, "prompt"), (4, "")]


def test_blank_lines_are_skipped_and_an_empty_file_is_an_error():
    project = ProjectFactory()
    result = prompts_import_jsonl(project=project, lines=['{"prompt": "a"}', "", "  ", '{"prompt": "b"}'])
    assert (result.prompts, result.completions) == (2, 0)
    with pytest.raises(PromptImportError, match="no prompts"):
        prompts_import_jsonl(project=project, lines=["", "\n"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["p", "missing.jsonl"], "no such file"),
        (["p", "prompts.txt"], "expected a .jsonl or .csv file"),
        (["Not A Slug", "ok.jsonl"], "not a valid project slug"),
        (["p", "ok.jsonl", "--k", "1"], "between 2 and 16"),
        (["existing", "ok.jsonl", "--mode", "pairwise"], "is in ranking mode"),
    ],
)
def test_bad_command_arguments_are_clear_errors(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "ok.jsonl", {"prompt": "hello"})
    (tmp_path / "prompts.txt").write_text("hello")
    ProjectFactory(slug="existing", mode="ranking")
    with pytest.raises(CommandError, match=message):
        call_command("import_prompts", *args)
    assert Prompt.objects.count() == 0


def test_csv_without_a_prompt_column_and_non_utf8_input(tmp_path):
    file = tmp_path / "x.csv"
    file.write_text("question,answer\nhi,there\n")
    with pytest.raises(CommandError, match="no 'prompt' column"):
        call_command("import_prompts", "p", str(file))
    file.write_bytes(b"prompt\n\xff\xfe bad\n")
    with pytest.raises(CommandError, match="not UTF-8"):
        call_command("import_prompts", "p", str(file))
    jsonl = tmp_path / "x.jsonl"
    jsonl.write_bytes(b'{"prompt": "\xff"}\n')
    with pytest.raises(CommandError, match="line 1: is not valid UTF-8"):
        call_command("import_prompts", "p", str(jsonl))
    assert not Project.objects.exists()


def test_the_command_exits_non_zero_without_a_traceback(tmp_path):
    file = write_jsonl(
        tmp_path / "bad.jsonl",
        {"prompt": "q", "completions": [""]},
        '{"prompt": "q", "metadata": {"score": NaN}}',
        {"prompt": "\ud800"},
        '{"prompt": "q", "id": ' + "1" * 5000 + "}",
    )
    env = {**os.environ, "RANKWISE_DATA_DIR": str(tmp_path / "data")}
    subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], cwd=ROOT, env=env, check=True)
    done = subprocess.run(
        [sys.executable, "manage.py", "import_prompts", "cli-project", str(file)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode != 0
    assert "line 1, field 'completions[0]': is empty" in done.stderr
    assert "line 2: is not valid JSON (NaN is not a JSON number)" in done.stderr
    assert "line 3, field 'prompt': holds a lone surrogate" in done.stderr
    assert "line 4: is not valid JSON (a number has 5,000 digits" in done.stderr
    assert "Traceback" not in done.stderr


def test_large_imports_render_in_worker_processes_with_the_same_result(monkeypatch):
    import feedback.services.prompts as prompts_service

    records = [{"prompt": f"q{i}", "completions": [f"**{i}**", f"```python\nx = {i}\n```"]} for i in range(30)]
    monkeypatch.setattr(prompts_service, "PARALLEL_RENDER_FROM", 1)
    result = prompts_import_records(project=ProjectFactory(), records=records)
    assert result.completions == 60
    for completion in Completion.objects.all():
        assert completion.html == markdown_to_safe_html(completion.text)


SURROGATE = "\ud800"
# (record, field) for every place a string can stand in a record.
SURROGATE_RECORDS = [
    ({"prompt": f"a{SURROGATE}b"}, "prompt"),
    ({"prompt": [{"role": "user", "content": f"hi {SURROGATE}"}]}, "prompt[0].content"),
    ({"prompt": "q", "completions": ["fine", SURROGATE]}, "completions[1]"),
    ({"prompt": "q", "completions": [{"text": f"x{SURROGATE}"}]}, "completions[0].text"),
    ({"prompt": "q", "completions": [{"text": "x", "model": f"m{SURROGATE}"}]}, "completions[0].model"),
    ({"prompt": "q", "id": f"q-{SURROGATE}"}, "id"),
    ({"prompt": "q", "metadata": {"topic": SURROGATE}}, "metadata.topic"),
    ({"prompt": "q", "metadata": {"tags": ["ok", {"deep": SURROGATE}]}}, "metadata.tags[1].deep"),
    ({"prompt": "q", "metadata": {SURROGATE: "value"}}, "metadata key '\\ud800'"),
    ({"prompt": "q", f"extra{SURROGATE}": 1}, "field name"),
]


@pytest.mark.parametrize(("record", "where"), SURROGATE_RECORDS)
def test_a_lone_surrogate_anywhere_is_refused_by_the_command_with_line_and_field(tmp_path, record, where):
    # json.dumps escapes it (\ud800), which is valid JSON; decoded, it is not valid Unicode text.
    file = write_jsonl(tmp_path / "bad.jsonl", {"prompt": "fine"}, record)
    with pytest.raises(CommandError) as raised:
        call_command("import_prompts", "fresh", str(file))
    assert f"line 2, field '{where}': holds a lone surrogate (\\ud800)" in str(raised.value)
    assert not Project.objects.filter(slug="fresh").exists()
    assert Prompt.objects.count() == 0 and Completion.objects.count() == 0


@pytest.mark.parametrize(("record", "where"), SURROGATE_RECORDS)
def test_a_lone_surrogate_anywhere_is_refused_by_the_api(client, record, where):
    project = ProjectFactory(slug="api-import")
    manager = UserFactory(is_staff=True)
    client.force_login(manager)
    # The test client cannot encode a lone surrogate; the body is the escaped JSON a program would send.
    body = json.dumps({"records": [{"prompt": "fine"}, record]})
    response = client.post(f"/api/v1/projects/{project.slug}/prompts/", body, content_type="application/json")
    assert response.status_code == 400
    [problem] = response.json()["problems"]
    assert (problem["line"], problem["field"]) == (2, where)
    assert problem["message"].startswith("holds a lone surrogate (\\ud800) at character ")
    assert Prompt.objects.count() == 0


def test_a_lone_surrogate_in_csv_text_and_a_nul_are_refused():
    project = ProjectFactory()
    lines = ["prompt,completion_1,topic\n", f"ok,fine,{SURROGATE}\n", "q\x00,a,b\n"]
    with pytest.raises(PromptImportError) as raised:
        prompts_import_csv(project=project, lines=lines)
    assert [str(p) for p in raised.value.problems] == [
        "line 2, field 'metadata.topic': holds a lone surrogate (\\ud800) at character 1, "
        "which is not valid Unicode text",
        "line 3, field 'prompt': holds a NUL character (\\u0000) at character 2",
    ]
    assert Prompt.objects.count() == 0


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"prompt": "q", "metadata": {"score": NaN}}', "line 2: is not valid JSON (NaN is not a JSON number)"),
        ('{"prompt": "q", "metadata": {"score": -Infinity}}', "line 2: is not valid JSON (-Infinity is not a JSON"),
        (
            '{"prompt": "q", "metadata": {"score": 1e400}}',
            "line 2, field 'metadata.score': must be a finite number, not inf",
        ),
        (
            '{"prompt": "q", "id": ' + "9" * 5000 + "}",
            "line 2: is not valid JSON (a number has 5,000 digits; at most 4,300 are read)",
        ),
        (
            '{"prompt": "q", "id": ' + str(10**400) + "}",
            "line 2, field 'id': is a number too long for an id; ids have at most 200 characters",
        ),
        ('{"prompt": "q", "metadata": ' + "[" * 100_000 + "]" * 100_000 + "}", "line 2: is nested too deeply"),
        (
            '{"prompt": "q", "metadata": {"a": ' + "[" * 40 + "]" * 40 + "}}",
            "field 'metadata.a" + "[0]" * 31 + "': is nested more than 32 levels deep",
        ),
    ],
)
def test_numbers_and_nesting_json_cannot_store_are_line_errors_not_tracebacks(tmp_path, line, message):
    file = write_jsonl(tmp_path / "bad.jsonl", {"prompt": "fine"}, line)
    with pytest.raises(CommandError) as raised:
        call_command("import_prompts", "fresh", str(file))
    assert message in str(raised.value)
    assert Prompt.objects.count() == 0


def test_a_csv_cell_too_long_for_the_csv_reader_names_its_line_and_the_rest_is_still_read():
    lines = ["prompt,notes\n", "one,ok\n", 'two,"' + "x" * 200_000 + '"\n', "three,\n"]
    with pytest.raises(PromptImportError) as raised:
        prompts_import_csv(project=ProjectFactory(), lines=lines)
    assert [str(p) for p in raised.value.problems] == [
        "line 3: is not valid CSV (field larger than field limit (131072))"
    ]


def test_a_record_from_python_with_a_huge_integer_id_or_a_set_is_refused():
    records = [{"prompt": "q", "id": 10**5000}, {"prompt": "q", "metadata": {"tags": {"a"}}}]
    with pytest.raises(PromptImportError) as raised:
        prompts_import_records(project=ProjectFactory(), records=records)
    assert [(p.line, p.field, p.message) for p in raised.value.problems] == [
        (1, "id", "is a number too long for an id; ids have at most 200 characters"),
        (2, "metadata.tags", "must be JSON (a string, number, true/false, null, list or object), not set"),
    ]


@pytest.mark.parametrize(
    "value", ["NaN", "-Infinity", "1e400", "9" * 5000], ids=["nan", "infinity", "overflow", "5000-digits"]
)
def test_the_api_refuses_numbers_json_cannot_hold(client, value):
    project = ProjectFactory(slug="api-numbers")
    client.force_login(UserFactory(is_staff=True))
    body = '{"records": [{"prompt": "q", "metadata": {"score": ' + value + "}}]}"
    response = client.post(f"/api/v1/projects/{project.slug}/prompts/", body, content_type="application/json")
    assert response.status_code == 400
    [problem] = response.json()["problems"]
    if value == "1e400":  # valid JSON that Python reads as inf, which the body's JSON field refuses
        assert problem == {"line": 0, "field": "records.0", "message": "Value must be valid JSON."}
    else:
        assert (problem["line"], problem["field"]) == (0, "body")
    assert Prompt.objects.count() == 0
