"""fp32 products of a decoding step's rows: plain ``F.linear`` against weights packed once for MKL.

    python benchmarks/packed_products.py [--model DIR] [--rows 1 2 4 8 16 32 64 128] [--repeats 5]
                                         [--threads 2]

Each row count multiplies the default model's 211 linear layers (every projection of its 30 layers
and the output layer, weights as loaded in fp32) by a random input of that many rows, one position a
row as a decoding step does: once with ``F.linear``, once with ``torch.ops.mkl._mkl_linear`` on
weights packed for that many rows (``training.generate._MKLPacked``'s product), in turns, ``--repeats``
times each. The table gives the median milliseconds for all 211 products, the ratio, and whether the
two ways' results are equal to the bit. A last line times packing the 211 weights once.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "var/models/SmolLM2-135M-Instruct"), help="model directory")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128], help="rows a step")
    parser.add_argument("--repeats", type=int, default=5, help="timings per way and row count")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args()
    if min(args.rows) < 1 or args.repeats < 1 or args.threads < 1:
        parser.error("--rows, --repeats and --threads must be at least 1")

    import training  # noqa: F401, I001  (first: it sets the OpenMP wait policy the worker runs with)
    import torch
    from training.models import load_model

    torch.set_num_threads(args.threads)
    model, _ = load_model(args.model, dtype=torch.float32)
    weights = [m.weight.detach() for m in model.modules() if type(m) is torch.nn.Linear]

    def timed(run: Callable[[], object]) -> float:
        start = time.perf_counter()
        run()
        return (time.perf_counter() - start) * 1000

    def products(product: Callable[..., torch.Tensor], inputs: list[torch.Tensor], weights: list) -> list:
        return [product(x, w) for x, w in zip(inputs, weights, strict=True)]

    def mkl(rows: int, x: torch.Tensor, weight_and_packed: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        weight, packed = weight_and_packed
        return torch.ops.mkl._mkl_linear(x, packed, weight, None, rows)

    print(f"torch {torch.__version__}, {args.threads} threads, {len(weights)} linear layers\n")
    print("| rows | plain F.linear | packed for MKL | plain / packed | equal to the bit |\n|---:|---:|---:|---:|---|")
    for rows in args.rows:
        inputs = [torch.randn(rows, w.shape[1]) for w in weights]
        packed = [torch.ops.mkl._mkl_reorder_linear_weight(w, rows) for w in weights]
        pairs = list(zip(weights, packed, strict=True))
        ways = {
            "plain": functools.partial(products, torch.nn.functional.linear, inputs, weights),
            "packed": functools.partial(products, functools.partial(mkl, rows), inputs, pairs),
        }
        equal = all(torch.equal(a, b) for a, b in zip(ways["plain"](), ways["packed"](), strict=True))
        times: dict[str, list[float]] = {way: [] for way in ways}
        for _ in range(args.repeats):
            for way, run in ways.items():
                times[way].append(timed(run))
        a, b = statistics.median(times["plain"]), statistics.median(times["packed"])
        print(f"| {rows} | {a:.1f} ms | {b:.1f} ms | {a / b:.2f}x | {'yes' if equal else 'no'} |", flush=True)
    packing = [timed(lambda: [torch.ops.mkl._mkl_reorder_linear_weight(w, 8) for w in weights]) for _ in range(3)]
    print(f"\npacking the {len(weights)} weights: {', '.join(f'{t / 1000:.2f} s' for t in packing)}")


if __name__ == "__main__":
    main()
