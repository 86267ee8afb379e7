import json

import pytest
import torch

from training.data import (
    DataFormatError,
    collate_pairs,
    length_sorted_batches,
    read_records,
    rewards_from_ranks,
    split_by_prompt,
    tokenize_groups,
    tokenize_pairs,
)
from training.logprobs import completion_mask
from training.models import load_model


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_model(str(tiny_model_dir))[1]


def test_pad_equals_eos_masks_come_from_lengths(tokenizer):
    eos = tokenizer.eos_token_id
    assert tokenizer.pad_token_id == eos
    data = tokenize_pairs(
        [{"prompt": "hello", "chosen": "good answer", "rejected": ""}],
        tokenizer,
        max_length=64,
        max_prompt_length=32,
    )
    [pair] = data.examples
    assert pair.chosen_ids[-1] == eos
    assert pair.rejected_ids == [eos]  # an empty completion is just its EOS, still one real token
    batch = collate_pairs([pair], pad_id=tokenizer.pad_token_id)
    # The rejected row is padded with EOS ids, yet only its first EOS counts.
    rejected_row = batch.input_ids[1]
    real = int(batch.attention_mask[1].sum())
    assert real == len(pair.prompt_ids) + 1
    assert (rejected_row[real - 1 :] == eos).all()
    mask = completion_mask(batch.completion_lengths)
    assert mask.tolist()[1] == [1.0] + [0.0] * (mask.shape[1] - 1)
    assert mask[0].sum() == len(pair.chosen_ids)


def test_multi_turn_prompt_goes_through_the_chat_template(tokenizer):
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hi"},
        {"role": "user", "content": "Tell me about cats."},
    ]
    [pair] = tokenize_pairs(
        [{"prompt": messages, "chosen": "yes", "rejected": "no"}], tokenizer, max_length=128, max_prompt_length=100
    ).examples
    text = tokenizer.decode(pair.prompt_ids)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n"
        "<|im_start|>assistant\nhi<|im_end|>\n<|im_start|>user\nTell me about cats.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_conversational_completions_are_accepted(tokenizer):
    [pair] = tokenize_pairs(
        [
            {
                "prompt": [{"role": "user", "content": "hello"}],
                "chosen": [{"role": "assistant", "content": "good"}],
                "rejected": [{"role": "assistant", "content": "bad"}],
            }
        ],
        tokenizer,
        max_length=64,
        max_prompt_length=32,
    ).examples
    assert tokenizer.decode(pair.chosen_ids) == "good<|im_end|>"


def test_truncation_rule_cuts_completions_and_drops_long_prompts(tokenizer):
    long_text = " ".join(["cats and dogs"] * 30)
    records = [
        {"prompt": "hello", "chosen": long_text, "rejected": "no"},
        {"prompt": long_text, "chosen": "yes", "rejected": "no"},
    ]
    data = tokenize_pairs(records, tokenizer, max_length=40, max_prompt_length=20)
    assert data.dropped_long_prompt == 1
    assert data.truncated == 1
    [pair] = data.examples
    assert len(pair.prompt_ids) + len(pair.chosen_ids) == 40
    assert pair.chosen_ids[-1] != tokenizer.eos_token_id  # a cut completion has no EOS
    assert pair.rejected_ids[-1] == tokenizer.eos_token_id


def test_missing_fields_and_bad_prompts_name_the_line(tmp_path, tokenizer):
    path = tmp_path / "pairs.jsonl"
    path.write_text(
        json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"})
        + "\n\n"
        + json.dumps({"prompt": "a", "completions": ["b", "c"], "ranks": [1, 2]})
        + "\n"
    )
    records = read_records(path)
    with pytest.raises(DataFormatError, match=r"line 3: missing field 'chosen'"):
        tokenize_pairs(records, tokenizer, max_length=64, max_prompt_length=32)
    bad_prompt = [{"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}]
    with pytest.raises(DataFormatError, match="last message must be a user turn"):
        tokenize_groups(
            [{**bad_prompt[0], "completions": ["x", "y"], "rewards": [1, 0]}],
            tokenizer,
            max_length=64,
            max_prompt_length=32,
        )


def test_read_records_reports_invalid_json_with_its_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": \n')
    with pytest.raises(DataFormatError, match=r"line 2: invalid JSON"):
        read_records(path)
    with pytest.raises(DataFormatError, match="no such file"):
        read_records(tmp_path / "missing.jsonl")


def test_read_records_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": "a", "chosen": "b", "rejected": "c", "weight": 0.5}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pairs.parquet")
    assert read_records(tmp_path / "pairs.parquet") == rows


@pytest.mark.parametrize(
    ("ranks", "expected"),
    [
        ([1, 2, 3], [1.0, 0.5, 0.0]),
        ([3, 1, 2], [0.0, 1.0, 0.5]),
        ([1, 1, 3], [0.75, 0.75, 0.0]),  # the tied pair shares places 1 and 2
        ([1, 1, 2], [0.75, 0.75, 0.0]),  # dense numbering gives the same rewards
        ([1, 2, 2, 2], [1.0, 1 / 3, 1 / 3, 1 / 3]),
        ([2, 2], [0.5, 0.5]),
    ],
)
def test_rewards_from_ranks(ranks, expected):
    assert rewards_from_ranks(ranks) == pytest.approx(expected)


def test_groups_average_annotators_and_skip_equal_rewards(tokenizer):
    records = [
        {"prompt": "a", "completions": ["x", "y", "z"], "ranks": [[1, 2, 3], [2, 1, 3]]},
        {"prompt": "b", "completions": ["x", "y"], "ranks": [1, 1]},
        {"prompt": "c", "completions": ["x", "y"], "rewards": [0.2, 0.9], "ranks": [1, 2]},
    ]
    data = tokenize_groups(records, tokenizer, max_length=64, max_prompt_length=32)
    assert data.dropped_equal_rewards == 1
    assert [g.rewards for g in data.examples] == [pytest.approx([0.75, 0.75, 0.0]), [0.2, 0.9]]


def test_split_by_prompt_keeps_each_prompt_on_one_side():
    records = [{"prompt": f"p{i % 10}", "chosen": "a", "rejected": str(i)} for i in range(50)]
    train, held = split_by_prompt(records, 0.2, seed=3)
    assert {r["prompt"] for r in train}.isdisjoint({r["prompt"] for r in held})
    assert len({r["prompt"] for r in held}) == 2
    assert len(train) + len(held) == 50


def test_length_sorted_batches_cover_everything_once_and_waste_little_padding():
    lengths = [((i * 37) % 100) + 1 for i in range(200)]
    batches = length_sorted_batches(lengths, 8, seed=0)
    assert sorted(i for b in batches for i in b) == list(range(200))
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    naive = sum(8 * max(lengths[i] for i in range(s, min(s + 8, 200))) for s in range(0, 200, 8))
    assert padded < 0.8 * naive
    assert batches == length_sorted_batches(lengths, 8, seed=0)
    assert batches != length_sorted_batches(lengths, 8, seed=1)


def test_collate_pairs_puts_chosen_first_and_right_pads(tokenizer):
    data = tokenize_pairs(
        [
            {"prompt": "hello", "chosen": "good answer please", "rejected": "no"},
            {"prompt": "Tell me about cats.", "chosen": "yes", "rejected": "bad"},
        ],
        tokenizer,
        max_length=64,
        max_prompt_length=32,
    )
    batch = collate_pairs(data.examples, pad_id=tokenizer.pad_token_id)
    assert batch.input_ids.shape[0] == 4
    first = data.examples[0]
    n = len(first.prompt_ids) + len(first.chosen_ids)
    assert batch.input_ids[0, :n].tolist() == first.prompt_ids + first.chosen_ids
    assert batch.completion_lengths.tolist() == [
        len(data.examples[0].chosen_ids),
        len(data.examples[1].chosen_ids),
        len(data.examples[0].rejected_ids),
        len(data.examples[1].rejected_ids),
    ]
    assert torch.equal(batch.attention_mask.sum(1), batch.prompt_lengths + batch.completion_lengths)
