import math

import pytest
import torch

from training.loss_types import DPO_LOSS_TYPES, DPO_SMOOTHED_LOSS_TYPES, GRPO_LOSS_TYPES
from training.losses import dpo_loss, group_advantages, grpo_loss

# h = (pc - rc) - (pr - rr) = (-1 + 1.5) - (-2 + 1.5) = 1.0 for these numbers.
PC, PR, RC, RR = torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.5]), torch.tensor([-1.5])


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_sigmoid_by_hand():
    losses, chosen, rejected = dpo_loss(PC, PR, RC, RR, beta=0.1)
    assert losses.item() == pytest.approx(0.6443966600735709, abs=1e-6)  # -logσ(0.1) = log(1 + e^-0.1)
    assert chosen.item() == pytest.approx(0.05)
    assert rejected.item() == pytest.approx(-0.05)


def test_sigmoid_with_label_smoothing_by_hand():
    losses, _, _ = dpo_loss(PC, PR, RC, RR, beta=0.1, label_smoothing=0.1)
    assert losses.item() == pytest.approx(0.9 * softplus(-0.1) + 0.1 * softplus(0.1), abs=1e-6)
    assert losses.item() == pytest.approx(0.6543967, abs=1e-6)


def test_ipo_by_hand_with_and_without_lengths():
    losses, _, _ = dpo_loss(PC, PR, RC, RR, beta=0.1, loss_type="ipo")
    assert losses.item() == pytest.approx(16.0)  # (1 - 1/(2·0.1))²
    losses, _, _ = dpo_loss(
        PC,
        PR,
        RC,
        RR,
        beta=0.1,
        loss_type="ipo",
        chosen_lengths=torch.tensor([2.0]),
        rejected_lengths=torch.tensor([4.0]),
    )
    assert losses.item() == pytest.approx((0.5 / 2 + 0.5 / 4 - 5) ** 2)  # 21.390625


def test_hinge_by_hand():
    assert dpo_loss(PC, PR, RC, RR, beta=0.1, loss_type="hinge")[0].item() == pytest.approx(0.9)
    assert dpo_loss(PC, PR, RC, RR, beta=2.0, loss_type="hinge")[0].item() == 0.0


def test_robust_by_hand():
    losses, _, _ = dpo_loss(PC, PR, RC, RR, beta=0.1, loss_type="robust", label_smoothing=0.1)
    expected = (0.9 * softplus(-0.1) - 0.1 * softplus(0.1)) / 0.8
    assert losses.item() == pytest.approx(expected, abs=1e-6)
    assert losses.item() == pytest.approx(0.6318966, abs=1e-6)


def test_robust_without_noise_is_sigmoid():
    a = dpo_loss(PC, PR, RC, RR, beta=0.3, loss_type="robust")[0]
    b = dpo_loss(PC, PR, RC, RR, beta=0.3)[0]
    torch.testing.assert_close(a, b)


def test_weights_scale_each_pair_and_shapes_are_per_pair():
    pc = torch.tensor([-1.0, -3.0, -2.0])
    pr = torch.tensor([-2.0, -1.0, -2.0])
    ref = torch.zeros(3)
    unweighted, chosen, rejected = dpo_loss(pc, pr, ref, ref, beta=0.5)
    weighted, _, _ = dpo_loss(pc, pr, ref, ref, beta=0.5, weights=torch.tensor([1.0, 0.5, 0.0]))
    assert unweighted.shape == chosen.shape == rejected.shape == (3,)
    torch.testing.assert_close(weighted, unweighted * torch.tensor([1.0, 0.5, 0.0]))
    # A pair whose policy equals the reference sits at log 2 whatever the log-probs.
    assert unweighted[2].item() == pytest.approx(math.log(2))


def test_dpo_rewards_carry_no_gradient_and_loss_does():
    pc = torch.tensor([-1.0], requires_grad=True)
    losses, chosen, _ = dpo_loss(pc, PR, RC, RR)
    losses.sum().backward()
    assert not chosen.requires_grad
    assert pc.grad is not None and pc.grad.item() < 0  # raising the chosen log-prob lowers the loss


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_every_named_dpo_loss_prefers_the_chosen_side_and_reads_label_smoothing_as_named(loss_type):
    # the policy moved towards the chosen side (h = 1 > 0): more of that lowers every loss
    better = dpo_loss(PC + 1, PR, RC, RR, beta=0.1, loss_type=loss_type)[0]
    plain = dpo_loss(PC, PR, RC, RR, beta=0.1, loss_type=loss_type)[0]
    assert torch.isfinite(plain).all() and better.item() < plain.item()
    smoothed = dpo_loss(PC, PR, RC, RR, beta=0.1, loss_type=loss_type, label_smoothing=0.1)[0]
    assert (smoothed.item() != plain.item()) == (loss_type in DPO_SMOOTHED_LOSS_TYPES)


@pytest.mark.parametrize("loss_type", GRPO_LOSS_TYPES)
def test_every_named_grpo_loss_is_finite(loss_type):
    logps = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    loss = grpo_loss(logps, logps, logps, torch.tensor([1.0, -1.0]), mask, loss_type=loss_type)
    assert torch.isfinite(loss)


def test_unknown_loss_type_is_rejected():
    with pytest.raises(ValueError, match="unknown DPO loss_type"):
        dpo_loss(PC, PR, RC, RR, loss_type="kto")


def test_group_advantages_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 0.5], [2.0, 2.0, 5.0]])
    adv = group_advantages(rewards)
    assert adv.shape == (2, 3)
    std0 = 0.5  # unbiased std of (1, 0, 0.5)
    torch.testing.assert_close(adv[0], torch.tensor([0.5, -0.5, 0.0]) / (std0 + 1e-4))
    std1 = math.sqrt(3.0)  # unbiased std of (2, 2, 5)
    torch.testing.assert_close(adv[1], torch.tensor([-1.0, -1.0, 2.0]) / (std1 + 1e-4))
    torch.testing.assert_close(group_advantages(rewards, scale="none"), rewards - rewards.mean(1, keepdim=True))


def test_group_advantages_equal_rewards_are_zero():
    assert group_advantages(torch.tensor([[0.5, 0.5, 0.5]])).abs().max().item() == 0.0


def test_grpo_clipping_by_hand():
    old = torch.zeros(1, 2)
    logps = torch.log(torch.tensor([[1.5, 0.5]]))  # ratios 1.5 and 0.5
    mask = torch.ones(1, 2)
    kw = {"beta": 0.0, "epsilon": 0.2}
    # A > 0: -min(1.5, 1.2) = -1.2 and -min(0.5, 0.8) = -0.5
    assert grpo_loss(logps, old, logps, torch.tensor([1.0]), mask, **kw).item() == pytest.approx(-0.85)
    # A < 0: -min(-1.5, -1.2) = 1.5 and -min(-0.5, -0.8) = 0.8
    assert grpo_loss(logps, old, logps, torch.tensor([-1.0]), mask, **kw).item() == pytest.approx(1.15)
    # clip-higher: the upper bound moves to 1.28
    high = grpo_loss(logps, old, logps, torch.tensor([1.0]), mask, epsilon_high=0.28, **kw)
    assert high.item() == pytest.approx((-1.28 - 0.5) / 2)


def test_grpo_k3_kl_by_hand():
    logps = torch.log(torch.tensor([[1.5, 0.5]]))
    ref = torch.zeros(1, 2)
    zero_adv = torch.tensor([0.0])
    loss = grpo_loss(logps, logps, ref, zero_adv, torch.ones(1, 2), beta=0.5)
    kl = [(2 / 3) + math.log(1.5) - 1, 2 + math.log(0.5) - 1]  # exp(d) - d - 1 with d = ref - logp
    assert loss.item() == pytest.approx(0.5 * sum(kl) / 2, abs=1e-6)


def test_grpo_normalisations_by_hand():
    # ratio 1 everywhere, no KL: the per-token loss is -A on real tokens.
    logps = torch.zeros(2, 3)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    adv = torch.tensor([1.0, -3.0])
    kw = {"beta": 0.0}
    assert grpo_loss(logps, logps, logps, adv, mask, loss_type="grpo", **kw).item() == pytest.approx((-1 + 3) / 2)
    assert grpo_loss(logps, logps, logps, adv, mask, loss_type="dapo", **kw).item() == pytest.approx((-2 + 3) / 3)
    assert grpo_loss(logps, logps, logps, adv, mask, loss_type="dr_grpo", **kw).item() == pytest.approx(1 / 6)


def test_grpo_padding_does_not_leak():
    logps = torch.tensor([[-1.0, -2.0, 123.0]])
    old = torch.tensor([[-1.1, -2.0, -50.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    a = grpo_loss(logps, old, old, torch.tensor([1.0]), mask)
    b = grpo_loss(logps[:, :2], old[:, :2], old[:, :2], torch.tensor([1.0]), mask[:, :2])
    torch.testing.assert_close(a, b)


def test_grpo_gradient_pushes_up_positive_advantage():
    logps = torch.tensor([[-1.0, -1.0]], requires_grad=True)
    loss = grpo_loss(logps, logps.detach(), logps.detach(), torch.tensor([1.0]), torch.ones(1, 2))
    loss.backward()
    assert (logps.grad < 0).all()
