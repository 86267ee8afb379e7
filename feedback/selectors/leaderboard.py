"""The arithmetic of blind battles between model versions: a leaderboard and a promotion gate.

Pure numpy, no database: the callers read the battles and record the decisions.

**Leaderboard** (`leaderboard`): Bradley-Terry strengths on the natural log-odds scale,
P(a beats b) = sigmoid(s_a - s_b), fitted by maximum likelihood with ties of both kinds ("tie" and
"tie (bothbad)") counted as half a win each way, as Chatbot Arena counts them. Scores are anchored so
the anchor model (the base model by default) scores 0; when the anchor has no battle, the scores are
centred at mean 0 and ``"anchor"`` in the answer is None.

Departure from a plain maximum-likelihood fit: every strength carries an independent Gaussian prior
N(0, PRIOR_SD^2) with PRIOR_SD = 10 log-odds (an L2 penalty of s^2 / 200 per model, worth about a fiftieth
of one battle's information). Without it a model that won (or lost) every battle has no finite estimate, and
a battle graph in several pieces has no defined offset between its pieces. With it the fit is always finite
and unique: a 10-0 record against the anchor scores about 5.8 instead of infinity, a model between
hundreds of battles moves by less than 1e-3, and pieces of a disconnected graph are each centred near 0, so
scores across pieces mean nothing (nothing in the data compares them) and are shown as they come.

Intervals are 95 % percentile bootstrap intervals over battles: the battles are resampled with replacement
`bootstrap_rounds` times. Only the counts per (pair, outcome) cell matter to the fit, so a resample is one
multinomial draw over the cells, and all resamples are fitted together by batched Newton steps; 100,000
battles cost what their few hundred cells cost. A percentile bootstrap cannot show the uncertainty of a
perfect record (every resample of 10-0 is 10-0 or an empty pair): such intervals come out narrow and
say little; the battle counts beside them do.

**Length-controlled score**, as Chatbot Arena's style control: a logistic regression over battles with a
+1 indicator for model_a, -1 for model_b and one more feature, the normalised length difference
(len_a - len_b) / (len_a + len_b) divided by its root mean square over the battles; the target is 1 when
model_a wins, 0 when model_b wins and 1/2 for ties (half a win each way), with the same prior on every
coefficient. The model coefficients, anchored as above, are the scores at equal lengths. FastChat also
subtracts the feature's mean; that would make the scores the strengths at the average length difference,
which depends on which side of the battles each model was called model_a, so it is not done here.

**Gate** (`preference_test`): see its docstring.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

WINNERS = ("model_a", "model_b", "tie", "tie (bothbad)")

PRIOR_SD = 10.0
PRIOR_PRECISION = 1.0 / PRIOR_SD**2  # the penalty is PRIOR_PRECISION / 2 * sum(s ** 2)
CONFIDENCE = 0.95

Floats = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Battle:
    model_a: str  # a version name, or "base"
    model_b: str
    winner: str  # one of WINNERS (FastChat's battle format)
    length_a: int  # the answers' lengths in characters
    length_b: int


@dataclass(frozen=True)
class GateResult:
    decision: str  # "promote" | "reject" | "wait"
    wins: int  # decisive battles the candidate won
    losses: int
    ties: int  # ties and both-bad; not used by the test
    log_likelihood_ratio: float
    promote_above: float
    reject_below: float


def _log_sigmoid(x: Floats) -> Floats:
    return -np.logaddexp(0.0, -x)


def _sigmoid(x: Floats) -> Floats:
    return np.exp(_log_sigmoid(x))


def _newton(objective: Any, gradient_hessian: Any, start: Floats, *, max_iter: int = 100, tol: float = 1e-10) -> Floats:
    """Minimise B strictly convex problems at once by Newton steps with backtracking (Armijo).

    start (B, d). `objective(x, which)` gives the objective of problems `which` at x (k, d) as (k,);
    `gradient_hessian(x)` gives (B, d) and (B, d, d) at x (B, d). The prior makes every Hessian positive
    definite, so the Newton direction always descends; halving the step of the problems where the full
    step does not decrease the objective enough makes the iteration converge from any start.
    """
    x = start.copy()
    everyone = np.arange(len(x))
    value = objective(x, everyone)
    for _ in range(max_iter):
        grad, hess = gradient_hessian(x)
        step = np.linalg.solve(hess, grad[..., None])[..., 0]  # (B, d)
        decrease = (grad * step).sum(axis=1)  # (B,), >= 0
        slack = 1e-12 * (1.0 + np.abs(value))  # rounding of the objective near the optimum
        scale = np.ones(len(x))
        candidate = x - step
        candidate_value = objective(candidate, everyone)
        failing = np.flatnonzero(candidate_value > value - 1e-4 * decrease + slack)
        for _ in range(60):
            if len(failing) == 0:
                break
            scale[failing] *= 0.5
            candidate[failing] = x[failing] - scale[failing, None] * step[failing]
            candidate_value[failing] = objective(candidate[failing], failing)
            still = (
                candidate_value[failing] > value[failing] - 1e-4 * scale[failing] * decrease[failing] + slack[failing]
            )
            failing = failing[still]
        moved = float(np.abs(candidate - x).max())
        x, value = candidate, candidate_value
        if moved < tol:
            break
    return x


def _fit_bt(wins: Floats, start: Floats | None = None) -> Floats:
    """Bradley-Terry strengths of B problems at once, the maximum of the likelihood times the prior.

    wins (B, n, n): wins[b, i, j] is the weight of i's wins over j in problem b (a tie adds 1/2 each way).
    Returns the strengths (B, n); the prior's optimum has mean 0.
    """
    batch, n, _ = wins.shape
    games = wins + wins.transpose(0, 2, 1)  # (B, n, n)
    won = wins.sum(axis=2)  # (B, n)
    diagonal = np.arange(n)

    def objective(strengths: Floats, which: npt.NDArray[np.intp]) -> Floats:
        diff = strengths[:, :, None] - strengths[:, None, :]  # (k, n, n)
        nll = -(wins[which] * _log_sigmoid(diff)).sum(axis=(1, 2))
        return nll + 0.5 * PRIOR_PRECISION * (strengths**2).sum(axis=1)

    def gradient_hessian(strengths: Floats) -> tuple[Floats, Floats]:
        p = _sigmoid(strengths[:, :, None] - strengths[:, None, :])  # (B, n, n): P(i beats j)
        grad = (games * p).sum(axis=2) - won + PRIOR_PRECISION * strengths  # (B, n)
        curvature = games * p * (1.0 - p)  # (B, n, n), zero on the diagonal (no games)
        hess = -curvature
        hess[:, diagonal, diagonal] = curvature.sum(axis=2) + PRIOR_PRECISION
        return grad, hess

    return _newton(objective, gradient_hessian, np.zeros((batch, n)) if start is None else start)


def _fit_length_controlled(
    a: npt.NDArray[np.intp], b: npt.NDArray[np.intp], feature: Floats, target: Floats, n: int
) -> Floats:
    """Logistic regression of the battles' outcomes on +1/-1 model indicators and the length feature.

    a, b, feature, target (N,); target 1 when model_a won, 0 when model_b won, 1/2 for a tie.
    Returns the n model coefficients followed by the length coefficient, (n + 1,).
    """
    rows = np.arange(len(a))
    design = np.zeros((len(a), n + 1))  # (N, n + 1)
    design[rows, a] = 1.0
    design[rows, b] = -1.0
    design[:, n] = feature

    def objective(coefficients: Floats, which: npt.NDArray[np.intp]) -> Floats:
        z = design @ coefficients.T  # (N, k)
        nll = -(target[:, None] * _log_sigmoid(z) + (1.0 - target[:, None]) * _log_sigmoid(-z)).sum(axis=0)
        return nll + 0.5 * PRIOR_PRECISION * (coefficients**2).sum(axis=1)

    def gradient_hessian(coefficients: Floats) -> tuple[Floats, Floats]:
        p = _sigmoid(design @ coefficients[0])  # (N,)
        grad = design.T @ (p - target) + PRIOR_PRECISION * coefficients[0]  # (n + 1,)
        hess = design.T @ (design * (p * (1.0 - p))[:, None]) + PRIOR_PRECISION * np.eye(n + 1)
        return grad[None], hess[None]

    return _newton(objective, gradient_hessian, np.zeros((1, n + 1)))[0]


def _encode(
    battles: Sequence[Battle],
) -> tuple[list[str], npt.NDArray[np.intp], npt.NDArray[np.intp], npt.NDArray[np.intp], Floats, Floats]:
    """Model names (sorted) and, per battle, model_a's and model_b's index, the index of the winner in WINNERS
    and both lengths. Raises ValueError on a battle that cannot be counted."""
    for battle in battles:
        if battle.winner not in WINNERS:
            raise ValueError(f"winner {battle.winner!r} is not one of {', '.join(WINNERS)}")
        if battle.model_a == battle.model_b:
            raise ValueError(f"a battle of {battle.model_a!r} against itself")
        if battle.length_a < 0 or battle.length_b < 0:
            raise ValueError(f"a negative length ({battle.length_a}, {battle.length_b})")
    names = sorted({battle.model_a for battle in battles} | {battle.model_b for battle in battles})
    index = {name: i for i, name in enumerate(names)}
    a = np.fromiter((index[battle.model_a] for battle in battles), dtype=np.intp, count=len(battles))
    b = np.fromiter((index[battle.model_b] for battle in battles), dtype=np.intp, count=len(battles))
    outcome_of = {winner: i for i, winner in enumerate(WINNERS)}
    outcome = np.fromiter((outcome_of[battle.winner] for battle in battles), dtype=np.intp, count=len(battles))
    length_a = np.fromiter((battle.length_a for battle in battles), dtype=np.float64, count=len(battles))
    length_b = np.fromiter((battle.length_b for battle in battles), dtype=np.float64, count=len(battles))
    return names, a, b, outcome, length_a, length_b


def _length_feature(length_a: Floats, length_b: Floats) -> Floats:
    """(len_a - len_b) / (len_a + len_b), 0 when both are empty, divided by its root mean square (if not 0)."""
    total = length_a + length_b
    relative = np.divide(length_a - length_b, total, out=np.zeros_like(total), where=total > 0)
    rms = math.sqrt(float(np.mean(relative**2)))
    return relative / rms if rms > 0 else relative


def _groups(n: int, low: npt.NDArray[np.intp], high: npt.NDArray[np.intp], first: int | None) -> list[int]:
    """The connected pieces of the battle graph (edges low[k]-high[k]) numbered 0, 1, ...: the piece of model
    `first` is 0 (the largest when it is None), then larger pieces before smaller ones, ties by lowest index."""
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in zip(low.tolist(), high.tolist(), strict=True):
        parent[root(i)] = root(j)
    roots = [root(i) for i in range(n)]
    size = {r: roots.count(r) for r in roots}
    order = sorted(
        set(roots), key=lambda r: (r != roots[first] if first is not None else False, -size[r], roots.index(r))
    )
    number = {r: k for k, r in enumerate(order)}
    return [number[r] for r in roots]


def leaderboard(
    battles: Sequence[Battle], *, anchor: str = "base", bootstrap_rounds: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """Bradley-Terry scores with 95 % bootstrap intervals, tallies and the head-to-head matrix of the battles.

    Returns ``{"models": [...], "matrix": {...}, "anchor": ..., "bootstrap_rounds": ..., "length_coefficient": ...}``:

    - ``models``, sorted by score (highest first, then by name), one dict per model with ``name``, ``score``
      (the strength minus the anchor's, natural log-odds: a lead of 1 is a 73 % chance of winning),
      ``ci_low`` / ``ci_high`` (the 2.5th and 97.5th percentiles of the score over the bootstrap rounds; the
      anchor's are 0), ``battles``, ``wins``, ``losses``, ``ties`` (ties and both-bad together),
      ``win_rate`` ((wins + ties / 2) / battles), ``length_controlled_score`` and ``group``: the connected
      piece of the battle graph the model is in, 0 for the anchor's (the largest piece when there is no
      anchor). Scores compare models of one group only: nothing in the battles links two groups.
    - ``matrix[a][b]``: a's observed win rate against b (ties as half), None when they never met.
    - ``anchor``: the anchor's name when it has battles (it scores 0), else None: the scores then have mean 0.
    - ``length_coefficient``: the log-odds of winning that one root mean square of the normalised length
      difference adds, the length-controlled fit's own coefficient (positive: people prefer longer answers).

    See the module docstring for the prior that keeps perfect records and disconnected graphs finite.
    Raises ValueError for a winner outside WINNERS, a model against itself or a negative length.
    """
    if bootstrap_rounds < 1:
        raise ValueError(f"bootstrap_rounds must be at least 1, not {bootstrap_rounds}")
    names, a, b, outcome, length_a, length_b = _encode(battles)
    if not names:
        return {
            "models": [],
            "matrix": {},
            "anchor": None,
            "bootstrap_rounds": bootstrap_rounds,
            "length_coefficient": None,
        }
    n = len(names)
    tie = outcome >= 2
    a_won, b_won = outcome == 0, outcome == 1

    # Cells: (unordered pair, outcome), the outcome 0 when the lower index won, 1 when the higher, 2 a tie.
    low, high = np.minimum(a, b), np.maximum(a, b)
    low_won = (a_won & (a == low)) | (b_won & (b == low))
    code = np.where(tie, 2, np.where(low_won, 0, 1))
    cells, counts = np.unique((low * n + high) * 3 + code, return_counts=True)
    pair, cell_code = np.divmod(cells, 3)
    cell_low, cell_high = np.divmod(pair, n)
    # wins = counts @ to_wins, flattened (n * n): a cell's battles credit the winner, or half to each for a tie.
    to_wins = np.zeros((len(cells), n * n))  # (K, n * n)
    rows = np.arange(len(cells))
    to_wins[rows, cell_low * n + cell_high] = (cell_code == 0) + 0.5 * (cell_code == 2)
    to_wins[rows, cell_high * n + cell_low] = (cell_code == 1) + 0.5 * (cell_code == 2)

    wins = (counts.astype(np.float64) @ to_wins).reshape(n, n)
    strengths = _fit_bt(wins[None])[0]  # (n,)
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(len(a), counts / len(a), size=bootstrap_rounds).astype(np.float64)  # (R, K)
    resampled = (draws @ to_wins).reshape(bootstrap_rounds, n, n)
    boot = _fit_bt(resampled, start=np.broadcast_to(strengths, (bootstrap_rounds, n)))  # (R, n)

    anchor_index = names.index(anchor) if anchor in names else None

    def anchored(values: Floats) -> Floats:
        reference = values[..., anchor_index] if anchor_index is not None else values.mean(axis=-1)
        return values - np.asarray(reference)[..., None]

    scores = anchored(strengths)
    ci_low, ci_high = np.percentile(anchored(boot), [50 * (1 - CONFIDENCE), 50 * (1 + CONFIDENCE)], axis=0)

    target = a_won + 0.5 * tie
    controlled = _fit_length_controlled(a, b, _length_feature(length_a, length_b), target, n)
    controlled_scores = anchored(controlled[:n])

    played = np.bincount(a, minlength=n) + np.bincount(b, minlength=n)
    won = np.bincount(a[a_won], minlength=n) + np.bincount(b[b_won], minlength=n)
    lost = np.bincount(b[a_won], minlength=n) + np.bincount(a[b_won], minlength=n)
    tied = np.bincount(a[tie], minlength=n) + np.bincount(b[tie], minlength=n)
    group = _groups(n, cell_low, cell_high, anchor_index)
    models: list[dict[str, Any]] = [
        {
            "name": names[i],
            "score": float(scores[i]),
            "ci_low": float(ci_low[i]),
            "ci_high": float(ci_high[i]),
            "battles": int(played[i]),
            "wins": int(won[i]),
            "losses": int(lost[i]),
            "ties": int(tied[i]),
            "win_rate": float((won[i] + tied[i] / 2) / played[i]),
            "length_controlled_score": float(controlled_scores[i]),
            "group": group[i],
        }
        for i in range(n)
    ]
    models.sort(key=lambda model: (-model["score"], model["name"]))
    games = wins + wins.T
    matrix = {
        names[i]: {names[j]: float(wins[i, j] / games[i, j]) if games[i, j] > 0 else None for j in range(n) if j != i}
        for i in range(n)
    }
    return {
        "models": models,
        "matrix": matrix,
        "anchor": names[anchor_index] if anchor_index is not None else None,
        "bootstrap_rounds": bootstrap_rounds,
        "length_coefficient": float(controlled[n]),
    }


def preference_test(
    *, wins: int, losses: int, ties: int = 0, alpha: float = 0.05, beta: float = 0.10, p1: float = 0.6
) -> GateResult:
    """Whether people prefer a candidate to its opponent: a sequential probability ratio test that stays valid
    however often it is checked.

    wins, losses: the decisive battles between the candidate and one opponent that the candidate won and
    lost; ties and both-bad (``ties``) are left out of the test and only reported.

    The statistic is the likelihood ratio of "people prefer the candidate in a share p1 of decisive battles"
    against "p = 1/2": L = (2 p1)^wins (2 (1 - p1))^losses, ``log_likelihood_ratio`` = log L. Each decisive
    battle multiplies L by 2 p1 or 2 (1 - p1), whose mean is 1 when p = 1/2 and below 1 when p < 1/2, so
    under an equally good (or worse) candidate L is a nonnegative (super)martingale starting at 1, and by
    Ville's inequality P(L ever reaches 1/alpha) <= alpha. Promoting when log L >= log(1 / alpha) therefore
    promotes such a candidate with probability at most alpha whenever and however often the test is
    checked, after every battle included, and whatever the caller did at earlier checks: an "always-valid"
    test (Ville 1939, Etude critique de la notion de collectif; Johari, Pekelis & Walsh 2017, "Always valid
    inference"). The candidate is rejected when log L <= log(beta / (1 - alpha)), Wald's lower boundary
    (Wald 1945, "Sequential tests of statistical hypotheses", Ann. Math. Statist. 16:117-186): a candidate as
    good as p1 is rejected with probability about beta (Wald's approximation, not a bound). Between the two
    the decision is "wait" for more battles. The first boundary the counts reach is the decision; a caller
    stops there.

    With the defaults (alpha 0.05, beta 0.10, p1 0.6): promote at log L >= 3.00, reject at log L <= -2.25;
    each win adds log 1.2 = 0.182 and each loss log 0.8 = -0.223. A candidate preferred 70 % of the time
    gains 0.061 a decisive battle and is promoted after about 50; an equally good one drifts down by 0.020 a
    battle and is mostly rejected (tests/feedback/test_leaderboard_math.py measures these rates).
    """
    for name, value in (("wins", wins), ("losses", losses), ("ties", ties)):
        if value < 0:
            raise ValueError(f"{name} must be 0 or more, not {value}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be between 0 and 1, not {alpha}")
    if not 0 < beta < 1 - alpha:
        raise ValueError(f"beta must be between 0 and 1 - alpha, not {beta}")
    if not 0.5 < p1 < 1:
        raise ValueError(f"p1 must be between 0.5 and 1, not {p1}")
    log_ratio = wins * math.log(2 * p1) + losses * math.log(2 * (1 - p1))
    promote_above = math.log(1 / alpha)
    reject_below = math.log(beta / (1 - alpha))
    if log_ratio >= promote_above:
        decision = "promote"
    elif log_ratio <= reject_below:
        decision = "reject"
    else:
        decision = "wait"
    return GateResult(
        decision=decision,
        wins=wins,
        losses=losses,
        ties=ties,
        log_likelihood_ratio=log_ratio,
        promote_above=promote_above,
        reject_below=reject_below,
    )
