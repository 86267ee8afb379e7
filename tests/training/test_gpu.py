"""On CUDA: a few DPO and GRPO steps and a generation. Marked `gpu`: skipped where torch sees no GPU
(tests/conftest.py), so they run only on a machine that has one."""

import math

import pytest
import torch

import training.dpo
import training.grpo
from tests.training.synthetic import preference_pairs, ranked_groups, split
from tests.training.test_dpo import tiny_config as dpo_config
from tests.training.test_generate import CONVERSATIONS
from tests.training.test_grpo import tiny_config as grpo_config
from training.generate import SamplingConfig, generate_completions, inference_dtype, render_prompt
from training.models import _SharedInputCast, default_device, load_model
from training.runs import Policy, load_policy

pytestmark = pytest.mark.gpu


def _recording(monkeypatch, module) -> list[Policy]:
    """The policies ``module``'s loop loads, kept for the test to look at."""
    policies: list[Policy] = []

    def load(config, model):
        policies.append(load_policy(config, model))
        return policies[-1]

    monkeypatch.setattr(module, "load_policy", load)
    return policies


def _assert_on_the_gpu_path(policy: Policy) -> None:
    bf16 = torch.cuda.is_bf16_supported()
    assert policy.device.type == "cuda"
    assert all(p.device.type == "cuda" for p in policy.model.parameters())
    assert policy.precision == ("bf16" if bf16 else "fp32")  # precision="auto"
    base = policy.model.get_base_model()
    assert base.config._attn_implementation != "eager"  # the CPU's attention choice stays on the CPU
    hooks = [h for m in policy.model.modules() for h in m._forward_pre_hooks.values()]
    assert not any(isinstance(h, _SharedInputCast) for h in hooks)  # the CPU's shared input cast too
    frozen = {p.dtype for n, p in policy.model.named_parameters() if "lora_" not in n and p.dim() == 2}
    assert torch.bfloat16 in frozen if bf16 else frozen == {torch.float32}


def test_default_device_is_cuda_here():
    assert default_device().type == "cuda"


def test_dpo_steps_on_cuda(tmp_path, tiny_model_dir, monkeypatch):
    policies = _recording(monkeypatch, training.dpo)
    train, held = split(preference_pairs(8))
    seen = []
    result = training.dpo.train_dpo(
        dpo_config(precision="auto", save_every=0),
        train_examples=train,
        eval_examples=held,
        model=str(tiny_model_dir),
        out_dir=tmp_path / "v1",
        progress=lambda step, total, m: seen.append(m),
    )
    [policy] = policies
    _assert_on_the_gpu_path(policy)
    assert not result.cancelled and result.metrics["steps"] >= 2
    assert all(math.isfinite(m["loss"]) for m in seen)
    assert (tmp_path / "v1" / "adapter_model.safetensors").is_file()


def test_grpo_steps_on_cuda(tmp_path, tiny_model_dir, monkeypatch):
    policies = _recording(monkeypatch, training.grpo)
    train, held = split(ranked_groups(8))
    seen = []
    result = training.grpo.train_grpo(
        grpo_config(precision="auto", save_every=0),
        train_examples=train,
        eval_examples=held,
        model=str(tiny_model_dir),
        out_dir=tmp_path / "g1",
        progress=lambda step, total, m: seen.append(m),
    )
    [policy] = policies
    _assert_on_the_gpu_path(policy)
    assert not result.cancelled and result.metrics["steps"] >= 2
    assert all(math.isfinite(m["loss"]) for m in seen)


def test_greedy_generation_on_cuda_gives_the_tokens_of_model_generate(tiny_model_dir):
    model, tokenizer = load_model(str(tiny_model_dir), device=default_device())
    assert next(model.parameters()).device.type == "cuda"
    conversations = sorted(CONVERSATIONS, key=lambda c: len(tokenizer(render_prompt(tokenizer, c))["input_ids"]))
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer([render_prompt(tokenizer, c) for c in conversations], return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = "right"
    plain = model.generate(
        **enc.to(model.device),
        do_sample=False,
        max_new_tokens=16,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )[:, enc["input_ids"].shape[1] :].tolist()
    out = generate_completions(
        model, tokenizer, conversations, k=1, sampling=SamplingConfig(temperature=0, max_new_tokens=16)
    )
    for [sample], row in zip(out, plain, strict=True):
        ended = tokenizer.eos_token_id in row
        assert sample.token_ids == tuple(row[: row.index(tokenizer.eos_token_id)] if ended else row)
        assert sample.truncated == (not ended)


def test_sampling_on_cuda_in_the_inference_dtype(tiny_model_dir):
    device = default_device()
    model, tokenizer = load_model(str(tiny_model_dir), dtype=inference_dtype(device), device=device)
    assert next(model.parameters()).dtype == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32)
    sampled = generate_completions(
        model,
        tokenizer,
        CONVERSATIONS,
        k=3,
        sampling=SamplingConfig(max_new_tokens=8, seed=1),
        batch_size=4,
    )
    assert [len(s) for s in sampled] == [3] * len(CONVERSATIONS)
    assert all(s.tokens <= 8 for row in sampled for s in row)
