import json
from pathlib import Path

import pytest
import torch

from training.rollouts import prompt_plan
from training.runs import (
    implicit_reward_metrics,
    kendall_tau,
    logp_metrics,
    lr_factor,
    resolve_precision,
    step_plan,
)


def test_implicit_reward_metrics_by_hand():
    m = implicit_reward_metrics(
        policy_chosen=torch.tensor([-1.0, -2.0, -3.0, -1.0]),
        policy_rejected=torch.tensor([-2.0, -1.0, -3.0, -1.5]),
        ref_chosen=torch.tensor([-1.5, -1.0, -3.0, -1.0]),
        ref_rejected=torch.tensor([-1.5, -1.5, -3.0, -1.0]),
        beta=0.1,
    )
    # margins: 0.1·(0.5 + 0.5), 0.1·(-1 - 0.5), 0, 0.1·(0 + 0.5)
    assert m["accuracy"] == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    assert m["margin"] == pytest.approx((0.1 - 0.15 + 0 + 0.05) / 4, abs=1e-7)


def test_logp_metrics_by_hand():
    m = logp_metrics(
        torch.tensor([-1.0, -2.0, -3.0, -6.0]),
        torch.tensor([-2.0, -1.0, -3.0, -4.0]),
        chosen_lengths=torch.tensor([1, 1, 1, 6]),
        rejected_lengths=torch.tensor([1, 1, 1, 2]),
    )
    # summed: wins, loses, tie (not a win), loses; per token: -1 > -2, -2 < -1, -3 = -3, -1 > -2
    assert m["logp_accuracy"] == pytest.approx(1 / 4)
    assert m["logp_accuracy_per_token"] == pytest.approx(2 / 4)
    assert m["logp_margin"] == pytest.approx((1 - 1 + 0 - 2) / 4)
    assert m["pairs"] == 4


def test_no_held_out_pairs_gives_json_safe_metrics():
    empty = torch.zeros(0)
    m = logp_metrics(empty, empty, chosen_lengths=empty, rejected_lengths=empty)
    m |= implicit_reward_metrics(empty, empty, empty, empty, beta=0.1)
    assert m == {
        "logp_accuracy": None,
        "logp_accuracy_per_token": None,
        "logp_margin": None,
        "pairs": 0,
        "accuracy": None,
        "margin": None,
    }
    json.loads(json.dumps(m, allow_nan=False))


def test_kendall_tau_b_by_hand():
    assert kendall_tau([3.0, 2.0, 1.0], [1.0, 0.5, 0.0]) == pytest.approx(1.0)
    assert kendall_tau([1.0, 2.0, 3.0], [1.0, 0.5, 0.0]) == pytest.approx(-1.0)
    # pairs (0,1) concordant, (0,2) concordant, (1,2) tied in the rewards: tau-b = 2 / sqrt(3 · 2)
    assert kendall_tau([3.0, 2.0, 1.0], [1.0, 0.0, 0.0]) == pytest.approx(2 / 6**0.5)
    # (0,1) tied in the scores, (0,2) and (1,2) discordant, the other three concordant: (3 - 2) / sqrt(5 · 6)
    assert kendall_tau([1.0, 1.0, 2.0, 0.0], [1.0, 0.5, 0.25, 0.0]) == pytest.approx(1 / 30**0.5)
    assert kendall_tau([1.0, 1.0], [1.0, 0.0]) is None  # the scores are all tied


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        ("constant", [0.5, 1.0, 1.0, 1.0, 1.0]),
        ("linear", [0.5, 1.0, 0.75, 0.5, 0.25]),
        ("cosine", [0.5, 1.0, 0.8535534, 0.5, 0.1464466]),
    ],
)
def test_lr_factor_warms_up_then_follows_the_schedule(schedule, expected):
    factor = lr_factor(schedule, warmup_steps=1, total_steps=5)
    assert [factor(s) for s in range(5)] == pytest.approx(expected)


def test_precision_explicit_is_kept():
    assert resolve_precision("fp32", torch.device("cpu")) == "fp32"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"


@pytest.mark.parametrize(
    ("cpuinfo", "expected"),
    [
        ("processor : 0\nflags : fpu sse2 avx2 avx512f avx512_bf16 amx_tile\n", "bf16"),
        ("processor : 0\nflags : fpu sse2 avx2 amx_bf16\n", "bf16"),
        ("processor : 0\nflags : fpu sse2 avx2 avx512f avx512_vnni\n", "fp32"),  # bf16 would be emulated: slow
    ],
)
def test_precision_auto_on_the_cpu_follows_its_bf16_units(monkeypatch, cpuinfo, expected):
    real_read_text = Path.read_text

    def read_text(path, *args, **kwargs):
        return cpuinfo if str(path) == "/proc/cpuinfo" else real_read_text(path, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_text)
    assert resolve_precision("auto", torch.device("cpu")) == expected


def test_precision_auto_without_cpuinfo_is_fp32(monkeypatch):
    def unreadable(path, *args, **kwargs):
        raise FileNotFoundError(path)

    monkeypatch.setattr(Path, "read_text", unreadable)
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"


def test_step_plan_covers_every_epoch_in_a_fixed_order():
    plan = step_plan([5, 3, 9, 1, 7, 2, 8], batch_size=2, accumulation=2, epochs=2, seed=4)
    micro = [idx for step in plan for idx in step]
    assert sorted(i for idx in micro for i in idx) == sorted(list(range(7)) * 2)
    assert plan == step_plan([5, 3, 9, 1, 7, 2, 8], batch_size=2, accumulation=2, epochs=2, seed=4)
    assert len(plan) == 4  # 4 micro-batches per epoch, 2 per step


def test_step_plan_passes_over_a_small_set_again_until_it_reaches_min_steps_and_no_further():
    lengths = [5, 3, 9, 1, 7, 2, 8]  # 4 micro-batches of 2, 2 steps an epoch
    plan = step_plan(lengths, batch_size=2, accumulation=2, epochs=1, seed=4, min_steps=5)
    assert len(plan) == 5  # two whole passes and one step of a third, not three whole passes
    assert plan[:4] == step_plan(lengths, batch_size=2, accumulation=2, epochs=2, seed=4)
    assert len(step_plan(lengths, batch_size=2, accumulation=2, epochs=4, seed=4, min_steps=5)) == 8  # epochs rule
    assert (
        len(step_plan(lengths, batch_size=2, accumulation=1, epochs=1, seed=4, min_steps=4)) == 4
    )  # one epoch is enough
    assert step_plan([], batch_size=2, accumulation=1, epochs=1, seed=4, min_steps=4) == []
    # GRPO's batches each take num_iterations steps: 2 batches x 2 steps an epoch, so 5 steps need 3 batches.
    assert len(step_plan(lengths, batch_size=4, accumulation=1, epochs=1, seed=4, min_steps=5, steps_per_batch=2)) == 3


def test_prompt_plan_counts_min_steps_in_optimizer_steps():
    # 5 prompts in batches of 2: 3 rollout batches an epoch, each trained on twice.
    plan = prompt_plan(5, batch_size=2, epochs=1, seed=0, min_steps=7, steps_per_batch=2)
    assert len(plan) == 4  # 8 steps: a whole pass and one batch of the next
    assert sorted(map(tuple, plan[:3])) == [(0, 1), (2, 3), (4,)]
    assert len(prompt_plan(5, batch_size=2, epochs=1, seed=0, min_steps=6, steps_per_batch=2)) == 3
    assert len(prompt_plan(5, batch_size=2, epochs=3, seed=0, min_steps=7, steps_per_batch=2)) == 9  # epochs rule
