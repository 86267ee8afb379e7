"""How fast the leaderboard's arithmetic is at 20 versions and 100,000 battles.

Usage: python benchmarks/leaderboard_speed.py [--versions 20] [--battles 100000] [--rounds 1000] [--repeats 5]
                                              [--seed 0] [--no-write]

No database: it generates `battles` battles between `versions` writers (the base model and v1, v2, ...) of
known Bradley-Terry strengths, between random pairs on random sides, 15 % of them ties (half of those
both-bad); each writer has its own typical answer length, and the simulated people prefer the longer answer
a little. Then it times `feedback.selectors.leaderboard.leaderboard` on them `repeats` times (wall and CPU
time of this process), and, inside it, the two parts that do not depend on the bootstrap: reading the
Battle objects into arrays and the length-controlled fit (a logistic regression over every battle). What is
left is the cells, the point fit and the `rounds` bootstrap fits. The goals (issue 15): the leaderboard
under 2 s, the length-controlled fit under 10 s. The figures go to benchmarks/RESULTS.md (## Leaderboard)
unless --no-write.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.annotate_speed import write_results  # noqa: E402
from feedback.selectors.leaderboard import (  # noqa: E402
    WINNERS,
    Battle,
    _encode,
    _fit_length_controlled,
    _length_feature,
    leaderboard,
)

SECTION = "## Leaderboard"
TIE_SHARE = 0.15
LENGTH_PREFERENCE = 0.5  # log-odds per unit of (len_a - len_b) / (len_a + len_b)


def simulate(versions: int, count: int, seed: int) -> list[Battle]:
    rng = np.random.default_rng(seed)
    names = ["base", *(f"v{i}" for i in range(1, versions))]
    strength = rng.normal(0.0, 0.5, versions)
    strength -= strength[0]
    typical_length = rng.uniform(300, 1500, versions)
    a = rng.integers(0, versions, count)
    b = (a + rng.integers(1, versions, count)) % versions  # never a itself
    length_a = (typical_length[a] * rng.uniform(0.5, 1.5, count)).astype(int)
    length_b = (typical_length[b] * rng.uniform(0.5, 1.5, count)).astype(int)
    relative = (length_a - length_b) / (length_a + length_b)
    p_a = 1 / (1 + np.exp(-(strength[a] - strength[b] + LENGTH_PREFERENCE * relative)))
    outcome = np.where(rng.random(count) < p_a, 0, 1)
    outcome = np.where(rng.random(count) < TIE_SHARE, 2 + rng.integers(0, 2, count), outcome)
    return [
        Battle(names[i], names[j], WINNERS[k], int(x), int(y))
        for i, j, k, x, y in zip(a.tolist(), b.tolist(), outcome.tolist(), length_a, length_b, strict=True)
    ]


def timed(function, *args, **kwargs):  # type: ignore[no-untyped-def]
    wall, cpu = time.perf_counter(), time.process_time()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - wall, time.process_time() - cpu


def spread(values: list[float]) -> str:
    return f"median {statistics.median(values):.3f} s (min {min(values):.3f}, max {max(values):.3f})"


def host() -> str:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor(),
    )
    flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    shown = [flag for flag in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f" {flag}" in flags]
    return (
        f"{platform.machine()} ({model}, {os.cpu_count()} cores; flags: {', '.join(shown)}), "
        f"Python {platform.python_version()}, numpy {np.__version__}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--versions", type=int, default=20)
    parser.add_argument("--battles", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=1000, help="bootstrap rounds")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-write", action="store_true", help="print the figures, leave RESULTS.md alone")
    args = parser.parse_args()

    battles = simulate(args.versions, args.battles, args.seed)
    load_before = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    walls, cpus, encode_walls, controlled_walls, controlled_cpus = [], [], [], [], []
    for repeat in range(args.repeats):
        result, wall, cpu = timed(leaderboard, battles, bootstrap_rounds=args.rounds, seed=repeat)
        walls.append(wall)
        cpus.append(cpu)
        (names, a, b, outcome, length_a, length_b), wall, _ = timed(_encode, battles)
        encode_walls.append(wall)
        target = (outcome == 0) + 0.5 * (outcome >= 2)
        feature = _length_feature(length_a, length_b)
        _, wall, cpu = timed(_fit_length_controlled, a, b, feature, target, len(names))
        controlled_walls.append(wall)
        controlled_cpus.append(cpu)
    load_after = ", ".join(f"{x:.1f}" for x in os.getloadavg())

    rest = [w - e - c for w, e, c in zip(walls, encode_walls, controlled_walls, strict=True)]
    longest = max(result["models"], key=lambda model: abs(model["score"] - model["length_controlled_score"]))

    cells = args.versions * (args.versions - 1) // 2 * 3
    moved = abs(longest["score"] - longest["length_controlled_score"])
    load = f"Load average (1, 5, 15 min): {load_before} before, {load_after} after"
    method = (
        f"Method: {args.battles:,} generated battles between {args.versions} writers (base and "
        f"v1-v{args.versions - 1}, strengths drawn from N(0, 0.5^2), random pairs and sides, {TIE_SHARE:.0%} ties "
        "of which half both-bad, each writer with its own typical length and people preferring the longer answer "
        f"by {LENGTH_PREFERENCE} log-odds per unit of relative length difference), as `Battle` objects in memory. "
        "Each figure is the time of one call of `feedback.selectors.leaderboard.leaderboard(battles, "
        f"bootstrap_rounds={args.rounds})` in this process, {args.repeats} calls with seeds 0-{args.repeats - 1}; "
        "the parts are timed on their own after each call."
    )
    rows = [
        "| what | wall | CPU (this process, all threads) |",
        "|---|---|---|",
        f"| **the leaderboard** (everything below) | {spread(walls)} | median {statistics.median(cpus):.3f} s |",
        f"| reading the Battle objects into arrays | {spread(encode_walls)} | |",
        f"| the length-controlled fit (logistic regression over every battle, {args.versions + 1} coefficients) "
        f"| {spread(controlled_walls)} | median {statistics.median(controlled_cpus):.3f} s |",
        f"| the rest: cells, the point fit and {args.rounds:,} bootstrap fits "
        f"| median {statistics.median(rest):.3f} s | |",
    ]
    goals = (
        f"Goals: the leaderboard under 2 s, {'met' if max(walls) < 2 else 'missed'} ({max(walls):.2f} s at most); "
        f"the length-controlled fit under 10 s, {'met' if max(controlled_walls) < 10 else 'missed'} "
        f"({max(controlled_walls):.2f} s at most). The bootstrap costs what its cells cost ({cells} at most here), "
        "not what the battles do: each round is one multinomial draw over the cells and all rounds are fitted "
        "together by batched Newton steps. The length-controlled fit works on the regression's "
        f"{args.battles:,} x {args.versions + 1} design matrix; it is done once, without bootstrap intervals."
    )
    figures = (
        "Correctness is the tests' business (tests/feedback/test_leaderboard_math.py: the fit against choix, "
        "the intervals' coverage, the gate's rates). Here the length-controlled scores differ from the raw ones by "
        f"up to {moved:.3f} ({longest['name']}), and the length coefficient is {result['length_coefficient']:.3f} "
        "per root mean square of the relative length difference (the simulated people prefer longer answers)."
    )
    text = "\n\n".join(
        [
            SECTION,
            f"`python benchmarks/leaderboard_speed.py` on {host()}; {datetime.now(UTC):%Y-%m-%d}. {load} "
            "(other work shared the machine's cores).",
            method,
            "\n".join(rows),
            goals,
            figures,
        ]
    )
    print(text)
    if not args.no_write:
        write_results(text, SECTION)


if __name__ == "__main__":
    main()
