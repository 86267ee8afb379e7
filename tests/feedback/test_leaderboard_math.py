"""The leaderboard's Bradley-Terry fit, its bootstrap intervals, the length-controlled score and the promotion gate.

Pure functions: no database. The simulations are seeded; their sizes keep the file to a few seconds.
"""

from __future__ import annotations

import math

import choix
import numpy as np
import pytest

from feedback.selectors.leaderboard import PRIOR_PRECISION, WINNERS, Battle, leaderboard, preference_test


def _battles(a: str, b: str, winner: str, count: int, length_a: int = 100, length_b: int = 100) -> list[Battle]:
    return [Battle(a, b, winner, length_a, length_b)] * count


def _by_name(result: dict) -> dict[str, dict]:
    return {model["name"]: model for model in result["models"]}


def _simulate(
    rng: np.random.Generator, strengths: dict[str, float], count: int, tie_share: float = 0.0
) -> list[Battle]:
    """Battles between random pairs, won with Bradley-Terry probabilities; a share of them ties of either kind."""
    names = list(strengths)
    battles = []
    for _ in range(count):
        i, j = rng.choice(len(names), size=2, replace=False)
        a, b = names[i], names[j]
        if rng.random() < tie_share:
            winner = WINNERS[2 + int(rng.integers(2))]
        else:
            p = 1 / (1 + math.exp(strengths[b] - strengths[a]))
            winner = "model_a" if rng.random() < p else "model_b"
        battles.append(Battle(a, b, winner, int(rng.integers(20, 2000)), int(rng.integers(20, 2000))))
    return battles


# -- the fit -------------------------------------------------------------------------------------------------


def test_strengths_equal_choix_maximum_likelihood():
    rng = np.random.default_rng(1)
    truth = {"base": 0.0, "v1": 0.4, "v2": -0.3, "v3": 1.1, "v4": 0.2, "v5": -0.8}
    battles = _simulate(rng, truth, 600, tie_share=0.2)
    names = sorted(truth)
    index = {name: i for i, name in enumerate(names)}
    # choix takes (winner, loser) pairs of weight one: every decisive battle twice, every tie once each way,
    # which is the half-weighted likelihood doubled; its penalty alpha * sum(s^2) on doubled data is this
    # module's prior PRIOR_PRECISION / 2 * sum(s^2) doubled.
    pairs = []
    for battle in battles:
        a, b = index[battle.model_a], index[battle.model_b]
        if battle.winner == "model_a":
            pairs += [(a, b), (a, b)]
        elif battle.winner == "model_b":
            pairs += [(b, a), (b, a)]
        else:
            pairs += [(a, b), (b, a)]
    reference = choix.opt_pairwise(len(names), pairs, alpha=PRIOR_PRECISION, tol=1e-10)
    reference -= reference[index["base"]]

    scores = {model["name"]: model["score"] for model in leaderboard(battles, bootstrap_rounds=10)["models"]}

    for name in names:
        assert scores[name] == pytest.approx(reference[index[name]], abs=1e-3)
    assert max(abs(scores[name]) for name in names) > 0.5  # the data move the scores away from 0


def test_two_models_score_is_the_log_odds_of_their_record():
    result = leaderboard(_battles("v1", "base", "model_a", 300) + _battles("v1", "base", "model_b", 100))

    v1, base = _by_name(result)["v1"], _by_name(result)["base"]
    assert v1["score"] == pytest.approx(math.log(3), abs=1e-3)
    assert base["score"] == 0.0
    assert (base["ci_low"], base["ci_high"]) == (0.0, 0.0)
    # the normal approximation's interval: log 3 +- 1.96 * sqrt(1/300 + 1/100) = [0.873, 1.325]
    assert v1["ci_low"] == pytest.approx(0.873, abs=0.05)
    assert v1["ci_high"] == pytest.approx(1.325, abs=0.05)
    assert (v1["battles"], v1["wins"], v1["losses"], v1["ties"], v1["win_rate"]) == (400, 300, 100, 0, 0.75)
    assert (base["wins"], base["losses"], base["win_rate"]) == (100, 300, 0.25)
    assert result["matrix"] == {"v1": {"base": 0.75}, "base": {"v1": 0.25}}
    assert [model["name"] for model in result["models"]] == ["v1", "base"]
    assert result["anchor"] == "base"


def test_sides_do_not_matter():
    as_a = leaderboard(_battles("v1", "base", "model_a", 30) + _battles("v1", "base", "model_b", 20))
    as_b = leaderboard(_battles("base", "v1", "model_b", 30) + _battles("base", "v1", "model_a", 20))

    assert _by_name(as_b)["v1"]["score"] == pytest.approx(_by_name(as_a)["v1"]["score"], abs=1e-9)
    assert _by_name(as_b)["v1"]["score"] == pytest.approx(math.log(1.5), abs=1e-3)


def test_ties_of_both_kinds_count_half_a_win_each_way():
    decisive = _battles("v1", "base", "model_a", 300) + _battles("base", "v1", "model_a", 100)
    ties = _battles("v1", "base", "tie", 120) + _battles("base", "v1", "tie (bothbad)", 80)

    result = leaderboard(decisive + ties)

    v1 = _by_name(result)["v1"]
    assert v1["score"] == pytest.approx(math.log((300 + 100) / (100 + 100)), abs=1e-3)
    assert (v1["battles"], v1["wins"], v1["losses"], v1["ties"]) == (600, 300, 100, 200)
    assert v1["win_rate"] == pytest.approx(400 / 600)
    assert result["matrix"]["v1"]["base"] == pytest.approx(400 / 600)
    only_bothbad = leaderboard(decisive + _battles("v1", "base", "tie (bothbad)", 200))
    assert _by_name(only_bothbad)["v1"]["score"] == pytest.approx(v1["score"], abs=1e-9)


def test_anchor_scores_zero_and_without_it_scores_have_mean_zero():
    battles = _battles("v1", "base", "model_a", 300) + _battles("v1", "base", "model_b", 100)

    on_v1 = leaderboard(battles, anchor="v1")
    assert _by_name(on_v1)["base"]["score"] == pytest.approx(-math.log(3), abs=1e-3)
    assert _by_name(on_v1)["v1"]["score"] == 0.0
    assert on_v1["anchor"] == "v1"
    assert _by_name(on_v1)["base"]["ci_high"] < 0

    nowhere = leaderboard(battles, anchor="v9")
    assert nowhere["anchor"] is None
    assert _by_name(nowhere)["v1"]["score"] == pytest.approx(math.log(3) / 2, abs=1e-3)
    assert _by_name(nowhere)["base"]["score"] == pytest.approx(-math.log(3) / 2, abs=1e-3)


def test_perfect_record_gives_finite_scores_and_intervals():
    battles = (
        _battles("v1", "base", "model_a", 10)  # v1 won every battle
        + _battles("v2", "base", "model_a", 6)
        + _battles("v2", "base", "model_b", 4)
        + _battles("v3", "v2", "model_b", 8)  # v3 lost every battle
    )

    models = _by_name(leaderboard(battles))

    for model in models.values():
        assert all(math.isfinite(model[key]) for key in ("score", "ci_low", "ci_high", "length_controlled_score"))
        assert model["ci_low"] <= model["score"] <= model["ci_high"]
    assert models["v1"]["score"] > 3  # far above base, as a 10-0 record says
    assert models["v3"]["score"] < models["v2"]["score"] - 3


def test_disconnected_graph_is_finite_and_says_which_models_compare():
    battles = (
        _battles("v1", "base", "model_a", 30)
        + _battles("v1", "base", "model_b", 10)
        + _battles("x", "y", "model_a", 20)
        + _battles("x", "y", "model_b", 10)
        + _battles("z", "y", "model_a", 5)
    )

    result = leaderboard(battles)

    models = _by_name(result)
    for model in models.values():
        assert all(math.isfinite(model[key]) for key in ("score", "ci_low", "ci_high", "length_controlled_score"))
    assert {name: model["group"] for name, model in models.items()} == {
        "base": 0,
        "v1": 0,
        "x": 1,
        "y": 1,
        "z": 1,
    }
    assert models["v1"]["score"] == pytest.approx(math.log(3), abs=1e-2)
    assert models["x"]["score"] - models["y"]["score"] > 0.3
    assert result["matrix"]["x"]["base"] is None
    assert result["matrix"]["x"]["y"] == pytest.approx(2 / 3)


def test_empty_input():
    assert leaderboard([]) == {
        "models": [],
        "matrix": {},
        "anchor": None,
        "bootstrap_rounds": 1000,
        "length_coefficient": None,
    }


@pytest.mark.parametrize("winner", ["model_c", "A", "", "Tie"])
def test_unknown_winner_is_refused_by_name(winner):
    battles = _battles("v1", "base", "model_a", 3) + [Battle("v1", "base", winner, 10, 10)]

    with pytest.raises(ValueError, match=f"winner {winner!r} is not one of"):
        leaderboard(battles)


def test_a_model_against_itself_is_refused():
    with pytest.raises(ValueError, match="'v1' against itself"):
        leaderboard([Battle("v1", "v1", "model_a", 10, 10)])


def test_the_seed_decides_the_intervals():
    battles = _simulate(np.random.default_rng(2), {"base": 0.0, "v1": 0.5, "v2": -0.2}, 300)

    first, again, other = (leaderboard(battles, seed=seed, bootstrap_rounds=200) for seed in (0, 0, 1))

    assert first == again
    assert _by_name(first)["v1"]["ci_low"] != _by_name(other)["v1"]["ci_low"]
    assert _by_name(first)["v1"]["score"] == _by_name(other)["v1"]["score"]


def test_intervals_cover_the_true_strengths():
    rng = np.random.default_rng(3)
    covered = total = 0
    for _ in range(200):
        truth = {"base": 0.0, **{f"v{i}": float(rng.normal(0, 0.7)) for i in range(1, 5)}}
        models = _by_name(leaderboard(_simulate(rng, truth, 300), bootstrap_rounds=200, seed=int(rng.integers(1000))))
        for name in truth.keys() - {"base"}:
            total += 1
            covered += models[name]["ci_low"] <= truth[name] <= models[name]["ci_high"]

    coverage = covered / total
    assert 0.90 <= coverage <= 0.99, coverage


# -- the length-controlled score -----------------------------------------------------------------------------


def test_length_controlled_score_is_the_score_when_lengths_do_not_differ():
    rng = np.random.default_rng(4)
    battles = [
        Battle(b.model_a, b.model_b, b.winner, 500, 500)
        for b in _simulate(rng, {"base": 0.0, "v1": 0.6, "v2": -0.4, "v3": 0.1}, 400, tie_share=0.1)
    ]

    result = leaderboard(battles, bootstrap_rounds=10)

    for model in result["models"]:
        assert model["length_controlled_score"] == pytest.approx(model["score"], abs=1e-6)
    assert result["length_coefficient"] == 0.0
    assert max(abs(model["score"]) for model in result["models"]) > 0.3


def test_length_controlled_score_removes_a_preference_for_longer_answers():
    """`long` is as good as base but writes twice as much, and people prefer longer answers."""
    rng = np.random.default_rng(5)
    mean_length = {"base": 400, "long": 800, "v2": 400}
    strength = {"base": 0.0, "long": 0.0, "v2": 0.5}
    battles = []
    relatives = []
    for _ in range(4000):
        a, b = rng.choice(list(strength), size=2, replace=False)
        length_a, length_b = (int(rng.uniform(0.5, 1.5) * mean_length[m]) for m in (a, b))
        relative = (length_a - length_b) / (length_a + length_b)
        relatives.append(relative)
        p = 1 / (1 + math.exp(-(strength[a] - strength[b] + 3.0 * relative)))
        battles.append(Battle(a, b, "model_a" if rng.random() < p else "model_b", length_a, length_b))

    result = leaderboard(battles, bootstrap_rounds=10)

    models = _by_name(result)
    assert models["long"]["score"] > 0.5  # raw: length buys it a lead
    assert abs(models["long"]["length_controlled_score"]) < 0.15
    assert models["v2"]["length_controlled_score"] == pytest.approx(0.5, abs=0.15)
    # the coefficient is per root mean square of the relative length difference
    assert result["length_coefficient"] == pytest.approx(3.0 * math.sqrt(np.mean(np.square(relatives))), rel=0.2)


# -- the gate ------------------------------------------------------------------------------------------------


def test_gate_boundaries_by_hand():
    # each win adds log 1.2 = 0.182, each loss log 0.8 = -0.223; promote at log 20 = 3.00, reject at log(0.1/0.95)
    assert preference_test(wins=16, losses=0).decision == "wait"
    assert preference_test(wins=17, losses=0).decision == "promote"
    assert preference_test(wins=0, losses=10).decision == "wait"
    assert preference_test(wins=0, losses=11).decision == "reject"
    result = preference_test(wins=60, losses=40, ties=25)
    assert result.log_likelihood_ratio == pytest.approx(60 * math.log(1.2) + 40 * math.log(0.8))
    assert result.decision == "wait"
    assert (result.wins, result.losses, result.ties) == (60, 40, 25)


def test_ties_do_not_move_the_gate():
    with_ties = preference_test(wins=17, losses=1, ties=500)
    without = preference_test(wins=17, losses=1)

    assert with_ties.log_likelihood_ratio == without.log_likelihood_ratio
    assert with_ties.decision == without.decision == "wait"
    assert preference_test(wins=18, losses=1, ties=500).decision == "promote"


@pytest.mark.parametrize(
    "kwargs", [{"wins": -1, "losses": 0}, {"wins": 1, "losses": 1, "alpha": 0}, {"wins": 1, "losses": 1, "p1": 0.5}]
)
def test_gate_refuses_impossible_arguments(kwargs):
    with pytest.raises(ValueError):
        preference_test(**kwargs)


def _gate_runs(preference: float, *, runs: int = 200, battles: int = 300, seed: int = 0) -> dict[str, int]:
    """How many of `runs` candidates, each checked after every battle, end promoted, rejected or still waiting."""
    rng = np.random.default_rng(seed)
    ends = {"promote": 0, "reject": 0, "wait": 0}
    for _ in range(runs):
        wins = losses = 0
        decision = "wait"
        for candidate_won in rng.random(battles) < preference:
            wins += bool(candidate_won)
            losses += not candidate_won
            decision = preference_test(wins=wins, losses=losses).decision
            if decision != "wait":
                break
        ends[decision] += 1
    return ends


def test_gate_promotes_a_better_candidate():
    ends = _gate_runs(0.7)
    assert ends["promote"] / 200 >= 0.90, ends


def test_gate_rarely_promotes_an_equally_good_candidate():
    ends = _gate_runs(0.5)
    assert ends["promote"] / 200 <= 0.05, ends


def test_gate_rejects_a_worse_candidate():
    ends = _gate_runs(0.3)
    assert ends["reject"] / 200 >= 0.90, ends


def test_chance_of_promoting_an_equal_candidate_is_below_alpha_exactly():
    """The probability over all paths of 300 decisive battles, checked after each one, by dynamic programming."""
    alive = {0: 1.0}  # wins so far -> probability of reaching that count with no decision yet
    promoted = 0.0
    for battle in range(1, 301):
        following: dict[int, float] = {}
        for wins, probability in alive.items():
            for new_wins in (wins, wins + 1):
                decision = preference_test(wins=new_wins, losses=battle - new_wins).decision
                if decision == "promote":
                    promoted += probability / 2
                elif decision == "wait":
                    following[new_wins] = following.get(new_wins, 0.0) + probability / 2
        alive = following

    assert 0.01 < promoted <= 0.05, promoted
