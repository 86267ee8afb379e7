"""Does torch.compile of the decoding step pay for itself? Its compile time, and a step's time against eager.

    python benchmarks/decode_compile.py [--rows 80] [--prompt-tokens 40] [--steps 30] [--threads 2]

One batch of ``--rows`` rows of the default model in the inference dtype: a prompt pass, then
``--steps`` decoding steps of one token each with the KV cache generate_completions uses, first
eagerly as generate_completions runs them (with its bf16 weights laid out once), then through
``torch.compile(model, dynamic=True)`` (dynamic, since a batch's rows and length change as it
decodes). Prints the first step's time (for the compiled model: compiling it) and the median of the
others for each.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DEFAULT_MODEL = ROOT / "var" / "models" / "SmolLM2-135M-Instruct"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=80)
    parser.add_argument("--prompt-tokens", type=int, default=40)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be at least 2: the first step is timed apart from the others")
    for name, value in (("rows", args.rows), ("prompt-tokens", args.prompt_tokens)):
        if value < 1:
            parser.error(f"--{name} must be at least 1, not {value}")

    import training  # noqa: F401, I001  (first: it sets the OpenMP wait policy the worker runs with before torch loads)
    import torch

    from training.generate import _decoding_cache, _packed_linears, inference_dtype
    from training.models import CACHE_KWARG, load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = inference_dtype(torch.device("cpu"))
    model = load_model(str(DEFAULT_MODEL), dtype=dtype)[0].eval()
    prompt = torch.randint(100, 1000, (args.rows, args.prompt_tokens))

    def step_times(forward) -> list[float]:
        cache = _decoding_cache(args.prompt_tokens + args.steps)
        with torch.no_grad():
            out = model(input_ids=prompt, **{CACHE_KWARG: cache}, use_cache=True, logits_to_keep=1)
            tokens = out.logits[:, -1].argmax(-1)[:, None]
            times = []
            for _ in range(args.steps):
                started = time.perf_counter()
                forward(input_ids=tokens, **{CACHE_KWARG: cache}, use_cache=True)
                times.append(time.perf_counter() - started)
        return times

    with _packed_linears(model):
        eager = step_times(model)
    compiled = step_times(torch.compile(model, dynamic=True))
    print(f"{args.rows} rows, {args.prompt_tokens} prompt tokens, {dtype}, torch threads {torch.get_num_threads()}")
    print("| way | first step | median of the other steps |\n|---|---:|---:|")
    for name, times in (("eager, as generate_completions runs it", eager), ("torch.compile, dynamic", compiled)):
        print(f"| {name} | {times[0]:.2f} s | {statistics.median(times[1:]) * 1000:.1f} ms |")


if __name__ == "__main__":
    main()
