"""Choosing the device on a machine without a GPU: the CUDA branch, with torch.cuda.is_available mocked,
and the CPU thread-spin setting kept out of runs that will see a GPU."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import training
import training.runs
from tests.tiny_model import tiny_lora_model
from training.config import DPOConfig
from training.models import _SharedInputCast, default_device, tune_for_training

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("available", "expected"), [(True, "cuda"), (False, "cpu")])
def test_default_device_is_cuda_when_torch_sees_a_gpu(monkeypatch, available, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    assert default_device() == torch.device(expected)


def test_load_policy_asks_for_the_gpu_when_there_is_one(monkeypatch, tiny_model_dir):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    asked = []
    real = training.runs.load_model

    def load(name, *, dtype=None, device=None):
        asked.append(device)
        return real(name, dtype=dtype)  # kept on the CPU: this machine has no GPU

    monkeypatch.setattr(training.runs, "load_model", load)
    policy = training.runs.load_policy(DPOConfig(precision="fp32"), str(tiny_model_dir))
    assert asked == [torch.device("cuda")]
    assert policy.device.type == "cpu"


def test_precision_auto_on_cuda_follows_the_gpus_bf16_support(monkeypatch):
    for supported, expected in [(True, "bf16"), (False, "fp32")]:
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda s=supported: s)
        assert training.runs.resolve_precision("auto", torch.device("cuda")) == expected


def _shared_casts(model: torch.nn.Module) -> int:
    return sum(isinstance(h, _SharedInputCast) for m in model.modules() for h in m._forward_pre_hooks.values())


def test_off_the_cpu_the_cpu_only_tuning_is_left_out(tiny_model_dir):
    # A model on the meta device stands for one on a GPU: it is not on the CPU, and nothing runs on it.
    on_gpu, _ = tiny_lora_model(tiny_model_dir, r=4, alpha=8, std=0.02)
    on_gpu.to("meta")
    tune_for_training(on_gpu, precision="bf16", bf16_frozen_base=True)
    on_cpu, _ = tiny_lora_model(tiny_model_dir, r=4, alpha=8, std=0.02)
    tune_for_training(on_cpu, precision="bf16", bf16_frozen_base=True)

    assert on_cpu.get_base_model().config._attn_implementation == "eager"
    assert on_gpu.get_base_model().config._attn_implementation != "eager"  # SDPA stays on a GPU
    assert _shared_casts(on_cpu) > 0 and _shared_casts(on_gpu) == 0
    for model in (on_cpu, on_gpu):  # kept on both devices: the frozen base in bf16, adapters' input as it comes
        frozen = {
            m.weight.dtype for m in model.modules() if isinstance(m, torch.nn.Linear) and not m.weight.requires_grad
        }
        assert torch.bfloat16 in frozen
        assert not any(getattr(m, "cast_input_dtype_enabled", False) for m in model.modules())


def test_gpu_expected_reads_the_driver_and_cuda_visible_devices(tmp_path):
    gpus = tmp_path / "gpus"
    assert not training.gpu_expected({}, str(gpus))  # no NVIDIA driver
    gpus.mkdir()
    assert not training.gpu_expected({}, str(gpus))  # a driver without GPUs
    (gpus / "0000:01:00.0").mkdir()
    assert training.gpu_expected({}, str(gpus))
    assert training.gpu_expected({"CUDA_VISIBLE_DEVICES": "0"}, str(gpus))
    assert not training.gpu_expected({"CUDA_VISIBLE_DEVICES": ""}, str(gpus))  # all hidden
    assert not training.gpu_expected({"CUDA_VISIBLE_DEVICES": "-1"}, str(gpus))


def test_the_thread_spin_is_set_for_the_cpu_only():
    cpu: dict[str, str] = {}
    training.set_thread_spin(cpu, gpu=False)
    assert cpu == {"GOMP_SPINCOUNT": "3000"}
    gpu: dict[str, str] = {}
    training.set_thread_spin(gpu, gpu=True)
    assert gpu == {}


@pytest.mark.parametrize(("listed", "expected"), [(["0000:01:00.0"], "None"), ([], "3000")])
def test_importing_training_where_the_driver_lists_a_gpu_leaves_the_spin_out(listed, expected):
    # The driver's list is faked before `training` is imported, as a GPU machine's would read.
    code = (
        "import os; real = os.listdir\n"
        f"os.listdir = lambda p='.': {listed!r} if p == '/proc/driver/nvidia/gpus' else real(p)\n"
        "import training; print(os.environ.get('GOMP_SPINCOUNT'))"
    )
    env = {
        k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "CUDA_VISIBLE_DEVICES")
    }
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected
