"""Sample K completions per conversation with the model's chat template.

Decoding is our own loop over the model's forward pass rather than ``model.generate``, for
two reasons measured in benchmarks/generation_speed.py: rows that reach EOS leave the batch
(their KV cache rows are dropped), so the steps after the first answers end cost only the
rows still writing; and it reports for each completion how many tokens it has and whether
the length limit cut it. Rows are sorted by prompt length before batching, so a batch pads
its prompts little. The KV cache is written in place and, on the CPU, the linear layers'
weights are laid out once a call rather than at every product (for oneDNN in bf16, packed for
MKL in fp32 at a step's few rows). A Llama model's decoding steps run its operations written out
(``_LlamaStep``), without the forward's per-call plumbing. Greedy decoding gives the same tokens
as ``model.generate`` on the same batch in the same dtype (tests/training/test_generate.py).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import Cache, DynamicLayer

from training.logprobs import evaluation
from training.models import CACHE_KWARG


@dataclass
class SamplingConfig:
    temperature: float = 0.8  # softmax temperature; 0 means greedy decoding
    top_p: float = 0.95  # nucleus sampling: keep the smallest token set with this much probability
    max_new_tokens: int = 256  # completion length limit in tokens
    seed: int | None = None  # seed for reproducible samples; None leaves the RNG as it is


@dataclass(frozen=True)
class Sample:
    text: str  # decoded without special tokens, stripped
    token_ids: tuple[int, ...]  # the new tokens as sampled, EOS excluded (the text need not encode back to them)
    truncated: bool  # stopped by max_new_tokens before the model wrote EOS

    @property
    def tokens(self) -> int:
        """New tokens written, the EOS token not counted."""
        return len(self.token_ids)


def render_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> str:
    """The conversation through the chat template, ending with the assistant's generation prompt."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)  # type: ignore[return-value]


def inference_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the hardware multiplies bf16 natively (see resolve_precision), else fp32.

    Decoding reads every weight once a step; bf16 halves those bytes and, with AVX512_BF16 or
    AMX, doubles the matrix throughput. Without them PyTorch emulates bf16 and fp32 is faster.
    """
    from training.runs import resolve_precision

    return torch.bfloat16 if resolve_precision("auto", device) == "bf16" else torch.float32


def next_tokens(logits: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """One token per row from the last position's logits (B, V) -> (B,): argmax, or temperature + top-p sampling."""
    logits = logits.float()
    if sampling.temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / sampling.temperature, dim=-1)
    if sampling.top_p < 1:
        return nucleus_sample(probs, sampling.top_p)
    return draw(probs)


def draw(weights: torch.Tensor) -> torch.Tensor:
    """One index per row of non-negative weights (B, N) -> (B,), each in proportion to its weight.

    By inverse CDF: a cumulative sum and a binary search. ``torch.multinomial`` draws one exponential
    variate per entry; over this vocabulary of 49,152 tokens that took 11 ms a step at 8 rows and
    180 ms at 128, against 0.6 and 6 ms here (benchmarks/draw_speed.py; RESULTS.md, "Each prompt once
    for its completions, draws by inverse CDF"). The draw is in (0, row total], and the search finds
    the first entry whose cumulative sum reaches it, so an entry of weight 0 is never drawn.
    """
    cdf = weights.cumsum(dim=-1)  # (B, N), non-decreasing
    u = (1 - torch.rand(weights.shape[0], 1, device=weights.device)) * cdf[:, -1:]  # (B, 1) in (0, total]
    return torch.searchsorted(cdf, u).squeeze(-1)


# A nucleus is rarely more than a few hundred of the vocabulary's tokens (SmolLM2 at temperature 0.8, top-p 0.95:
# median 7, 2 % of rows over 512). Sorting every token, and drawing over every token, each took longer than the
# model's forward pass on a 64-row decoding step; topk over this many and a draw among them cost a small part of it
# (benchmarks/RESULTS.md, "Generation speed").
NUCLEUS_CANDIDATES = 512


def nucleus_sample(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """One token per row of probabilities (B, V) -> (B,), drawn from the row's nucleus: its most likely tokens until
    the ones before a token already reach top_p (the first always stays), in proportion to their probabilities.

    Each row draws among its NUCLEUS_CANDIDATES most likely tokens; a row whose candidates fall short of top_p
    (its nucleus may hold more) draws again from its whole vocabulary, sorted. Either way the draw is from the
    nucleus a full sort gives, in the same proportions.
    """
    candidates, ids = probs.topk(min(NUCLEUS_CANDIDATES, probs.shape[-1]), dim=-1)  # most likely first
    tokens = ids.gather(-1, draw(_head(candidates, top_p)).unsqueeze(-1)).squeeze(-1)
    wide = (candidates.sum(dim=-1) < top_p).nonzero().squeeze(-1)
    if wide.numel() > 0:
        ordered, order = probs[wide].sort(dim=-1, descending=True)
        tokens[wide] = order.gather(-1, draw(_head(ordered, top_p)).unsqueeze(-1)).squeeze(-1)
    return tokens


def _head(ordered: torch.Tensor, top_p: float) -> torch.Tensor:
    """Probabilities sorted most likely first, with each token zeroed once the ones before it reach top_p."""
    return ordered.masked_fill(ordered.cumsum(dim=-1) - ordered >= top_p, 0.0)


class _PreallocatedLayer(DynamicLayer):
    """One layer's KV cache, written in place into tensors that hold the whole decode from the start.

    The default cache concatenates each step's keys and values to all the earlier ones, copying the
    whole cache every step; at 64 rows that copy was 15 % of a decoding step (benchmarks/
    RESULTS.md, "Generation speed"). The length a batch can reach is known before it starts (its
    prompts' width plus max_new_tokens), so the tensors are made that long once and each step writes
    its position. Attention reads the written positions as a view.
    """

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        batch, heads, _, dim = key_states.shape
        self.key_buffer = key_states.new_empty((batch, heads, self.capacity, dim))
        self.value_buffer = value_states.new_empty((batch, heads, self.capacity, value_states.shape[-1]))
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        self.key_buffer[:, :, self.length : end] = key_states
        self.value_buffer[:, :, self.length : end] = value_states
        self.length = end
        self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep the rows ``indices``, in that order: only the rows that change place are copied, into the
        first ``len(indices)`` rows of the tensors, which become the batch. With the order ``_survivors``
        gives, a step where a few rows end copies those few, not the whole cache."""
        if self.is_initialized:
            moved = (indices != torch.arange(len(indices), device=indices.device)).nonzero().squeeze(-1)
            for buffer in (self.key_buffer, self.value_buffer):
                buffer[moved, :, : self.length] = buffer[indices[moved], :, : self.length]
            self.key_buffer, self.value_buffer = self.key_buffer[: len(indices)], self.value_buffer[: len(indices)]
            self.keys, self.values = self.key_buffer[:, :, : self.length], self.value_buffer[:, :, : self.length]


def _decoding_cache(capacity: int) -> Cache:
    """A KV cache of ``_PreallocatedLayer``s of ``capacity`` positions, each made as the model first writes it."""
    return Cache(layer_class_to_replicate=functools.partial(_PreallocatedLayer, capacity))  # type: ignore[arg-type]


def _survivors(ended: torch.Tensor) -> torch.Tensor:
    """The rows that did not end, as the batch's new order: a survivor among the first ones stays where it is,
    and the survivors beyond fill the places of the rows that ended there. (B,) bool -> (b,) row indices."""
    survivors = (~ended).nonzero().squeeze(-1)
    order = torch.arange(len(survivors), device=ended.device)
    order[ended[: len(survivors)]] = survivors[survivors >= len(survivors)]
    return order


def _packed_linear(packed: torch.Tensor, linear: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if x.dtype != packed.dtype:  # under autocast, say: the layer as it is
        return torch.nn.functional.linear(x, linear.weight, linear.bias)
    return torch.ops.mkldnn._linear_pointwise(x, packed, linear.bias, "none", [], "")


class _MKLPacked:
    """An fp32 linear layer on the CPU whose weight MKL has packed for a decoding step's few rows.

    A plain fp32 product has MKL pack the weight into its own layout at every call: at 4 to 32 rows that
    took 1.8 to 2.8x the time of the product with a weight packed once (benchmarks/RESULTS.md, "fp32
    decoding with weights packed once"). From 64 rows the arithmetic dominates, and over a batch of 80
    rows packing gained nothing measurable, so steps of more than ``MAX_ROWS`` stay plain, as do passes
    over more than one position a row (a batch's prompts). MKL's packed product takes exactly the rows it
    was packed for, so fewer rows are padded up to them (the weights' reading dominates the time, not the
    rows), and the weight is packed again (about 0.1 s for the default model) only when a step has more
    rows, or a quarter as many or fewer.
    """

    MAX_ROWS = 32

    def __init__(self, linear: torch.nn.Linear):
        self.linear = linear
        self.rows = 0
        self.packed: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.linear.weight, self.linear.bias
        rows = x.shape[0]  # x: (batch, positions, features)
        if x.dtype != weight.dtype or x.dim() != 3 or x.shape[1] != 1 or rows > self.MAX_ROWS:
            return torch.nn.functional.linear(x, weight, bias)
        if rows > self.rows or 4 * rows <= self.rows:
            self.rows = rows
            self.packed = torch.ops.mkl._mkl_reorder_linear_weight(weight.detach(), rows)
        flat = torch.nn.functional.pad(x.view(rows, -1), (0, 0, 0, self.rows - rows))
        return torch.ops.mkl._mkl_linear(flat, self.packed, weight, bias, self.rows)[:rows, None]


@contextlib.contextmanager
def _packed_linears(model: torch.nn.Module) -> Iterator[None]:
    """While decoding, the model's linear layers on the CPU multiply with weights laid out once.

    A bf16 ``F.linear`` lays its weight out again in oneDNN's blocked format at every call, and an fp32
    one of a few rows has MKL pack it again; at a decoding step's few rows that is a large part of the
    product's time (benchmarks/RESULTS.md, "Generation speed"). bf16 layers are laid out for oneDNN once
    a call, with the same results to the bit; fp32 layers are packed for MKL (``_MKLPacked``), with results
    that differ from the plain product's in the last bits (below 2e-6 for the default model's layers).
    Under autocast fp32 layers stay as they are, so that autocast still casts them. The layouts (the
    weights' size again) are dropped after.
    """
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear and m.weight.device.type == "cpu"]
    bf16 = [m for m in linears if m.weight.dtype == torch.bfloat16]
    fp32 = [m for m in linears if m.weight.dtype == torch.float32]
    onednn = torch.backends.mkldnn.is_available()
    if not (onednn and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        bf16 = []
    # MKL's packed weights are held as oneDNN tensors, so the fp32 path needs both libraries
    if not (onednn and torch.backends.mkl.is_available()) or torch.is_autocast_enabled("cpu"):
        fp32 = []
    for linear in bf16:
        packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None)
        linear.forward = functools.partial(_packed_linear, packed, linear)  # type: ignore[method-assign]
    for linear in fp32:
        linear.forward = _MKLPacked(linear)  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        for linear in bf16 + fp32:
            del linear.forward


def _rms_norm(norm: Any, x: torch.Tensor) -> torch.Tensor:
    """``LlamaRMSNorm``'s operations, in its order: in fp32, back to the input's dtype, times the weight."""
    dtype = x.dtype
    x = x.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * x.to(dtype)


class _LlamaStep:
    """A decoding step of a Llama model with SDPA attention, one new token a row, written out operation by operation.

    The model's own forward builds the attention mask and passes its keywords through every layer and
    module at every call; at a decoding step's few rows that costs about as much as the operations
    outside the products (8 rows of the default model: sampling took 0.86x the time this way,
    benchmarks/RESULTS.md, "Decoding steps written out"). This step runs the same operations in the
    same order on the same weights and KV cache, so it gives the same logits to the bit (tests/training/
    test_generate.py), and it makes once a step what the model makes once a layer: the mask as SDPA takes
    it, and the rotary sine with ``rotate_half``'s sign folded in. As the model's SDPA attention does, a
    batch without padding attends without a mask, grouped-query heads and all; with padding the query
    heads of a key/value head form that head's query rows, which share the padding mask.
    """

    def __init__(self, model: PreTrainedModel):
        self.model = model
        config = model.config
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads

    @staticmethod
    def fits(model: PreTrainedModel) -> bool:
        from transformers import LlamaForCausalLM

        return type(model) is LlamaForCausalLM and model.config._attn_implementation == "sdpa"

    def __call__(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, cache: Cache
    ) -> torch.Tensor:
        """(b, 1) tokens, the (b, L) padding mask, (b, 1) positions -> (b, 1, V) logits; the cache gains the step."""
        body: Any = self.model.model
        b = input_ids.shape[0]
        h = body.embed_tokens(input_ids)  # (b, 1, H)
        cos, sin = body.rotary_emb(h, position_ids)  # (b, 1, D)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (b, 1, 1, D): every head
        half = cos.shape[-1] // 2
        # rotate_half(x)·sin = cat(-x2, x1)·sin = cat(x2, x1)·cat(-sin1, sin2), the same products to the bit
        sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        padded = not bool(attention_mask.all())
        mask: torch.Tensor | None = None
        for layer, kv in zip(body.layers, cast(list[_PreallocatedLayer], cache.layers), strict=True):
            attention, mlp = layer.self_attn, layer.mlp
            x = _rms_norm(layer.input_layernorm, h)
            q = attention.q_proj(x).view(b, 1, self.heads, -1).transpose(1, 2)  # (b, heads, 1, D)
            k = attention.k_proj(x).view(b, 1, self.kv_heads, -1).transpose(1, 2)  # (b, kv_heads, 1, D)
            v = attention.v_proj(x).view(b, 1, self.kv_heads, -1).transpose(1, 2)
            q = q * cos + torch.cat((q[..., half:], q[..., :half]), dim=-1) * sin
            k = k * cos + torch.cat((k[..., half:], k[..., :half]), dim=-1) * sin
            keys, values = kv.update(k, v)  # (b, kv_heads, L, D)
            if padded:
                if mask is None:  # SDPA turns a boolean mask into this one at every call
                    mask = torch.zeros(attention_mask.shape, dtype=q.dtype, device=q.device)
                    mask = mask.masked_fill_(attention_mask == 0, float("-inf"))[:, None, None, :]  # (b, 1, 1, L)
                q = q.reshape(b, self.kv_heads, -1, q.shape[-1])  # (b, kv_heads, heads / kv_heads, D)
                o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=attention.scaling)
            else:
                o = F.scaled_dot_product_attention(q, keys, values, scale=attention.scaling, enable_gqa=True)
            h = h + attention.o_proj(o.reshape(b, 1, -1))
            x = _rms_norm(layer.post_attention_layernorm, h)
            h = h + mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))
        return self.model.lm_head(_rms_norm(body.norm, h))


def _decoding_step(model: PreTrainedModel) -> Callable[..., torch.Tensor]:
    """The model's decoding step: ``_LlamaStep`` where it fits, else the model's forward."""
    if _LlamaStep.fits(model):
        return _LlamaStep(model)

    def step(
        input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, cache: Cache
    ) -> torch.Tensor:
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **{CACHE_KWARG: cache},
            use_cache=True,
        )
        return out.logits

    return step


def _decode_batch(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    sampling: SamplingConfig,
    eos_token_id: int,
) -> list[tuple[list[int], bool]]:
    """Decode a left-padded batch (B, T) -> for each row its new tokens (EOS excluded) and whether it was cut."""
    batch = input_ids.shape[0]
    written: list[list[int]] = [[] for _ in range(batch)]
    truncated = [True] * batch
    alive = torch.arange(batch, device=input_ids.device)  # batch row of each row still writing
    positions = (attention_mask.cumsum(dim=-1) - 1).clamp(min=0)  # (B, T), as model.generate counts them
    cache = _decoding_cache(input_ids.shape[1] + sampling.max_new_tokens)
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=positions,
        **{CACHE_KWARG: cache},
        use_cache=True,
        logits_to_keep=1,
    )
    logits = out.logits[:, -1, :]  # (B, V)
    position = positions[:, -1:]  # (B, 1)
    decoding_step = _decoding_step(model)
    for step in range(sampling.max_new_tokens):
        tokens = next_tokens(logits, sampling)  # (b,)
        ended = tokens == eos_token_id
        for row, token, end in zip(alive.tolist(), tokens.tolist(), ended.tolist(), strict=True):
            if end:
                truncated[row] = False
            else:
                written[row].append(token)
        if step == sampling.max_new_tokens - 1:
            break
        if bool(ended.any()):
            keep = _survivors(ended)
            if keep.numel() == 0:
                break
            # finished rows leave the batch, so later steps compute only the rows still writing
            cache.batch_select_indices(keep)
            alive, tokens, position, attention_mask = alive[keep], tokens[keep], position[keep], attention_mask[keep]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(alive), 1))], dim=-1)
        position = position + 1
        logits = decoding_step(tokens[:, None], attention_mask, position, cache)[:, -1, :]
    return list(zip(written, truncated, strict=True))


# Rows decoded together. A decoding step of the default model costs about the same from 8 to 32 rows (Python and
# dispatch, not arithmetic); 128 rows write 1.4x the tokens a second of 64 and 256 no more than 128 (bf16, 2 cores,
# AMX: benchmarks/RESULTS.md, "Generation speed"). Their bf16 KV cache at 400 positions is about 1 GB.
BATCH_ROWS = 128


def generate_completions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    conversations: list[list[dict[str, str]]],
    *,
    k: int,
    sampling: SamplingConfig,
    batch_size: int = BATCH_ROWS,
    progress: Callable[[int, int], None] | None = None,
) -> list[list[Sample]]:
    """Return ``k`` sampled completions for each conversation, in order.

    Each conversation is a list of ``{role, content}`` messages ending with a user turn.
    The ``len(conversations) * k`` rows are sorted by prompt length and decoded
    ``batch_size`` rows at a time, prompts left-padded. ``progress`` is called with
    (conversations done, total) after each batch.
    """
    if k < 1:
        raise ValueError("k must be at least 1")
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    for conversation in conversations:
        if not conversation or conversation[-1].get("role") != "user":
            raise ValueError("each conversation must end with a user turn")
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    eos_token_id = tokenizer.eos_token_id
    pad_token_id = tokenizer.pad_token_id
    assert isinstance(eos_token_id, int) and isinstance(pad_token_id, int)

    device = next(model.parameters()).device
    prompt_ids: list[list[int]] = tokenizer(
        [render_prompt(tokenizer, c) for c in conversations], add_special_tokens=False
    )["input_ids"]
    # rows of one conversation stay together, so each batch finishes whole conversations early
    rows = sorted((i for i in range(len(conversations)) for _ in range(k)), key=lambda i: (len(prompt_ids[i]), i))
    outputs: list[list[Sample]] = [[] for _ in conversations]
    with evaluation(model), _packed_linears(model):
        for start in range(0, len(rows), batch_size):
            batch_rows = rows[start : start + batch_size]
            width = max(len(prompt_ids[i]) for i in batch_rows)
            input_ids = torch.tensor(
                [[pad_token_id] * (width - len(prompt_ids[i])) + prompt_ids[i] for i in batch_rows], device=device
            )  # (b, T), left-padded
            attention_mask = torch.tensor(
                [[0] * (width - len(prompt_ids[i])) + [1] * len(prompt_ids[i]) for i in batch_rows], device=device
            )
            decoded = _decode_batch(model, input_ids, attention_mask, sampling=sampling, eos_token_id=eos_token_id)
            texts = tokenizer.batch_decode([tokens for tokens, _ in decoded], skip_special_tokens=True)
            for i, text, (tokens, cut) in zip(batch_rows, texts, decoded, strict=True):
                outputs[i].append(Sample(text=text.strip(), token_ids=tuple(tokens), truncated=cut))
            if progress is not None:
                progress(sum(len(o) == k for o in outputs), len(conversations))
    return outputs
