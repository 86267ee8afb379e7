"""The vLLM backend for generation (training/generate_vllm.py).

Here, without vLLM or a GPU: what it says when either is missing, and, with a fake ``vllm`` module
standing in for the engine, how conversations become requests and vLLM's answers become Samples, and
that a LoRA version reaches vLLM as merged weights. Marked `gpu` and skipped without CUDA or without the
vllm package: the real engine against our torch path on a tiny model, greedy, token for token.
"""

import gc
import importlib.util
import json
import shutil
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.tiny_model import build_tokenizer, make_tiny_model_dir
from tests.training.test_generate import CONVERSATIONS, HELLO, MULTI
from training import generate_vllm
from training.generate import SamplingConfig, generate_completions, render_prompt
from training.generate_vllm import VllmUnavailable, generate_completions_vllm, vllm_check, vllm_engine
from training.models import LoraSettings, apply_lora, load_model, save_model_dir

needs_vllm = pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None, reason="needs vllm: pip install 'rankwise[vllm]'"
)
_find_spec = importlib.util.find_spec


@pytest.fixture(autouse=True)
def no_engines_kept():
    vllm_engine.cache_clear()
    yield
    vllm_engine.cache_clear()
    gc.collect()


def _installed(monkeypatch, installed: bool) -> None:
    """Whether the vllm package looks installed, whatever is here."""
    spec = importlib.machinery.ModuleSpec("vllm", None)
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: (spec if installed else None) if name == "vllm" else _find_spec(name, *args),
    )


def test_without_the_vllm_package_it_says_what_to_install(monkeypatch):
    _installed(monkeypatch, False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(VllmUnavailable) as raised:
        generate_completions_vllm("any", [HELLO], k=1, sampling=SamplingConfig())
    assert str(raised.value) == "the vllm package is not installed (pip install 'rankwise[vllm]')"


def test_without_a_gpu_it_says_so(monkeypatch):
    _installed(monkeypatch, True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(VllmUnavailable) as raised:
        vllm_check()
    assert str(raised.value) == "vLLM needs a CUDA GPU and torch sees none here"


# A stand-in for the vllm package: an engine that records how it was started and what it was asked, and
# answers each request from a queue of replies, one (token ids, finish reason, stop reason) per answer.


@dataclass
class FakeSamplingParams:
    n: int
    temperature: float
    top_p: float
    max_tokens: int
    seed: int | None
    detokenize: bool


@dataclass
class FakeVllm:
    started: list = field(default_factory=list)  # the engines, in the order they were started
    replies: list = field(default_factory=list)  # for each generate call, each request's answers


@pytest.fixture
def fake_vllm(monkeypatch) -> FakeVllm:
    fake = FakeVllm()

    class LLM:
        def __init__(self, *, model: str, tokenizer: str, dtype: str, gpu_memory_utilization: float):
            self.model, self.tokenizer, self.dtype, self.gpu_memory_utilization = (
                model,
                tokenizer,
                dtype,
                gpu_memory_utilization,
            )
            self.asked: list = []
            fake.started.append(self)

        def generate(self, prompts, params, *, use_tqdm):
            self.asked.append((prompts, params))
            return [
                SimpleNamespace(
                    outputs=[  # vLLM lists a request's answers in the order they finish
                        SimpleNamespace(index=index, token_ids=tokens, finish_reason=reason, stop_reason=stop)
                        for index, (tokens, reason, stop) in reversed(list(enumerate(answers)))
                    ]
                )
                for answers in fake.replies.pop(0)
            ]

    module = types.ModuleType("vllm")
    module.LLM = LLM
    module.SamplingParams = FakeSamplingParams
    monkeypatch.setitem(sys.modules, "vllm", module)
    # vLLM counts as usable; torch.cuda is left as it is, since peft would merge an adapter on CUDA if it saw one
    monkeypatch.setattr(generate_vllm, "vllm_check", lambda: None)
    monkeypatch.setattr(generate_vllm, "inference_dtype", lambda device: torch.bfloat16)
    return fake


def test_conversations_become_token_prompts_and_answers_become_samples_in_order(fake_vllm, tiny_model_dir):
    tokenizer = load_model(str(tiny_model_dir))[1]
    eos = tokenizer.eos_token_id
    words = tokenizer("red green blue", add_special_tokens=False)["input_ids"]
    fake_vllm.replies.append(
        [
            [(words + [eos], "stop", None), (words, "length", None)],
            [([eos], "stop", None), (words[:1], "length", None)],
        ]
    )
    seen = []
    out = generate_completions_vllm(
        str(tiny_model_dir),
        [HELLO, MULTI],
        k=2,
        sampling=SamplingConfig(temperature=0.7, top_p=0.9, max_new_tokens=len(words), seed=5),
        progress=lambda done, total: seen.append((done, total)),
    )

    [llm] = fake_vllm.started
    assert (llm.model, llm.tokenizer, llm.dtype, llm.gpu_memory_utilization) == (
        str(tiny_model_dir),
        str(tiny_model_dir),
        "bfloat16",
        0.4,
    )
    [(prompts, params)] = llm.asked
    assert prompts == [
        {"prompt_token_ids": tokenizer(render_prompt(tokenizer, c), add_special_tokens=False)["input_ids"]}
        for c in (HELLO, MULTI)
    ]
    assert params == [
        FakeSamplingParams(n=2, temperature=0.7, top_p=0.9, max_tokens=len(words), seed=5, detokenize=False),
        FakeSamplingParams(n=2, temperature=0.7, top_p=0.9, max_tokens=len(words), seed=7, detokenize=False),
    ]
    text = tokenizer.decode(words, skip_special_tokens=True).strip()
    first = tokenizer.decode(words[:1], skip_special_tokens=True).strip()
    assert [[(s.text, s.token_ids, s.truncated) for s in samples] for samples in out] == [
        [(text, tuple(words), False), (text, tuple(words), True)],
        [("", (), False), (first, tuple(words[:1]), True)],
    ]
    assert seen == [(2, 2)]


def test_greedy_asks_for_one_answer_and_repeats_it_k_times(fake_vllm, tiny_model_dir):
    tokenizer = load_model(str(tiny_model_dir))[1]
    words = tokenizer("yes no maybe", add_special_tokens=False)["input_ids"]
    fake_vllm.replies.append([[(words, "length", None)]])
    [samples] = generate_completions_vllm(
        str(tiny_model_dir), [HELLO], k=3, sampling=SamplingConfig(temperature=0, top_p=0.5, max_new_tokens=3)
    )
    [(_, params)] = fake_vllm.started[0].asked
    assert params == [FakeSamplingParams(n=1, temperature=0.0, top_p=1.0, max_tokens=3, seed=None, detokenize=False)]
    assert [(s.token_ids, s.truncated) for s in samples] == [(tuple(words), True)] * 3


def test_an_end_token_the_generation_config_names_is_left_out_as_eos_is(fake_vllm, tiny_model_dir):
    tokenizer = load_model(str(tiny_model_dir))[1]
    words = tokenizer("one two", add_special_tokens=False)["input_ids"]
    end = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    fake_vllm.replies.append([[(words + [end], "stop", end)]])
    [[sample]] = generate_completions_vllm(str(tiny_model_dir), [HELLO], k=1, sampling=SamplingConfig())
    assert (sample.token_ids, sample.truncated) == (tuple(words), False)


def test_an_engine_is_started_once_per_model(fake_vllm, tiny_model_dir):
    fake_vllm.replies += [[[([1], "length", None)]]] * 2
    for _ in range(2):
        generate_completions_vllm(str(tiny_model_dir), [HELLO], k=1, sampling=SamplingConfig(max_new_tokens=1))
    assert len(fake_vllm.started) == 1 and len(fake_vllm.started[0].asked) == 2


def test_a_lora_version_reaches_vllm_as_its_merged_weights(fake_vllm, tiny_model_dir, tmp_path):
    model, tokenizer = load_model(str(tiny_model_dir))
    model = apply_lora(model, LoraSettings(r=4, alpha=8))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    version = save_model_dir(model, tokenizer, tmp_path / "v1", base_model=str(tiny_model_dir), config={}, metrics={})
    fake_vllm.replies.append([[([1], "length", None)]])

    generate_completions_vllm(str(version), [HELLO], k=1, sampling=SamplingConfig(max_new_tokens=1))

    [llm] = fake_vllm.started
    merged = Path(llm.model)
    assert llm.tokenizer == llm.model and merged != version
    assert (merged / "config.json").is_file() and not (merged / "adapter_config.json").exists()
    expected = load_model(str(version), dtype=torch.bfloat16)[0].state_dict()
    served = load_model(str(merged), dtype=torch.bfloat16)[0].state_dict()
    assert served.keys() == expected.keys()
    assert all(torch.equal(served[name], expected[name]) for name in expected)
    vllm_engine.cache_clear()  # the engine dropped, its merged weights go with it
    gc.collect()
    assert not merged.exists()


# On a GPU with vLLM installed: the real engine against our torch path.


def _vllm_tiny_model_dir(path: Path) -> Path:
    """A tiny random Llama like tests/tiny_model.py's, with heads of 64 (vLLM's attention kernels take
    only some head sizes) and weights large enough that its greedy answers vary instead of repeating a token."""
    return make_tiny_model_dir(
        path,
        hidden_size=128,
        intermediate_size=256,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        initializer_range=0.5,
    )


def _with_eos(source: Path, path: Path, token_id: int) -> Path:
    """A copy of a model directory whose EOS (tokenizer, config, generation config) is ``token_id``."""
    shutil.copytree(source, path)
    tokenizer = build_tokenizer()
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(token_id)
    tokenizer.save_pretrained(path)
    for name in ("config.json", "generation_config.json"):
        config = json.loads((path / name).read_text())
        config["eos_token_id"] = token_id
        (path / name).write_text(json.dumps(config))
    return path


def _torch_path(model_dir: Path, conversations, *, k: int, sampling: SamplingConfig):
    """What our own decoding loop writes on the GPU, in float32."""
    model, tokenizer = load_model(str(model_dir), dtype=torch.float32, device=torch.device("cuda"))
    return generate_completions(model, tokenizer, conversations, k=k, sampling=sampling)


@pytest.fixture
def float32(monkeypatch):
    """Both backends in float32: a random model's two largest logits can lie 0.01 apart, and bf16 kernels
    that round differently would then pick different tokens, where float32 ones pick the same."""
    monkeypatch.setattr(generate_vllm, "inference_dtype", lambda device: torch.float32)


GREEDY = SamplingConfig(temperature=0, max_new_tokens=12)


@pytest.mark.gpu
@needs_vllm
def test_greedy_vllm_writes_the_torch_paths_tokens_and_marks_the_same_cuts(tmp_path, float32):
    base = _vllm_tiny_model_dir(tmp_path / "tiny")
    # Call EOS a token that the first answer writes after a few others and the other answers never write,
    # so that one answer ends before the limit and the others are cut by it.
    plain = _torch_path(base, CONVERSATIONS, k=1, sampling=GREEDY)
    first, others = plain[0][0].token_ids, [samples[0].token_ids for samples in plain[1:]]
    stop = next(t for t in first[2:] if t not in first[: first.index(t)] and all(t not in o for o in others))
    model_dir = _with_eos(base, tmp_path / "tiny-eos", stop)

    expected = _torch_path(model_dir, CONVERSATIONS, k=2, sampling=GREEDY)
    written = generate_completions_vllm(str(model_dir), CONVERSATIONS, k=2, sampling=GREEDY)

    assert [[s.truncated for s in samples] for samples in expected] == [[False] * 2, [True] * 2, [True] * 2]
    assert written == expected


@pytest.mark.gpu
@needs_vllm
def test_greedy_vllm_writes_a_lora_versions_tokens_as_the_torch_path_does(tmp_path, float32):
    base = _vllm_tiny_model_dir(tmp_path / "tiny")
    model, tokenizer = load_model(str(base))
    model = apply_lora(model, LoraSettings(r=4, alpha=8))  # a rank vLLM's LoRA kernels do not take
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    version = save_model_dir(model, tokenizer, tmp_path / "v1", base_model=str(base), config={}, metrics={})

    expected = _torch_path(version, CONVERSATIONS, k=1, sampling=GREEDY)
    assert expected != _torch_path(base, CONVERSATIONS, k=1, sampling=GREEDY)  # the adapter changes the answers
    assert generate_completions_vllm(str(version), CONVERSATIONS, k=1, sampling=GREEDY) == expected


@pytest.mark.gpu
@needs_vllm
def test_sampled_answers_are_k_per_conversation_and_repeat_with_their_seed(tmp_path):
    model_dir = _vllm_tiny_model_dir(tmp_path / "tiny")
    sampling = SamplingConfig(temperature=1.0, top_p=0.95, max_new_tokens=8, seed=3)
    written = generate_completions_vllm(str(model_dir), CONVERSATIONS, k=3, sampling=sampling)
    assert [len(samples) for samples in written] == [3, 3, 3]
    assert all(s.tokens <= 8 and s.truncated == (s.tokens == 8) for samples in written for s in samples)
    assert all(len({s.token_ids for s in samples}) > 1 for samples in written)  # k draws, not one repeated
    assert generate_completions_vllm(str(model_dir), CONVERSATIONS, k=3, sampling=sampling) == written
