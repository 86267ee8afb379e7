"""A tiny randomly initialised Llama with an offline tokenizer, saved as a model directory.

It stands in for SmolLM2 in tests: same architecture family, a byte-level BPE tokenizer
(so any text round-trips), pad == EOS == ``<|im_end|>``, and a ChatML chat template.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Words the tests write prompts and completions with; BPE merges make them short.
CORPUS = """
system user assistant You are a helpful assistant.
How do I reverse a list in Python? Use reversed(xs) or xs[::-1]. Call xs.reverse().
What is the capital of France? Paris is the capital of France.
Tell me about cats dogs birds fish trees rivers mountains cities colors numbers.
good bad great terrible yes no maybe answer question please thanks hello world
red green blue yellow black white one two three four five six seven eight nine ten
Write a short poem about the sea. The sea is wide and blue and deep.
Explain why the sky is blue. Light scatters in the air.
""".strip()


def build_tokenizer() -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS.splitlines() * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=512,
    )


def make_tiny_model_dir(path: Path, *, seed: int = 0, **shape: Any) -> Path:
    """Save a tiny random LlamaForCausalLM and its tokenizer into ``path``; return ``path``.

    ``shape`` overrides LlamaConfig's sizes (another head size, say).
    """
    path = Path(path)
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    sizes = {"hidden_size": 48, "intermediate_size": 96, "num_attention_heads": 4, "num_key_value_heads": 2}
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        num_hidden_layers=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **(sizes | shape),
    )
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def tiny_lora_model(model_dir: Path, *, r: int, alpha: int, std: float) -> tuple[torch.nn.Module, Any]:
    """The tiny model (and its tokenizer) with LoRA adapters whose B matrices are random, so they change its output."""
    from training.models import LoraSettings, apply_lora, load_model

    model, tokenizer = load_model(str(model_dir))
    model = apply_lora(model, LoraSettings(r=r, alpha=alpha))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, std)
    return model, tokenizer
