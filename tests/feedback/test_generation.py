import shutil

import pytest
from django.core.management import CommandError, call_command

from feedback.models import Completion, Round, RoundPrompt
from feedback.services.generation import GenerationError, completions_generate, generation_schedule_tick
from feedback.tasks import generate_completions_task
from tests.factories import CompletionFactory, ModelVersionFactory, ProjectFactory, PromptFactory
from training.generate import Sample

pytestmark = pytest.mark.django_db


@pytest.fixture
def project(tiny_model_dir):
    return ProjectFactory(slug="gen", base_model=str(tiny_model_dir), completions_per_prompt=3, max_new_tokens=8)


def test_prompts_no_round_answered_get_k_each_in_a_new_round_recorded_with_their_model(project, tiny_model_dir):
    empty, other_empty = PromptFactory.create_batch(2, project=project)
    full = PromptFactory(project=project)
    CompletionFactory.create_batch(3, prompt=full)

    result = completions_generate(project=project)

    assert (result.prompts, result.completions) == (2, 6)
    assert [empty.completions.count(), other_empty.completions.count(), full.completions.count()] == [3, 3, 3]
    second = Round.objects.get(project=project, number=2)
    assert (second.status, second.writers, second.prompt_ids) == ("done", ["base"], [empty.pk, other_empty.pk])
    assert set(Completion.objects.filter(prompt__in=[empty, other_empty]).values_list("round", flat=True)) == {
        second.pk
    }
    assert sorted(RoundPrompt.objects.filter(round=second).values_list("prompt_id", flat=True)) == [
        empty.pk,
        other_empty.pk,
    ]
    written = Completion.objects.filter(prompt=empty).first()
    assert written.source_model == str(tiny_model_dir) and written.model_version is None
    params = written.generation_params
    assert {k: params[k] for k in ("temperature", "top_p", "max_new_tokens")} == {
        "temperature": 0.8,
        "top_p": 0.95,
        "max_new_tokens": 8,
    }
    # the tiny random model never writes EOS within 8 tokens: every answer is cut at the limit
    assert (params["new_tokens"], params["truncated"]) == (8, True)
    assert written.html  # rendered and sanitised at creation
    assert completions_generate(project=project).completions == 0  # nothing left to do
    assert Round.objects.filter(project=project).count() == 2


def test_the_active_version_writes_and_is_recorded(project, tiny_model_dir, settings):
    weights = settings.MODEL_VERSIONS_DIR / "gen" / "v1"
    shutil.copytree(tiny_model_dir, weights)
    version = ModelVersionFactory(project=project, name="v1", weights_path="gen/v1", is_active=True)
    prompt = PromptFactory(project=project)
    completions_generate(project=project, k=2)
    assert [(c.model_version, c.source_model) for c in prompt.completions.all()] == [(version, "")] * 2


def test_a_version_pointing_outside_the_versions_folder_is_refused(project):
    ModelVersionFactory(project=project, name="v1", weights_path="../../etc", is_active=True)
    PromptFactory(project=project)
    with pytest.raises(GenerationError, match="points outside"):
        completions_generate(project=project)


def test_prompt_limit_and_progress(project):
    PromptFactory.create_batch(3, project=project)
    seen = []
    result = completions_generate(
        project=project, prompt_limit=2, k=2, first_batch=1, batch_size=1, progress=lambda d, t: seen.append((d, t))
    )
    assert result.prompts == 2 and Completion.objects.count() == 4
    assert seen == [(1, 2), (2, 2)]


def test_the_first_prompts_are_committed_in_a_small_batch_before_the_rest_are_written(project):
    prompts = PromptFactory.create_batch(7, project=project)
    committed = []

    def progress(done, total):
        # what an annotator's next-task would see at this moment: prompts that have their K
        ready = [p.pk for p in prompts if p.completions.count() == 3]
        committed.append((done, total, ready))

    completions_generate(project=project, first_batch=2, batch_size=4, progress=progress)
    ids = [p.pk for p in prompts]
    assert committed == [(2, 7, ids[:2]), (6, 7, ids[:6]), (7, 7, ids)]


def test_an_unloadable_model_is_a_clear_error_and_writes_nothing(project, tmp_path):
    project.base_model = str(tmp_path / "no-such-model")
    project.save()
    PromptFactory(project=project)
    with pytest.raises(GenerationError, match="no-such-model"):
        completions_generate(project=project)
    assert not Completion.objects.exists()


def test_generate_command_writes_here_with_sync_and_queues_otherwise(
    project, queue, django_capture_on_commit_callbacks
):
    PromptFactory.create_batch(2, project=project)
    with django_capture_on_commit_callbacks(execute=True):
        call_command("generate", "gen", "--prompts", "1", "--k", "2", "--sync")
    assert Completion.objects.count() == 2 and queue.args("generate_completions_task") == []
    queue.run_with("generate_completions_task", generate_completions_task.call_local)
    with django_capture_on_commit_callbacks(execute=True):
        call_command("generate", "gen")
    assert queue.args("generate_completions_task") == [(project.pk, None, None, False)]
    assert Completion.objects.count() == 2 + 3


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nope", "--sync"], "no project 'nope'"),
        (["gen", "--prompts", "0", "--sync"], "--prompts must be at least 1, not 0"),
        (["gen", "--k", "40", "--sync"], "--k must be between 1 and 16"),
    ],
)
def test_generate_command_bad_input(project, args, message):
    with pytest.raises(CommandError, match=message):
        call_command("generate", *args)


def test_a_project_whose_queue_runs_low_gets_its_next_round(project, django_capture_on_commit_callbacks):
    judged = PromptFactory(project=project)
    CompletionFactory.create_batch(3, prompt=judged)  # one ranking item still wanted: 1 judgement left
    waiting = PromptFactory.create_batch(3, project=project)

    assert generation_schedule_tick(low_water=1, round_prompts=2) == []  # 1 left is not below 1
    with django_capture_on_commit_callbacks(execute=True):  # the worker writes the round (immediate here)
        assert generation_schedule_tick(low_water=5, round_prompts=2) == [project]
    assert [p.completions.count() for p in waiting] == [3, 3, 0]
    busy = ProjectFactory(base_model=project.base_model)
    PromptFactory(project=busy)
    for _ in range(10):
        CompletionFactory.create_batch(2, prompt=PromptFactory(project=busy))
    assert generation_schedule_tick(low_water=5, round_prompts=2) == [project]  # busy has 10 items left


def test_a_nul_the_model_writes_is_left_out_of_the_stored_text(project, monkeypatch):
    monkeypatch.setattr(
        "training.generate.generate_completions",
        lambda model, tokenizer, conversations, *, k, sampling, batch_size: [
            [Sample(text="a\x00b", token_ids=(1, 2, 3), truncated=False)] * k for _ in conversations
        ],
    )
    PromptFactory(project=project)
    completions_generate(project=project)
    assert set(Completion.objects.values_list("text", flat=True)) == {"ab"}
