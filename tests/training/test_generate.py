import pytest
import torch

from training import generate
from training.generate import SamplingConfig, generate_completions, next_tokens, render_prompt
from training.models import CACHE_KWARG, load_model

HELLO = [{"role": "user", "content": "hello"}]
MULTI = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "How do I reverse a list in Python?"},
    {"role": "assistant", "content": "Use reversed(xs)."},
    {"role": "user", "content": "And in place?"},
]
CONVERSATIONS = [HELLO, MULTI, [{"role": "user", "content": "What is the capital of France?"}]]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(str(tiny_model_dir))


def test_k_completions_per_conversation_in_order(tiny):
    model, tokenizer = tiny
    calls = []
    out = generate_completions(
        model,
        tokenizer,
        [HELLO, MULTI, HELLO],
        k=3,
        sampling=SamplingConfig(max_new_tokens=6, seed=1),
        batch_size=4,
        progress=lambda done, total: calls.append((done, total)),
    )
    assert [len(c) for c in out] == [3, 3, 3]
    assert all(isinstance(s.text, str) and s.text == s.text.strip() for c in out for s in c)
    assert "<|im_end|>" not in "".join(s.text for c in out for s in c)
    assert calls[-1] == (3, 3)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    assert tokenizer.padding_side == "right"


def _plain_generate(model, tokenizer, conversations, max_new_tokens):
    """model.generate on the whole batch, greedy: each row's new tokens up to (not including) EOS."""
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer([render_prompt(tokenizer, c) for c in conversations], return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = "right"
    out = model.generate(
        **enc,
        do_sample=False,
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )[:, enc["input_ids"].shape[1] :]
    rows = []
    for row in out.tolist():
        ended = tokenizer.eos_token_id in row
        rows.append((row[: row.index(tokenizer.eos_token_id)] if ended else row, not ended))
    return rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_gives_the_tokens_of_model_generate_on_the_same_batch(tiny_model_dir, dtype):
    model, tokenizer = load_model(str(tiny_model_dir), dtype=dtype)
    # prompts of three lengths sorted shortest first, as generate_completions batches them
    conversations = sorted(CONVERSATIONS, key=lambda c: len(tokenizer(render_prompt(tokenizer, c))["input_ids"]))
    expected = _plain_generate(model, tokenizer, conversations, 24)
    out = generate_completions(
        model, tokenizer, conversations, k=1, sampling=SamplingConfig(temperature=0, max_new_tokens=24)
    )
    for [sample], (tokens, cut) in zip(out, expected, strict=True):
        assert sample.text == tokenizer.decode(tokens, skip_special_tokens=True).strip()
        assert (sample.token_ids, sample.tokens, sample.truncated) == (tuple(tokens), len(tokens), cut)


def test_rows_that_write_eos_leave_the_batch_and_the_others_keep_their_tokens(tiny_model_dir):
    model, tokenizer = load_model(str(tiny_model_dir))
    with torch.no_grad():  # larger weights make the random model's greedy answers vary instead of repeating a token
        for param in model.parameters():
            param.mul_(10)
    conversations = sorted(CONVERSATIONS, key=lambda c: len(tokenizer(render_prompt(tokenizer, c))["input_ids"]))
    plain = _plain_generate(model, tokenizer, conversations, 12)
    # Call EOS a token that the first row writes after a few others and the other rows never
    # write, so the first row ends early and leaves the batch while the others go on to the limit.
    first, others = plain[0][0], [tokens for tokens, _ in plain[1:]]
    stop = next(t for t in first[2:] if t not in first[: first.index(t)] and all(t not in o for o in others))
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(stop)
    expected = _plain_generate(model, tokenizer, conversations, 12)
    assert expected[0] == (first[: first.index(stop)], False)
    assert all(cut for _, cut in expected[1:])
    out = generate_completions(
        model, tokenizer, conversations, k=1, sampling=SamplingConfig(temperature=0, max_new_tokens=12)
    )
    for [sample], (tokens, cut) in zip(out, expected, strict=True):
        assert (sample.text, sample.token_ids, sample.truncated) == (
            tokenizer.decode(tokens, skip_special_tokens=True).strip(),
            tuple(tokens),
            cut,
        )


def test_a_completion_cut_by_the_limit_is_marked_and_counts_its_tokens(tiny):
    model, tokenizer = tiny
    [[sample]] = generate_completions(
        model, tokenizer, [HELLO], k=1, sampling=SamplingConfig(temperature=0, max_new_tokens=5)
    )
    expected = _plain_generate(model, tokenizer, [HELLO], 5)[0]
    assert (sample.tokens, sample.truncated) == (len(expected[0]), expected[1])


def test_seed_makes_sampling_reproducible_and_batching_does_not_change_greedy(tiny):
    model, tokenizer = tiny
    sampling = SamplingConfig(max_new_tokens=8, seed=7)
    a = generate_completions(model, tokenizer, [HELLO, MULTI], k=2, sampling=sampling)
    b = generate_completions(model, tokenizer, [HELLO, MULTI], k=2, sampling=sampling)
    assert a == b
    greedy = SamplingConfig(temperature=0, max_new_tokens=8)
    batched = generate_completions(model, tokenizer, [HELLO, MULTI], k=1, sampling=greedy, batch_size=8)
    single = generate_completions(model, tokenizer, [HELLO, MULTI], k=1, sampling=greedy, batch_size=1)
    assert batched == single


def test_top_p_keeps_the_smallest_set_reaching_it():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    torch.manual_seed(0)
    draws = {int(next_tokens(logits, SamplingConfig(temperature=1, top_p=0.8))) for _ in range(300)}
    assert draws == {0, 1}
    greedy = next_tokens(logits, SamplingConfig(temperature=0))
    assert greedy.tolist() == [0]


@pytest.mark.parametrize("candidates", [2, 3, 12])  # fewer than some rows' nuclei hold, just enough, the whole row
def test_nucleus_draws_follow_the_nucleus_of_a_full_sort_whatever_the_candidates(monkeypatch, candidates):
    monkeypatch.setattr(generate, "NUCLEUS_CANDIDATES", candidates)
    flat = torch.linspace(1.0, 0.9, 12)  # nearly flat, no two alike: the nucleus is 11 of the 12 tokens
    probs = torch.stack(
        [
            torch.tensor([0.02, 0.5, 0.3, 0.1, 0.05, 0.03] + [0.0] * 6),  # nucleus at 0.9: tokens 1, 2, 3
            flat / flat.sum(),  # wider than every candidate set but the last
            torch.tensor([0.0] * 11 + [1.0]),  # one certain token
        ]
    )
    expected = probs.clone()
    expected[0, [0, 4, 5]] = 0.0
    expected[1, 11] = 0.0
    expected = expected / expected.sum(dim=-1, keepdim=True)
    torch.manual_seed(0)
    draws = torch.stack([generate.nucleus_sample(probs, 0.9) for _ in range(6000)])  # (6000, 3)

    for row in range(3):
        counts = torch.bincount(draws[:, row], minlength=12) / len(draws)
        assert torch.allclose(counts, expected[row], atol=0.025), (row, counts)
        assert set(draws[:, row].tolist()) == set(expected[row].nonzero().squeeze(-1).tolist())


def test_draws_follow_the_weights_and_never_take_a_weight_of_zero():
    weights = torch.tensor(
        [
            [0.0, 0.5, 0.0, 0.3, 0.2, 0.0],  # zeros first, between and last
            [0.0, 0.0, 0.0, 0.0, 0.0, 2.0],  # one certain entry, last; weights need not sum to 1
            [3.0, 1.0, 0.0, 0.0, 0.0, 0.0],  # the last entries zero: the draw never runs past the row's total
        ]
    )
    torch.manual_seed(0)
    draws = torch.stack([generate.draw(weights) for _ in range(20000)])  # (20000, 3)
    for row in range(3):
        counts = torch.bincount(draws[:, row], minlength=6) / len(draws)
        assert torch.allclose(counts, weights[row] / weights[row].sum(), atol=0.01), (row, counts)
        assert set(draws[:, row].tolist()) == set(weights[row].nonzero().squeeze(-1).tolist())
    torch.manual_seed(1)
    again = generate.draw(weights.repeat(50, 1))
    torch.manual_seed(1)
    assert torch.equal(generate.draw(weights.repeat(50, 1)), again)  # the seed decides the draws


def test_conversation_must_end_with_a_user_turn(tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="user turn"):
        generate_completions(model, tokenizer, [MULTI[:3]], k=1, sampling=SamplingConfig(max_new_tokens=2))


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="oneDNN has no bf16 on this CPU")
def test_bf16_linears_multiply_with_weights_laid_out_once_and_are_plain_again_after(tiny_model_dir):
    model, _ = load_model(str(tiny_model_dir), dtype=torch.bfloat16)
    linear = model.lm_head
    x = torch.randn(3, linear.in_features, dtype=torch.bfloat16)
    with torch.no_grad(), generate._packed_linears(model):
        assert "forward" in vars(linear)  # the packed product stands in for the layer's own
        inside = linear(x)
    assert torch.equal(inside, torch.nn.functional.linear(x, linear.weight))
    assert "forward" not in vars(linear)


@pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="torch without MKL")
def test_fp32_decoding_steps_multiply_with_weights_packed_for_their_rows_and_prompt_passes_stay_plain(
    tiny_model_dir,
):
    model, _ = load_model(str(tiny_model_dir), dtype=torch.float32)
    linear = model.lm_head
    step = torch.randn(8, 1, linear.in_features)  # a decoding step: one position a row
    prompts = torch.randn(2, 5, linear.in_features)
    with torch.no_grad(), generate._packed_linears(model):
        packed = vars(linear)["forward"]
        full = linear(step)
        assert packed.rows == 8
        assert torch.allclose(full, torch.nn.functional.linear(step, linear.weight), atol=1e-5)
        # five rows still writing are padded to the eight packed for: each row's result is the same
        assert torch.equal(linear(step[:5]), full[:5]) and packed.rows == 8
        assert torch.equal(linear(step[:3]), full[:3]) and packed.rows == 8
        assert linear(step[:2]).shape == (2, 1, linear.out_features) and packed.rows == 2  # a quarter: packed again
        wide = torch.randn(33, 1, linear.in_features)  # more rows than a step that packing pays for
        assert torch.equal(linear(wide), torch.nn.functional.linear(wide, linear.weight)) and packed.rows == 2
        assert torch.equal(linear(prompts), torch.nn.functional.linear(prompts, linear.weight)) and packed.rows == 2
    assert "forward" not in vars(linear)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), generate._packed_linears(model):
        assert "forward" not in vars(linear)  # autocast casts the layer as it is


def test_rows_that_end_give_their_places_to_the_last_survivors_and_the_cache_follows():
    ended = torch.tensor([False, True, False, False, True, False])
    order = generate._survivors(ended)
    assert order.tolist() == [0, 5, 2, 3]
    assert generate._survivors(torch.zeros(3, dtype=torch.bool)).tolist() == [0, 1, 2]
    assert generate._survivors(torch.ones(3, dtype=torch.bool)).tolist() == []
    layer = generate._PreallocatedLayer(capacity=5)
    keys, values = torch.randn(6, 2, 3, 4), torch.randn(6, 2, 3, 4)
    layer.update(keys, values)
    layer.batch_select_indices(order)
    assert torch.equal(layer.keys, keys[order]) and torch.equal(layer.values, values[order])
    step = torch.randn(4, 2, 1, 4)
    got_keys, _ = layer.update(step, step)
    assert torch.equal(got_keys, torch.cat([keys[order], step], dim=2))
    assert layer.get_seq_length() == 4


@pytest.mark.parametrize(
    ("dtype", "autocast"), [(torch.float32, False), (torch.bfloat16, False), (torch.float32, True)]
)
@pytest.mark.parametrize("padded", [True, False])
def test_a_llama_decoding_step_written_out_gives_the_models_logits_to_the_bit(tiny_model_dir, dtype, autocast, padded):
    model, _ = load_model(str(tiny_model_dir), dtype=dtype)
    assert generate._LlamaStep.fits(model)
    torch.manual_seed(0)
    prompts = torch.randint(3, model.config.vocab_size, (3, 6))
    mask = torch.ones(3, 6, dtype=torch.long)
    if padded:
        mask[0, :4] = mask[2, :1] = 0  # left padding, as generate_completions pads its prompts
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    caches = [generate._decoding_cache(10), generate._decoding_cache(10)]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        for cache in caches:
            model(
                input_ids=prompts, attention_mask=mask, position_ids=positions, **{CACHE_KWARG: cache}, use_cache=True
            )
        tokens, position = torch.tensor([[5], [7], [9]]), positions[:, -1:] + 1
        mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], dim=-1)
        for _ in range(2):  # the second step reads the first one's keys and values from the cache
            expected = model(
                input_ids=tokens,
                attention_mask=mask,
                position_ids=position,
                **{CACHE_KWARG: caches[0]},
                use_cache=True,
            ).logits
            got = generate._LlamaStep(model)(tokens, mask, position, caches[1])
            assert got.shape == (3, 1, model.config.vocab_size) and torch.equal(got, expected)
            tokens, position = expected[:, -1].argmax(-1, keepdim=True), position + 1
            mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], dim=-1)
    model.set_attn_implementation("eager")
    assert not generate._LlamaStep.fits(model)  # other attention decodes through the model's forward
