"""The RANKWISE_MAX_* limits on imported prompts: enforced with line and field, checked at start-up."""

import json

import pytest
from django.apps import apps
from django.core.exceptions import ImproperlyConfigured
from django.core.management import CommandError, call_command

from feedback.models import Completion, Prompt
from feedback.services.prompts import PromptImportError, prompts_import_csv, prompts_import_records
from tests.factories import ProjectFactory, UserFactory
from tests.feedback.test_settings import LONG_SECRET, run_python

pytestmark = pytest.mark.django_db


def problems(records) -> list[str]:
    with pytest.raises(PromptImportError) as raised:
        prompts_import_records(project=ProjectFactory(), records=records)
    return [str(p) for p in raised.value.problems]


def test_the_defaults_take_a_long_prompt_and_refuse_what_the_issue_saw():
    ok = {"prompt": "p" * 100_000, "completions": [{"text": "c" * 100_000, "model": "m" * 300}] + ["x"] * 63}
    assert prompts_import_records(project=ProjectFactory(), records=[ok]).completions == 64
    assert problems(
        [
            {"prompt": "p" * 10_000_000},
            {"prompt": "q", "completions": ["c"] * 20_000},
            {"prompt": "q", "completions": [{"text": "c", "model": "m" * 100_000}]},
            {"prompt": "q", "completions": ["c" * 100_001]},
        ]
    ) == [
        "line 1, field 'prompt': is 10,000,000 characters long; at most 100,000 are allowed "
        "(RANKWISE_MAX_PROMPT_CHARS)",
        "line 2, field 'completions': has 20,000 completions; at most 64 are allowed (RANKWISE_MAX_COMPLETIONS)",
        "line 3, field 'completions[0].model': is 100,000 characters long; at most 300 are allowed "
        "(RANKWISE_MAX_MODEL_NAME_CHARS)",
        "line 4, field 'completions[0]': is 100,001 characters long; at most 100,000 are allowed "
        "(RANKWISE_MAX_COMPLETION_CHARS)",
    ]
    assert Prompt.objects.count() == 1


def test_the_prompt_limit_counts_all_of_a_conversations_messages(settings):
    settings.RANKWISE_MAX_PROMPT_CHARS = 10
    conversation = [
        {"role": "system", "content": "x" * 6},
        {"role": "user", "content": "y" * 5},
    ]
    assert problems([{"prompt": conversation}]) == [
        "line 1, field 'prompt': has more than 10 characters in its messages (RANKWISE_MAX_PROMPT_CHARS)"
    ]
    conversation[0]["content"] = "x" * 5
    assert prompts_import_records(project=ProjectFactory(), records=[{"prompt": conversation}]).prompts == 1


def test_lowered_limits_hold_for_the_command_and_csv(settings, tmp_path):
    settings.RANKWISE_MAX_COMPLETIONS = 2
    settings.RANKWISE_MAX_COMPLETION_CHARS = 5
    file = tmp_path / "p.jsonl"
    file.write_text(json.dumps({"prompt": "q", "completions": ["a", "b", "c"]}) + "\n")
    with pytest.raises(CommandError, match=r"line 1, field 'completions': has 3 completions; at most 2 are allowed"):
        call_command("import_prompts", "limits", str(file))
    with pytest.raises(PromptImportError) as raised:
        prompts_import_csv(project=ProjectFactory(), lines=["prompt,completion_1\n", "q,toolong\n"])
    assert [(p.line, p.field) for p in raised.value.problems] == [(2, "completions[0]")]
    assert Prompt.objects.count() == 0 and Completion.objects.count() == 0


def test_an_api_body_over_the_upload_limit_is_413_before_it_is_read(client, settings):
    settings.RANKWISE_MAX_UPLOAD_BYTES = 1_000
    project = ProjectFactory(slug="small-uploads")
    client.force_login(UserFactory(is_staff=True))
    url = f"/api/v1/projects/{project.slug}/prompts/"
    fits = json.dumps({"records": [{"prompt": "q" * 900}]})
    assert client.post(url, fits, content_type="application/json").status_code == 201
    too_big = json.dumps({"records": [{"prompt": "q" * 1_000}]})
    response = client.post(url, too_big, content_type="application/json")
    assert response.status_code == 413
    assert response.json() == {
        "detail": "Nothing was imported: the body is larger than 1,000 bytes (RANKWISE_MAX_UPLOAD_BYTES); "
        "send the records in smaller parts.",
        "problems": [
            {"line": 0, "field": "body", "message": "the body is larger than 1,000 bytes (RANKWISE_MAX_UPLOAD_BYTES)"}
        ],
    }
    assert Prompt.objects.count() == 1


def test_an_api_import_larger_than_djangos_request_body_limit_is_read(client, settings):
    # 40 prompts of 90,000 characters: 3.6 MB, over Django's 2.5 MB DATA_UPLOAD_MAX_MEMORY_SIZE.
    project = ProjectFactory(slug="big-upload")
    client.force_login(UserFactory(is_staff=True))
    body = json.dumps({"records": [{"prompt": f"{i} " + "q" * 90_000} for i in range(40)]})
    assert len(body) > settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    response = client.post(f"/api/v1/projects/{project.slug}/prompts/", body, content_type="application/json")
    assert response.status_code == 201
    assert response.json() == {"prompts": 40, "completions": 0}
    assert project.prompts.count() == 40


def test_a_model_name_limit_beyond_its_column_stops_start_up(settings):
    settings.RANKWISE_MAX_MODEL_NAME_CHARS = 301
    with pytest.raises(
        ImproperlyConfigured,
        match=r"RANKWISE_MAX_MODEL_NAME_CHARS must be at most 300 \(the length of Completion.source_model\), not 301",
    ):
        apps.get_app_config("feedback").ready()
    settings.RANKWISE_MAX_MODEL_NAME_CHARS = 300
    apps.get_app_config("feedback").ready()


LIMITS = {
    "RANKWISE_MAX_PROMPT_CHARS": 100_000,
    "RANKWISE_MAX_COMPLETION_CHARS": 100_000,
    "RANKWISE_MAX_COMPLETIONS": 64,
    "RANKWISE_MAX_MODEL_NAME_CHARS": 300,
    "RANKWISE_MAX_UPLOAD_BYTES": 50 * 1024 * 1024,
}
SETUP = (
    "import django, os; os.environ['DJANGO_SETTINGS_MODULE']='config.settings'; django.setup(); "
    "from django.conf import settings; print(*(getattr(settings, n) for n in {names}))"
)


def test_the_limits_have_defaults_and_overrides(tmp_path):
    base = {"SECRET_KEY": LONG_SECRET, "RANKWISE_DATA_DIR": str(tmp_path)}
    show = SETUP.format(names=list(LIMITS))
    assert run_python(show, **base).stdout.split() == [str(v) for v in LIMITS.values()]
    assert run_python(show, **base, **dict.fromkeys(LIMITS, "20")).stdout.split() == ["20"] * len(LIMITS)


# One process a limit, each with a different kind of wrong value.
@pytest.mark.parametrize(("name", "wrong"), list(zip(LIMITS, ["0", "ten", "-5", "²", "1e6"], strict=True)))
def test_a_wrong_limit_stops_start_up_naming_it(tmp_path, name, wrong):
    done = run_python(
        SETUP.format(names=[name]), SECRET_KEY=LONG_SECRET, RANKWISE_DATA_DIR=str(tmp_path), **{name: wrong}
    )
    assert done.returncode != 0
    assert f"ImproperlyConfigured: {name} must be a whole number of at least 1, not {wrong!r}" in done.stderr


def test_a_model_name_limit_over_the_column_is_refused_when_the_app_starts(tmp_path):
    done = run_python(
        SETUP.format(names=["RANKWISE_MAX_MODEL_NAME_CHARS"]),
        SECRET_KEY=LONG_SECRET,
        RANKWISE_DATA_DIR=str(tmp_path),
        RANKWISE_MAX_MODEL_NAME_CHARS="1000",
    )
    assert done.returncode != 0
    assert "RANKWISE_MAX_MODEL_NAME_CHARS must be at most 300" in done.stderr
