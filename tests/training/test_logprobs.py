import torch

from tests.tiny_model import tiny_lora_model
from training.data import collate_sequences, sequence_key
from training.logprobs import (
    ReferenceCache,
    completion_logps,
    grouped_logps,
    prompt_batches,
    reference_logps,
    sequence_logps,
    shared_prompt_logps,
    token_logps_chunked,
)
from training.models import LoraSettings, apply_lora, load_model

PROMPTS = [[1, 40, 41, 42, 43], [1, 50], [1, 60, 61]]
COMPLETIONS = [[70, 71, 2], [2], [80, 81, 82, 83, 2]]


def full_softmax_logps(model, batch):
    logp = torch.log_softmax(model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits, -1)
    rows = []
    for i, (p, c) in enumerate(zip(PROMPTS, COMPLETIONS, strict=True)):
        rows.append(torch.stack([logp[i, len(p) - 1 + j, tok] for j, tok in enumerate(c)]))
    return rows


def test_completion_logps_match_a_full_log_softmax_for_any_chunk_size(tiny_model_dir):
    model, _ = load_model(str(tiny_model_dir))
    batch = collate_sequences(PROMPTS, COMPLETIONS, pad_id=2)
    expected = full_softmax_logps(model, batch)
    for chunk in (1, 3, 4096):
        got = completion_logps(model, batch, chunk_size=chunk)
        assert got.shape == (3, 5)
        for i, row in enumerate(expected):
            torch.testing.assert_close(got[i, : len(row)], row, atol=1e-5, rtol=1e-5)
            assert (got[i, len(row) :] == 0).all()
    sums = sequence_logps(model, batch)
    torch.testing.assert_close(sums, torch.stack([r.sum() for r in expected]), atol=1e-5, rtol=1e-5)


def plain_token_logps(hidden, head, targets):
    logits = head(hidden).float()
    return logits.gather(1, targets.unsqueeze(1)).squeeze(1) - torch.logsumexp(logits, dim=-1)


def test_the_output_projection_gives_the_plain_expressions_values_and_gradients():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50, bias=True)
    hidden = torch.randn(37, 8)  # 37 rows: row blocks and chunks that do not divide evenly
    targets = torch.randint(0, 50, (37,))
    upstream = torch.randn(37)

    def values_and_grads(fn):
        head.zero_grad()
        h = hidden.clone().requires_grad_()
        out = fn(h)
        (out * upstream).sum().backward()
        return out.detach(), h.grad, head.weight.grad.clone(), head.bias.grad.clone()

    expected = values_and_grads(lambda h: plain_token_logps(h, head, targets))
    for chunk in (5, 4096):
        got = values_and_grads(lambda h, chunk=chunk: token_logps_chunked(h, head, targets, chunk))
        for g, e in zip(got, expected, strict=True):
            torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)


def test_the_output_projection_under_bf16_autocast_matches_autocasts_own_numbers():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 300, bias=False).requires_grad_(False)
    hidden = torch.randn(40, 16)
    targets = torch.randint(0, 300, (40,))
    results = []
    for fn in (lambda h: plain_token_logps(h, head, targets), lambda h: token_logps_chunked(h, head, targets, 2048)):
        h = hidden.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fn(h)
        assert out.dtype == torch.float32
        out.sum().backward()
        results.append((out.detach(), h.grad))
    (plain, plain_grad), (fused, fused_grad) = results
    assert torch.equal(fused, plain)  # the same bf16 logits, reduced in float32 the same way
    torch.testing.assert_close(fused_grad, plain_grad, atol=1e-2, rtol=1e-2)


def test_padding_does_not_change_a_sequence_log_prob(tiny_model_dir):
    model, _ = load_model(str(tiny_model_dir))
    alone = sequence_logps(model, collate_sequences(PROMPTS[1:2], COMPLETIONS[1:2], pad_id=2))
    batched = sequence_logps(model, collate_sequences(PROMPTS, COMPLETIONS, pad_id=2))
    torch.testing.assert_close(alone[0], batched[1], atol=1e-5, rtol=1e-5)


def test_gradients_flow_to_lora_adapters(tiny_model_dir):
    model, _ = load_model(str(tiny_model_dir))
    model = apply_lora(model, LoraSettings(r=2, alpha=4))
    sequence_logps(model, collate_sequences(PROMPTS, COMPLETIONS, pad_id=2)).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all("lora_" in n for n in grads)
    assert any(
        g is not None and g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n
    )  # B starts at 0, so A gets none yet


def test_reference_cache_round_trip_and_reuse(tmp_path, tiny_model_dir):
    model, _ = load_model(str(tiny_model_dir))
    sequences = list(zip(PROMPTS, COMPLETIONS, strict=True))
    cache = ReferenceCache(tmp_path, "fp")
    first, computed = reference_logps(model, sequences, cache, pad_id=2, batch_size=2, precision="fp32")
    assert computed == 3
    assert len(list((tmp_path / "fp").glob("*.safetensors"))) == 1

    reopened = ReferenceCache(tmp_path, "fp")
    extra = ([1, 90], [91, 2])
    second, computed = reference_logps(model, [*sequences, extra], reopened, pad_id=2, batch_size=2, precision="fp32")
    assert computed == 1  # only the new sequence ran through the model
    for key, value in first.items():
        torch.testing.assert_close(second[key], value)
    assert second[sequence_key(*extra)].shape == (2,)
    assert ReferenceCache(tmp_path, "another-model").get(sequence_key(*extra)) is None


def test_shared_prompt_pass_matches_whole_sequences_with_gradients(tiny_model_dir):
    model, _ = tiny_lora_model(tiny_model_dir, r=2, alpha=4, std=0.3)
    owner = [0, 1, 2, 0, 2]  # prompts of different lengths, one used twice, in any order
    completions = [*COMPLETIONS, [72, 73, 2], [84, 2]]
    whole = completion_logps(model, collate_sequences([PROMPTS[o] for o in owner], completions, pad_id=2))
    whole.sum().backward()
    expected_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()

    shared = shared_prompt_logps(model, PROMPTS, completions, owner, pad_id=2)
    torch.testing.assert_close(shared, whole, atol=1e-5, rtol=1e-5)
    shared.sum().backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, expected_grads[name], atol=1e-5, rtol=1e-4)


def test_reference_pass_shares_each_prompt_and_gives_the_per_sequence_numbers(tiny_model_dir):
    model, _ = load_model(str(tiny_model_dir))
    # Two completions per prompt, as DPO pairs have; batches of 3 completions never split a prompt's group.
    sequences = [(p, c) for p in PROMPTS for c in COMPLETIONS[:2]]
    seen: list[tuple[int, int]] = []
    shared, computed = reference_logps(
        model,
        sequences,
        ReferenceCache(None, "fp"),
        pad_id=2,
        batch_size=3,
        precision="fp32",
        on_batch=lambda done, total: seen.append((done, total)),
    )
    assert computed == 6 and seen == [(2, 6), (4, 6), (6, 6)]
    alone, _ = reference_logps(
        model, sequences, ReferenceCache(None, "fp"), pad_id=2, batch_size=3, precision="fp32", share_prompt=False
    )
    expected = completion_logps(model, collate_sequences(*zip(*sequences, strict=True), pad_id=2))
    for row, (prompt, completion) in enumerate(sequences):
        key = sequence_key(prompt, completion)
        torch.testing.assert_close(shared[key], expected[row, : len(completion)], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(alone[key], expected[row, : len(completion)], atol=1e-5, rtol=1e-5)


def test_grouped_logps_run_each_distinct_prompt_once_and_agree_with_whole_sequences(tiny_model_dir):
    model, _ = load_model(str(tiny_model_dir))
    owner = [2, 0, 2, 1, 0]  # a prompt's completions need not be next to each other
    sequences = [(PROMPTS[o], c) for o, c in zip(owner, [*COMPLETIONS, [72, 73, 2], [84, 2]], strict=True)]
    rows_embedded: list[int] = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, args, out: rows_embedded.append(out.shape[0]))
    shared = grouped_logps(model, sequences, pad_id=2, share_prompt=True)
    assert rows_embedded == [3, 5]  # the three prompts once, then the five completions on their cache
    rows_embedded.clear()
    whole = grouped_logps(model, sequences, pad_id=2, share_prompt=False)
    assert rows_embedded == [5]
    hook.remove()
    expected = completion_logps(model, collate_sequences(*zip(*sequences, strict=True), pad_id=2))
    torch.testing.assert_close(whole, expected)
    torch.testing.assert_close(shared, expected, atol=1e-5, rtol=1e-5)


def test_prompt_batches_keep_a_prompts_completions_together_shortest_first():
    sequences = [([1, 2, 3], [4]), ([5], [6]), ([1, 2, 3], [7, 8, 9]), ([5], [6, 6]), ([9, 9], [1])]
    assert prompt_batches(sequences, 2, share_prompt=True) == [[1, 3], [4], [0, 2]]
    assert prompt_batches(sequences, 3, share_prompt=True) == [[1, 3, 4], [0, 2]]
    assert prompt_batches(sequences, 1, share_prompt=True) == [[1, 3], [4], [0, 2]]  # a group is never split
    assert prompt_batches(sequences, 2, share_prompt=False) == [[1, 3], [4, 0], [2]]
