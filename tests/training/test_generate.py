import pytest

from training.generate import SamplingConfig, generate_completions
from training.models import load_model

HELLO = [{"role": "user", "content": "hello"}]
MULTI = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "How do I reverse a list in Python?"},
    {"role": "assistant", "content": "Use reversed(xs)."},
    {"role": "user", "content": "And in place?"},
]


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
    assert all(isinstance(t, str) and t == t.strip() for c in out for t in c)
    assert "<|im_end|>" not in "".join(t for c in out for t in c)
    assert calls[-1] == (3, 3)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    assert tokenizer.padding_side == "right"


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


def test_conversation_must_end_with_a_user_turn(tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="user turn"):
        generate_completions(model, tokenizer, [MULTI[:3]], k=1, sampling=SamplingConfig(max_new_tokens=2))
