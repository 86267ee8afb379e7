"""One sampling draw per row over the whole vocabulary: ``torch.multinomial`` against ``training.generate.draw``.

    python benchmarks/draw_speed.py [--rows 8 32 128] [--vocab 49152] [--repeats 30]

Each way draws one token per row from the same softmax of random logits (a temperature of 1 over
the default model's vocabulary size, as the online runs' rollouts sample), in turns, ``--repeats``
times each; the table gives the median milliseconds a draw and the ratio. The frequencies of a
million draws of a small distribution, by each way, show both draw from the same distribution.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[8, 32, 128], help="rows drawn at once")
    parser.add_argument("--vocab", type=int, default=49152, help="entries a row (the default model's vocabulary)")
    parser.add_argument("--repeats", type=int, default=30, help="draws timed per way and row count")
    args = parser.parse_args()
    if min(args.rows) < 1 or args.vocab < 2 or args.repeats < 1:
        parser.error("--rows and --repeats must be at least 1, --vocab at least 2")

    import training  # noqa: F401, I001  (first: it sets the OpenMP wait policy the worker runs with)
    import torch
    from training.generate import draw

    ways = {"multinomial": lambda p: torch.multinomial(p, num_samples=1).squeeze(-1), "draw": draw}
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, vocabulary {args.vocab}\n")
    print("| rows | torch.multinomial | draw | multinomial / draw |\n|---:|---:|---:|---:|")
    for rows in args.rows:
        probs = torch.softmax(torch.randn(rows, args.vocab) * 3, dim=-1)
        times: dict[str, list[float]] = {name: [] for name in ways}
        for way in ways.values():  # warm-up
            way(probs)
        for _ in range(args.repeats):
            for name, way in ways.items():
                started = time.perf_counter()
                way(probs)
                times[name].append(time.perf_counter() - started)
        median = {name: statistics.median(t) * 1e3 for name, t in times.items()}
        print(
            f"| {rows} | {median['multinomial']:.2f} ms | {median['draw']:.2f} ms | "
            f"{median['multinomial'] / median['draw']:.1f}x |"
        )

    small = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2]]).expand(1_000_000, 5).contiguous()
    print("\nfrequencies of 1,000,000 draws from [0, 0.5, 0, 0.3, 0.2]:")
    for name, way in ways.items():
        counts = torch.bincount(way(small), minlength=5).float() / len(small)
        print(f"- {name}: {', '.join(f'{c:.4f}' for c in counts.tolist())}")


if __name__ == "__main__":
    main()
