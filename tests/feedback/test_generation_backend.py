"""RANKWISE_GENERATION_BACKEND: the setting, the vllm backend refusing to write where it cannot run (and
losing nothing), and the app's writers going through it where it can (training/generate_vllm.py stood in for)."""

import importlib.util
import os
import shutil
import subprocess
import sys

import pytest

from feedback.models import Completion, Round, RoundPrompt
from feedback.services.generation import GenerationError, answers_sample, completions_generate, round_write
from tests.factories import CompletionFactory, ModelVersionFactory, ProjectFactory, PromptFactory
from tests.feedback.test_settings import LONG_SECRET, ROOT
from training import generate_vllm
from training.generate import Sample

NO_PACKAGE = "RANKWISE_GENERATION_BACKEND is vllm, but the vllm package is not installed (pip install 'rankwise[vllm]')"
NO_GPU = "RANKWISE_GENERATION_BACKEND is vllm, but vLLM needs a CUDA GPU and torch sees none here"


def test_the_backend_is_torch_unless_set_and_a_wrong_one_stops_start_up_naming_it(tmp_path):
    show = "import django; django.setup(); from django.conf import settings; print(settings.GENERATION_BACKEND)"
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")},
        "DJANGO_SETTINGS_MODULE": "config.settings",
        "SECRET_KEY": LONG_SECRET,
        "RANKWISE_DATA_DIR": str(tmp_path),
        "RANKWISE_ENV_FILE": os.devnull,
    }

    def start(**more: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", show], cwd=ROOT, env={**env, **more}, capture_output=True, text=True
        )

    assert start().stdout.strip() == "torch"
    assert start(RANKWISE_GENERATION_BACKEND="vllm").stdout.strip() == "vllm"  # checked at the first generation
    wrong = start(RANKWISE_GENERATION_BACKEND="cuda")
    assert wrong.returncode != 0
    assert "RANKWISE_GENERATION_BACKEND must be one of torch, vllm, not 'cuda'" in wrong.stderr


@pytest.fixture
def project(tiny_model_dir):
    return ProjectFactory(slug="gen", base_model=str(tiny_model_dir), completions_per_prompt=2, max_new_tokens=4)


def _vllm_installed(monkeypatch, installed: bool) -> None:
    find_spec = importlib.util.find_spec
    spec = importlib.machinery.ModuleSpec("vllm", None) if installed else None
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: spec if name == "vllm" else find_spec(name, *a))


def _stored() -> list[tuple]:
    return list(
        Completion.objects.order_by("pk").values_list("pk", "round_id", "prompt_id", "text", "generation_params")
    )


@pytest.mark.django_db
def test_vllm_without_the_package_fails_the_round_naming_it_and_writes_nothing(project, settings, monkeypatch):
    judged = PromptFactory(project=project)
    CompletionFactory.create_batch(2, prompt=judged)  # round 1
    PromptFactory.create_batch(2, project=project)
    before = _stored()
    settings.GENERATION_BACKEND = "vllm"
    _vllm_installed(monkeypatch, False)

    with pytest.raises(GenerationError) as raised:
        completions_generate(project=project)

    assert str(raised.value) == NO_PACKAGE
    second = Round.objects.get(project=project, number=2)
    assert (second.status, second.error, second.prompt_ids, second.prompts_written) == ("failed", NO_PACKAGE, [], 0)
    assert not RoundPrompt.objects.filter(round=second).exists()
    assert _stored() == before


@pytest.mark.django_db
def test_vllm_without_a_gpu_fails_a_resumed_round_and_keeps_what_it_had_written(project, settings, monkeypatch):
    prompts = PromptFactory.create_batch(3, project=project)

    def stop_after_the_first_batch(done: int, total: int) -> None:
        raise SystemExit  # a worker stopped: the round stays running, to be resumed

    with pytest.raises(SystemExit):
        completions_generate(project=project, first_batch=1, batch_size=1, progress=stop_after_the_first_batch)
    round = Round.objects.get(project=project)
    assert (round.status, round.prompts_written) == ("running", 1)
    before = _stored()
    assert [prompt for _, _, prompt, _, _ in before] == [prompts[0].pk] * 2

    settings.GENERATION_BACKEND = "vllm"
    _vllm_installed(monkeypatch, True)
    monkeypatch.setattr(generate_vllm.torch.cuda, "is_available", lambda: False)
    with pytest.raises(GenerationError) as raised:
        round_write(round_id=round.pk)

    assert str(raised.value) == NO_GPU
    round.refresh_from_db()
    assert (round.status, round.error, round.prompts_written) == ("failed", NO_GPU, 1)
    assert list(RoundPrompt.objects.filter(round=round).values_list("prompt_id", flat=True)) == [prompts[0].pk]
    assert _stored() == before


@pytest.fixture
def fake_vllm(monkeypatch, settings) -> list[tuple]:
    """The vllm backend chosen, with generate_completions_vllm answering "from <model>" (each answer one
    token longer, the last cut) and recording what it was asked; the calls it was given, in order."""
    settings.GENERATION_BACKEND = "vllm"
    calls: list[tuple] = []

    def generate(model_dir, conversations, *, k, sampling):
        calls.append((model_dir, len(conversations), k, sampling.temperature, sampling.seed))
        return [
            [Sample(text=f"from {model_dir}", token_ids=(7,) * (n + 1), truncated=n == k - 1) for n in range(k)]
            for _ in conversations
        ]

    monkeypatch.setattr(generate_vllm, "vllm_engine", lambda model_dir: None)
    monkeypatch.setattr(generate_vllm, "generate_completions_vllm", generate)
    return calls


@pytest.mark.django_db
def test_with_vllm_the_active_version_writes_the_round_through_it(project, settings, fake_vllm, tiny_model_dir):
    shutil.copytree(tiny_model_dir, settings.MODEL_VERSIONS_DIR / "gen" / "v1")
    version = ModelVersionFactory(project=project, name="v1", weights_path="gen/v1", is_active=True)
    prompt = PromptFactory(project=project)
    weights = str(settings.MODEL_VERSIONS_DIR / "gen" / "v1")

    completions_generate(project=project)

    assert fake_vllm == [(weights, 1, 2, 0.8, None)]
    written = sorted(
        (c.model_version, c.text, c.generation_params["new_tokens"], c.generation_params["truncated"])
        for c in prompt.completions.all()
    )
    assert written == [(version, f"from {weights}", 1, False), (version, f"from {weights}", 2, True)]


@pytest.mark.django_db
def test_with_vllm_side_by_side_answers_are_written_through_it(fake_vllm, tiny_model_dir):
    answers = answers_sample(
        model=str(tiny_model_dir),
        conversations=[[{"role": "user", "content": "hi"}]] * 2,
        temperature=0.5,
        top_p=0.9,
        max_new_tokens=4,
        seed=11,
    )
    assert answers == [(f"from {tiny_model_dir}", True)] * 2
    assert fake_vllm == [(str(tiny_model_dir), 2, 1, 0.5, 11)]
