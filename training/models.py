"""Load base models (an HF directory or hub id), convert a GGUF file once, attach LoRA, write atomic checkpoints.

``load_model`` reads safetensors model directories only; a GGUF file is turned into one by
``convert_gguf`` (``fetch_default_model`` does this once for the default model).

Every model directory this module writes is built under a temporary name next to its
final place and renamed when complete, so a crash or a cancelled run never leaves a
directory that looks finished but is not.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import shutil
import tempfile
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeGuard

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

if TYPE_CHECKING:
    from peft import PeftModel

# ChatML, as SmolLM2 ships it; used when a converted GGUF carries no template.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _cache_keyword() -> str:
    # transformers 5 renamed the models' `past_key_values` argument to `cache`.
    from transformers.models.llama.modeling_llama import LlamaModel

    return "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


# The keyword a model's forward takes its KV cache by, for this transformers: `model(**{CACHE_KWARG: cache})`.
CACHE_KWARG = _cache_keyword()


class ModelLoadError(Exception):
    """A base model or checkpoint could not be loaded; the message says which and why."""


def default_device() -> torch.device:
    """Where training, the reference pass, generation and scoring run: CUDA when torch sees a GPU, else the CPU.

    ``CUDA_VISIBLE_DEVICES=`` (empty) keeps a run on the CPU; under several processes each one's
    ``torch.cuda.set_device`` picks its GPU.
    """
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def load_model(
    name_or_path: str, *, dtype: torch.dtype | None = None, device: torch.device | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from a local directory or a hub id.

    A directory holding a LoRA adapter written by this library (``adapter_config.json``)
    is loaded by loading its base model (recursively) and merging the adapter in.
    Weights are read with safetensors only. ``dtype`` defaults to float32, the dtype
    training keeps its master weights in. The model is read on the CPU and moved to
    ``device`` when one is given (``default_device()`` picks CUDA when it is there).

    Raises:
        ModelLoadError: the path or id does not hold a loadable model.
    """
    dtype = dtype or torch.float32
    path = Path(name_or_path).expanduser()
    looks_local = path.is_absolute() or name_or_path.startswith(".") or path.exists()
    if looks_local and not path.is_dir():
        raise ModelLoadError(f"model directory {name_or_path!r} does not exist")
    if looks_local and (path / "adapter_config.json").is_file():
        merged, merged_tokenizer = _load_adapter_dir(path, dtype=dtype)
        return (merged if device is None else merged.to(device)), merged_tokenizer  # type: ignore[arg-type]
    if looks_local and not (path / "config.json").is_file():
        raise ModelLoadError(f"{name_or_path!r} is not a model directory (no config.json)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path) if looks_local else name_or_path)
        model = AutoModelForCausalLM.from_pretrained(
            str(path) if looks_local else name_or_path, dtype=dtype, use_safetensors=True
        )
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelLoadError(f"cannot load model {name_or_path!r}: {exc}") from exc
    _ensure_pad_token(tokenizer)
    model.config.pad_token_id = tokenizer.pad_token_id
    if device is not None:
        model = model.to(device)  # type: ignore[arg-type]
    return model, tokenizer


def _load_adapter_dir(path: Path, *, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from peft import PeftModel

    adapter_config = json.loads((path / "adapter_config.json").read_text())
    base = adapter_config.get("base_model_name_or_path")
    if not base:
        raise ModelLoadError(f"adapter in {path} does not name its base model")
    model, tokenizer = load_model(base, dtype=dtype)
    try:
        model = PeftModel.from_pretrained(model, str(path)).merge_and_unload()
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelLoadError(f"cannot load adapter {path}: {exc}") from exc
    if (path / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        _ensure_pad_token(tokenizer)
    return model, tokenizer


def _ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> None:
    # Llama-family tokenizers often have no pad token; masks are built from lengths,
    # so which id pads does not matter, only that one exists.
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


@contextlib.contextmanager
def atomic_directory(out_dir: Path) -> Iterator[Path]:
    """Yield a temporary directory next to ``out_dir``; rename it into place on success.

    An existing ``out_dir`` is replaced only once the new one is complete. On an
    exception the temporary directory is removed and ``out_dir`` is left untouched.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; a model directory is not
    try:
        yield tmp
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF checkpoint into a safetensors model directory at ``out_dir``.

    transformers loads GGUF weights dequantized but flags the model as quantized, which
    blocks saving and training; the model is therefore rebuilt from its config without
    ``quantization_config`` and the dequantized state dict loaded into it.
    """
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise ModelLoadError(f"GGUF file {gguf_path} does not exist")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        quantized = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
        )
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelLoadError(f"cannot read GGUF {gguf_path}: {exc}") from exc

    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    state_dict = quantized.state_dict()
    del quantized
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    # Tied output embeddings appear as "missing" when the GGUF stores them once.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ModelLoadError(f"GGUF {gguf_path.name}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if config.tie_word_embeddings:
        model.tie_weights()

    if not tokenizer.chat_template:
        tokenizer.chat_template = CHATML_TEMPLATE
    _ensure_pad_token(tokenizer)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id

    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return Path(out_dir)


@dataclass
class LoraSettings:
    """LoRA hyperparameters shared by the DPO and GRPO configs."""

    r: int = 16  # adapter rank
    alpha: int = 32  # scaling numerator: updates are scaled by alpha / r
    dropout: float = 0.0  # dropout on the adapter input
    target_modules: str | list[str] = "all-linear"  # which linear layers get adapters (lm_head excluded)


def apply_lora(model: PreTrainedModel, settings: LoraSettings) -> PeftModel:
    """Wrap ``model`` with fresh LoRA adapters; the base weights are frozen."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():
        # peft asks transformers 5 a deprecated question about gradient checkpointing.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, config)


def tune_for_training(model: torch.nn.Module, *, precision: str, bf16_frozen_base: bool) -> None:
    """Make a training step faster without changing what it computes.

    On the CPU the eager attention's backward is faster than SDPA's at these sequence lengths (a
    LoRA step of SmolLM2-135M on four pairs: about 3.5 s against 4.6 s with bf16). With bf16
    autocast and ``bf16_frozen_base``, frozen linear weights are stored in bf16, the values autocast
    would cast them to at every use; the embedding (tied to the output layer) and the norms stay
    in float32. Only for a base that is never saved (LoRA adapters saved on their own). Under
    bf16 autocast the adapters also take their input as it comes, instead of casting it to
    float32 first only for autocast to cast it back, and linear layers that read the same float32
    tensor (query, key and value; gate and up; their adapters) share one bf16 cast of it where
    autocast would make one for each. The forward numbers are unchanged; the gradients of such a
    tensor's users are summed in bf16 before the one cast back, as for any bf16 tensor used twice.

    On a GPU: SDPA stays (its fused kernels are the fast attention there) and linear layers cast
    their inputs as autocast does (the shared cast was measured on the CPU only, and on a GPU it
    trades a small cast kernel for a Python hook in every layer). The bf16-stored frozen base
    (half the memory, no weight casts) and the adapters taking their input as it comes are right
    on both devices and apply to both.
    """
    base = model.get_base_model() if is_lora(model) else model
    assert isinstance(base, PreTrainedModel)
    on_cpu = next(model.parameters()).device.type == "cpu"
    if on_cpu:  # CPU only
        base.set_attn_implementation("eager")
    if precision != "bf16":
        return
    shared_cast = _SharedInputCast()
    for module in model.modules():
        if hasattr(module, "cast_input_dtype_enabled"):  # a peft adapter layer; both devices
            module.cast_input_dtype_enabled = False  # type: ignore[assignment]
        if on_cpu and isinstance(module, torch.nn.Linear):  # CPU only
            module.register_forward_pre_hook(shared_cast)
    if not bf16_frozen_base:
        return
    embedding = base.get_input_embeddings().weight
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and not module.weight.requires_grad and module.weight is not embedding:
            module.weight.data = module.weight.data.to(torch.bfloat16)


class _SharedInputCast(threading.local):
    """A forward pre-hook for linear layers: under autocast, one cast per float32 input tensor.

    It remembers the last float32 input it cast and hands the same cast to the next layer that
    reads that very tensor (the layers of a block read their norm's output one after another).
    What it remembers is per thread, so threads running the model at once never share it.
    """

    def __init__(self) -> None:
        self.source: torch.Tensor | None = None
        self.cast: torch.Tensor | None = None

    def __reduce__(self) -> tuple[type, tuple[()]]:
        return (_SharedInputCast, ())  # a copied model (as merging into a copy makes) starts with nothing remembered

    def __call__(self, module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        x = args[0]
        device = x.device.type
        if x.dtype != torch.float32 or not torch.is_autocast_enabled(device):
            return None
        if x is not self.source:
            self.source, self.cast = x, x.to(torch.get_autocast_dtype(device))
        return (self.cast, *args[1:])


def is_lora(model: torch.nn.Module) -> TypeGuard[PeftModel]:
    from peft import PeftModel

    return isinstance(model, PeftModel)


@contextlib.contextmanager
def reference_mode(model: torch.nn.Module) -> Iterator[None]:
    """Run the frozen reference: the base with its adapters disabled (LoRA), else the model as it is."""
    if is_lora(model):
        with model.disable_adapter():
            yield
    else:
        yield


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights a checkpoint must hold to restore training: adapters only for LoRA.

    A model that wraps a language model (the reward model: LoRA adapters and a head) keeps the
    parameters that train, so its frozen base is not copied into every checkpoint.
    """
    if is_lora(model):
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(model)  # type: ignore[arg-type]
    if isinstance(model, PreTrainedModel):
        return model.state_dict()
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    if is_lora(model):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, state)  # type: ignore[arg-type]
    elif isinstance(model, PreTrainedModel):
        model.load_state_dict(state)
    else:
        unexpected = model.load_state_dict(state, strict=False).unexpected_keys
        if unexpected:
            raise ModelLoadError(f"checkpoint holds weights this model does not have: {unexpected[:3]}")


def save_model_dir(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: Path,
    *,
    base_model: str,
    config: dict[str, Any],
    metrics: dict[str, Any],
    merge_lora: bool = False,
    extra_tensors: dict[str, dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Write a finished model directory atomically.

    It holds safetensors weights (or a LoRA adapter naming ``base_model`` as its base),
    the tokenizer, ``training_config.json`` and ``metrics.json``. With ``merge_lora``
    the adapter is merged and full weights are written instead. ``extra_tensors`` are more
    safetensors files by name (the reward model's head).
    """
    from safetensors.torch import save_file

    with atomic_directory(out_dir) as tmp:
        for name, tensors in (extra_tensors or {}).items():
            save_file({k: v.detach().contiguous() for k, v in tensors.items()}, tmp / name)
        if is_lora(model):
            if merge_lora:
                merged = _merged_copy(model)
                merged.save_pretrained(tmp, safe_serialization=True)
            else:
                model.peft_config["default"].base_model_name_or_path = _absolute_if_local(base_model)
                model.save_pretrained(str(tmp), safe_serialization=True)
        else:
            model.save_pretrained(tmp, safe_serialization=True)  # type: ignore[operator]
        tokenizer.save_pretrained(tmp)
        (tmp / "training_config.json").write_text(json.dumps(config, indent=2, default=str))
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    return Path(out_dir)


def _merged_copy(model: PeftModel) -> PreTrainedModel:
    import copy

    return copy.deepcopy(model).merge_and_unload()


def _absolute_if_local(name_or_path: str) -> str:
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.exists() else name_or_path
