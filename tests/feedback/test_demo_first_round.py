"""The demo ships a first round the default model wrote, so a newcomer has tasks before the worker has any."""

import json
import re

import pytest
from django.contrib.auth import get_user_model
from django.core.management import CommandError, call_command
from django.test import Client
from django.urls import reverse

from feedback.models import Completion, Project, Round
from feedback.services import demo
from feedback.services.demo import (
    DEMO_K,
    DEMO_MAX_NEW_TOKENS,
    FIRST_ROUND_WRITER,
    DemoSeedError,
    demo_first_round_records,
    demo_prompt_records,
    demo_seed,
)
from feedback.services.generation import completions_generate

pytestmark = pytest.mark.django_db

SHIPPED = demo.DEMO_FIRST_ROUND


def _client(username: str) -> Client:
    client = Client()
    client.force_login(get_user_model().objects.get(username=username))
    return client


def test_the_shipped_file_holds_k_completions_per_prompt_each_marked_with_its_writer():
    records = demo_first_round_records()
    prompts = {record["id"]: record for record in demo_prompt_records()}
    assert len(records) == 8
    assert {prompts[record["id"]]["metadata"]["topic"] for record in records} == set(
        record["metadata"]["topic"] for record in prompts.values()
    )
    for record in records:
        assert record["prompt"] == prompts[record["id"]]["prompt"]
        assert len(record["completions"]) == DEMO_K
        for completion in record["completions"]:
            assert completion["text"].strip() and completion["model"] == FIRST_ROUND_WRITER
            params = completion["generation_params"]
            assert params["model"] == "SmolLM2-135M-Instruct" and params["shipped"] is True
            assert isinstance(params["seed"], int)
            assert (params["temperature"], params["top_p"], params["max_new_tokens"]) == (
                0.8,
                0.95,
                DEMO_MAX_NEW_TOKENS,
            )
            assert params["truncated"] == (params["new_tokens"] == DEMO_MAX_NEW_TOKENS)


def test_the_command_writes_a_file_the_seed_reads(settings, monkeypatch, tmp_path, tiny_model_dir):
    settings.DEFAULT_MODEL_DIR = tiny_model_dir
    out = tmp_path / "first_round.jsonl"
    call_command("demo_first_round", "--prompts", "5", "--seed", "3", "--out", str(out))
    monkeypatch.setattr(demo, "DEMO_FIRST_ROUND", out)
    records = demo_first_round_records()
    assert [record["metadata"]["topic"] for record in records] == ["coding", "facts", "writing", "advice", "multi-turn"]
    params = records[0]["completions"][0]["generation_params"]
    assert (params["model"], params["seed"], params["max_new_tokens"]) == (tiny_model_dir.name, 3, DEMO_MAX_NEW_TOKENS)
    assert Completion.objects.filter(prompt__project=demo_seed().project).count() == 5 * DEMO_K


def test_after_seeding_an_annotator_is_served_a_shipped_task_at_once_with_no_worker():
    demo_seed()
    shipped = {c["text"] for record in demo_first_round_records() for c in record["completions"]}
    alice = _client("alice")

    answer = alice.get("/api/v1/projects/demo/next-task/")
    assert answer.status_code == 200
    task = answer.json()
    assert len(task["completions"]) == DEMO_K
    assert {completion["text"] for completion in task["completions"]} <= shipped

    page = alice.get(reverse("annotate", args=["demo"])).content.decode()
    assert all(completion["html"] in page for completion in task["completions"])
    # the page holds the task on screen and the one prefetched behind it
    shown = Completion.objects.filter(pk__in=re.findall(r'data-completion-id="(\d+)"', page))
    assert shown.count() == 2 * DEMO_K and {c.source_model for c in shown} == {FIRST_ROUND_WRITER}
    cut = shown.filter(generation_params__truncated=True).count()
    assert cut and page.count(f"cut at {DEMO_MAX_NEW_TOKENS} tokens") == cut


def test_the_shipped_round_is_recorded_as_imported_and_shown_to_staff_as_shipped():
    seed = demo_seed()
    shipped = Round.objects.get(project=seed.project)
    assert (shipped.number, shipped.strategy, shipped.status) == (1, Round.Strategy.IMPORTED, Round.Status.DONE)
    assert shipped.writers == [FIRST_ROUND_WRITER] and shipped.prompts_written == 8
    completions = Completion.objects.filter(round=shipped)
    assert completions.count() == 8 * DEMO_K
    assert {(c.model_version_id, c.source_model) for c in completions} == {(None, FIRST_ROUND_WRITER)}
    assert all(c.generation_params["shipped"] and "new_tokens" in c.generation_params for c in completions)
    assert completions.filter(generation_params__truncated=True).exists()

    rounds = _client("admin").get(reverse("training", args=["demo"])).content.decode()
    assert FIRST_ROUND_WRITER in rounds and "Completions that came with imported prompts" in rounds


def test_the_round_the_seed_queues_writes_only_the_other_prompts(
    queue, tiny_model_dir, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True):
        call_command("seed_demo")
    project = Project.objects.get(slug="demo")
    assert queue.args("generate_completions_task") == [(project.pk,)]
    shipped_ids = {record["id"] for record in demo_first_round_records()}
    Project.objects.filter(pk=project.pk).update(base_model=str(tiny_model_dir), max_new_tokens=4)
    project.refresh_from_db()

    completions_generate(project=project)  # what the queued task runs

    written = Round.objects.get(project=project, number=2)
    chosen = set(project.prompts.filter(pk__in=written.prompt_ids).values_list("external_id", flat=True))
    assert chosen == {record["id"] for record in demo_prompt_records()} - shipped_ids
    assert written.prompts_written == 62 - len(shipped_ids) and written.writers == ["base"]
    assert not Completion.objects.filter(round=written, prompt__external_id__in=shipped_ids).exists()


def _ship(monkeypatch, tmp_path, lines: list[str]):
    path = tmp_path / "first_round.jsonl"
    path.write_text("\n".join(lines) + "\n")
    monkeypatch.setattr(demo, "DEMO_FIRST_ROUND", path)
    return path


def _shipped_lines() -> list[str]:
    return SHIPPED.read_text().splitlines()


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda record: {**record, "completions": record["completions"][:3]}, "must have 4 completions"),
        (
            lambda record: {**record, "completions": [{**c, "model": "gpt"} for c in record["completions"]]},
            "completions[0].model must be",
        ),
        (lambda record: {**record, "prompt": "Something else"}, "differs from prompts.jsonl"),
        (lambda record: {**record, "id": "demo-999"}, "'demo-999' is not a prompt of prompts.jsonl"),
    ],
)
def test_a_bad_shipped_file_is_an_error_naming_it_and_its_line_and_nothing_is_written(
    monkeypatch, tmp_path, change, problem
):
    lines = _shipped_lines()
    lines[1] = json.dumps(change(json.loads(lines[1])))
    path = _ship(monkeypatch, tmp_path, lines)
    with pytest.raises(DemoSeedError, match="line 2") as raised:
        demo_seed()
    assert str(path) in str(raised.value) and problem in str(raised.value)
    assert not Project.objects.exists() and not get_user_model().objects.exists()


def test_a_missing_or_unreadable_shipped_file_is_an_error_naming_it(monkeypatch, tmp_path):
    missing = tmp_path / "first_round.jsonl"
    monkeypatch.setattr(demo, "DEMO_FIRST_ROUND", missing)
    with pytest.raises(DemoSeedError, match=f"{missing}: cannot be read"):
        demo_seed()
    path = _ship(monkeypatch, tmp_path, [_shipped_lines()[0], "{not json"])
    with pytest.raises(DemoSeedError, match=f"{path} line 2: not valid JSON"):
        demo_seed()
    _ship(monkeypatch, tmp_path, [""])
    with pytest.raises(DemoSeedError, match="holds no prompts"):
        demo_seed()
    assert not Project.objects.exists()


def test_seed_demo_names_a_bad_shipped_file_in_one_line(monkeypatch, tmp_path):
    missing = tmp_path / "first_round.jsonl"
    monkeypatch.setattr(demo, "DEMO_FIRST_ROUND", missing)
    with pytest.raises(CommandError, match=f"^{missing}: cannot be read"):
        call_command("seed_demo")
    assert not Project.objects.exists()
