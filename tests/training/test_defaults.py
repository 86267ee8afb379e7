"""The training defaults learn: one round of judgements at the defaults moves what the model writes.

A synthetic preference on the tiny model: people prefer answers that open with "yes" to the same answer
opening with "no". The property is the share of the two the model would write, σ(log p(yes answer) -
log p(no answer)), on held-out prompts; its extreme is 1. The defaults move it at least a quarter of the
way; the old ones (learning rate 5e-5, one pass whatever the amount of data) barely moved it with DPO.
"""

import pytest
import torch

from tests.training.synthetic import ASKS, TOPICS, split
from training.data import tokenize_pairs
from training.dpo import DPOConfig, train_dpo
from training.grpo import GRPOConfig, train_grpo
from training.logprobs import ReferenceCache, reference_logps, sequence_key
from training.models import load_model

OLD_DEFAULTS = {"learning_rate": 5e-5, "min_steps": 0}
PAIRS = [
    {"prompt": ask.format(topic), "chosen": f"yes, {topic} are fine.", "rejected": f"no, {topic} are fine."}
    for topic in TOPICS
    for ask in ASKS
]
TRAIN, HELD_OUT = split(PAIRS)


def preferred_share(model_dir) -> float:
    model, tokenizer = load_model(str(model_dir))
    pairs = tokenize_pairs(HELD_OUT, tokenizer, max_length=512, max_prompt_length=256).examples
    sequences = [(p.prompt_ids, c) for p in pairs for c in (p.chosen_ids, p.rejected_ids)]
    logps, _ = reference_logps(
        model, sequences, ReferenceCache(None, "x"), pad_id=tokenizer.pad_token_id, batch_size=8, precision="fp32"
    )
    margins = torch.tensor([float(logps[sequence_key(*chosen)].sum() - logps[sequence_key(*rejected)].sum())
                            for chosen, rejected in zip(sequences[::2], sequences[1::2], strict=True)])  # fmt: skip
    return float(torch.sigmoid(margins).mean())


def progress(before: float, after: float) -> float:
    return (after - before) / (1.0 - before)


@pytest.mark.parametrize("algorithm", ["dpo", "grpo"])
def test_the_defaults_move_a_preference_the_old_defaults_barely_moved(tmp_path, tiny_model_dir, algorithm):
    base = preferred_share(tiny_model_dir)
    assert 0.55 < base < 0.7  # the tiny model's own lean, far from the extreme
    moved = {}
    for name, overrides in (("old", OLD_DEFAULTS), ("defaults", {})):
        out = tmp_path / name
        settings = {"precision": "fp32", "save_every": 0, **overrides}  # fp32: the same figures on every CPU
        if algorithm == "dpo":
            train_dpo(
                DPOConfig(**settings), train_examples=TRAIN, eval_examples=[], model=str(tiny_model_dir), out_dir=out
            )
        else:
            groups = [
                {"prompt": p["prompt"], "completions": [p["rejected"], p["chosen"]], "ranks": [2, 1]} for p in TRAIN
            ]
            train_grpo(
                GRPOConfig(**settings), train_examples=groups, eval_examples=[], model=str(tiny_model_dir), out_dir=out
            )
        moved[name] = progress(base, preferred_share(out))
    assert moved["defaults"] >= 0.25, moved  # measured: DPO 0.63, GRPO 0.96
    if algorithm == "dpo":
        assert moved["old"] < 0.15, moved  # measured: 0.09
    else:  # GRPO's two steps on each batch moved this easy preference a third of the way before too
        assert moved["old"] < moved["defaults"] - 0.25, moved  # measured: 0.33
