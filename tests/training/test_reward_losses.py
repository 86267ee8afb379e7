import itertools
import math

import pytest
import torch

from training.losses import bradley_terry_loss, gae, masked_whiten, plackett_luce_loss, ppo_policy_loss, ppo_value_loss


def brute_force_nll(rewards: list[float], ranks: list[int]) -> float:
    """-log of the summed Plackett-Luce probability of every full order that agrees with the tied ranking."""
    total = 0.0
    for order in itertools.permutations(range(len(rewards))):
        if any(ranks[a] > ranks[b] for a, b in itertools.pairwise(order)):
            continue
        p = 1.0
        for place, item in enumerate(order):
            p *= math.exp(rewards[item]) / sum(math.exp(rewards[j]) for j in order[place:])
        total += p
    return -math.log(total)


def test_bradley_terry_by_hand():
    losses = bradley_terry_loss(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0]))
    assert losses.tolist() == pytest.approx([math.log1p(math.exp(-1.0)), math.log1p(math.exp(2.0))], abs=1e-6)


def test_bradley_terry_margin_and_weights_by_hand():
    losses = bradley_terry_loss(
        torch.tensor([1.0]), torch.tensor([0.0]), margins=torch.tensor([0.5]), weights=torch.tensor([0.75])
    )
    assert losses.item() == pytest.approx(0.75 * math.log1p(math.exp(-0.5)), abs=1e-6)  # -logσ(1 - 0 - 0.5)


def test_plackett_luce_without_ties_by_hand():
    # rewards 0, log 2, log 3 -> weights 1, 2, 3; the order 3 > 2 > 1 has probability 3/6 · 2/3 · 1 = 1/3
    rewards = torch.tensor([0.0, math.log(2.0), math.log(3.0)])
    loss = plackett_luce_loss(rewards, torch.tensor([3, 2, 1]))
    assert loss.item() == pytest.approx(math.log(3.0), abs=1e-6)


def test_plackett_luce_with_a_tie_by_hand():
    # weights 1, 2, 3; ranks (1, 1, 2): the two tied first in either order, then the third.
    # P = 1/6 · 2/5 + 2/6 · 1/4 = 1/15 + 1/12 = 3/20
    rewards = torch.tensor([0.0, math.log(2.0), math.log(3.0)])
    loss = plackett_luce_loss(rewards, torch.tensor([1, 1, 2]))
    assert loss.item() == pytest.approx(-math.log(3 / 20), abs=1e-6)


def test_a_ranking_of_all_ties_says_nothing():
    assert plackett_luce_loss(torch.tensor([0.3, -1.0, 2.0]), torch.tensor([1, 1, 1])).item() == pytest.approx(
        0.0, abs=1e-6
    )


@pytest.mark.parametrize(
    "ranks",
    [
        [1, 2, 3],
        [1, 1, 2],
        [2, 1, 2],
        [1, 2, 2],
        [1, 2, 3, 4],
        [1, 1, 2, 3],
        [3, 1, 3, 2],
        [2, 1, 1, 1],
        [1, 1, 2, 2],
        [2, 2, 1, 2],
    ],
)
def test_plackett_luce_matches_the_brute_force_likelihood_over_all_orders(ranks):
    rewards = [0.3, -1.2, 0.8, 2.0][: len(ranks)]
    loss = plackett_luce_loss(torch.tensor(rewards), torch.tensor(ranks))
    assert loss.item() == pytest.approx(brute_force_nll(rewards, ranks), abs=1e-5)


def test_plackett_luce_gradient_matches_the_brute_force_gradient():
    rewards, ranks = [0.3, -1.2, 0.8, 2.0], [3, 1, 3, 2]
    x = torch.tensor(rewards, dtype=torch.float64, requires_grad=True)
    plackett_luce_loss(x, torch.tensor(ranks)).backward()
    step = 1e-6
    numeric = [
        (brute_force_nll([r + step * (j == i) for j, r in enumerate(rewards)], ranks) - brute_force_nll(rewards, ranks))
        / step
        for i in range(len(rewards))
    ]
    assert x.grad.tolist() == pytest.approx(numeric, abs=1e-4)


def test_plackett_luce_needs_matching_shapes():
    with pytest.raises(ValueError, match="rewards and ranks must both have shape"):
        plackett_luce_loss(torch.zeros(3), torch.tensor([1, 2]))


def test_gae_by_hand():
    # one sequence of 3 tokens and one of 2 (padded); γ = 1, λ = 0.5
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.5, -1.0, 9.0]])
    values = torch.tensor([[0.2, 0.4, 0.6], [0.1, 0.3, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # row 0: δ2 = 1 - 0.6 = 0.4; δ1 = 0 + 0.6 - 0.4 = 0.2; δ0 = 0 + 0.4 - 0.2 = 0.2
    #        A2 = 0.4, A1 = 0.2 + 0.5·0.4 = 0.4, A0 = 0.2 + 0.5·0.4 = 0.4
    # row 1: δ1 = -1 - 0.3 = -1.3 (nothing after the last token); δ0 = 0.5 + 0.3 - 0.1 = 0.7
    #        A1 = -1.3, A0 = 0.7 + 0.5·(-1.3) = 0.05; the padding is 0
    assert advantages.tolist() == [pytest.approx([0.4, 0.4, 0.4]), pytest.approx([0.05, -1.3, 0.0])]
    assert returns.tolist() == [pytest.approx([0.6, 0.8, 1.0]), pytest.approx([0.15, -1.0, 0.0])]


def test_gae_with_discount_by_hand():
    advantages, returns = gae(
        torch.tensor([[0.0, 1.0]]), torch.tensor([[0.5, 0.0]]), torch.ones(1, 2), gamma=0.9, lam=1.0
    )
    # δ1 = 1; δ0 = 0 + 0.9·0 - 0.5 = -0.5; A0 = -0.5 + 0.9·1 = 0.4
    assert advantages.tolist() == [pytest.approx([0.4, 1.0])]
    assert returns.tolist() == [pytest.approx([0.9, 1.0])]


def test_ppo_policy_loss_by_hand():
    old = torch.zeros(1, 4)
    logps = torch.log(torch.tensor([[1.5, 0.5, 1.1, 1.5]]))  # ratios 1.5, 0.5, 1.1, 1.5
    advantages = torch.tensor([[1.0, 1.0, -2.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    loss = ppo_policy_loss(logps, old, advantages, mask, cliprange=0.2)
    # token 0: max(-1.5, -1.2) = -1.2 (clipped); token 1: max(-0.5, -0.8) = -0.5; token 2: max(2.2, 2.2) = 2.2
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 2.2) / 3, abs=1e-6)


def test_ppo_value_loss_by_hand():
    values = torch.tensor([[1.0, 0.0]])
    old_values = torch.tensor([[0.5, 0.0]])
    returns = torch.tensor([[2.0, 1.0]])
    loss = ppo_value_loss(values, old_values, returns, torch.ones(1, 2), cliprange_value=0.2)
    # token 0: clipped 0.7; max((1-2)², (0.7-2)²) = 1.69; token 1: max(1, 1) = 1; ½·mean = ½·(1.69 + 1)/2
    assert loss.item() == pytest.approx(0.5 * (1.69 + 1.0) / 2, abs=1e-6)


def test_masked_whiten_by_hand():
    values = torch.tensor([[1.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    whitened = masked_whiten(values, mask)
    # mean 2, sample variance 2
    assert whitened[0, :2].tolist() == pytest.approx([-1 / math.sqrt(2), 1 / math.sqrt(2)], abs=1e-6)
    kept_mean = masked_whiten(values, mask, shift_mean=False)
    assert kept_mean[0, :2].tolist() == pytest.approx([2 - 1 / math.sqrt(2), 2 + 1 / math.sqrt(2)], abs=1e-6)
