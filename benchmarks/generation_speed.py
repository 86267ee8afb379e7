"""Tokens/s of writing completions: the code at a git ref, plain model.generate, and the current code, in turn.

The workload is the loop benchmark's: the same questions, K completions each, the project's
default sampling (temperature 0.8, top-p 0.95) and a length limit. Every way writes the same
rows with the same seed in each round, and the ways take turns round by round, so a busy
machine slows them alike; the table gives each way's median round and the ratios use the
medians. Tokens are the tokens actually written (up to EOS, EOS not counted).

Ways:
- ``before``: training/generate.py as it was at ``--before`` (default: the commit before the
  current decoding loop), run as it was called then (8 rows per ``generate`` call, fp32);
- ``generate``: plain ``model.generate`` on the current code's batches (same rows per call,
  sorted the same way), in fp32 and in the inference dtype;
- ``previous``: ``generate_completions`` as it was at ``--previous`` (default: the commit before
  the KV cache written in place and the bf16 weights laid out once), in the inference dtype;
- ``now``: ``generate_completions`` in fp32 and in the inference dtype (bf16 where the CPU
  has AVX512_BF16 or AMX).

Usage: python benchmarks/generation_speed.py [--prompts 20] [--k 4] [--max-new-tokens 64]
       [--rounds 3] [--threads N] [--ways before,generate-fp32,generate,previous,now-fp32,now]
"""

import argparse
import os
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DEFAULT_MODEL = ROOT / "var" / "models" / "SmolLM2-135M-Instruct"
BEFORE = "733af3b"  # the last commit whose training/generate.py batched through model.generate
PREVIOUS = "b135a6f"  # the last commit whose decoding loop concatenated its KV cache and laid weights out every step

QUESTIONS = [
    "How do I reverse a list in Python?",
    "Why is the sky blue?",
    "Give me a tip for better sleep.",
    "What is the capital of France?",
    "Write a haiku about rain.",
    "How do vaccines work?",
    "What is a prime number?",
    "How can I learn to cook?",
]


def module_at(ref: str, path: str) -> types.ModuleType:
    source = subprocess.run(["git", "show", f"{ref}:{path}"], cwd=ROOT, capture_output=True, text=True, check=True)
    module = types.ModuleType(f"before_{ref}")
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(source.stdout, f"{ref}:{path}", "exec"), module.__dict__)
    return module


class CountingGenerate:
    """Wraps model.generate to count the new tokens of each row up to its first EOS."""

    def __init__(self, model, eos_token_id: int):
        self.model, self.eos, self.tokens = model, eos_token_id, 0
        self.generate = model.generate

    def __call__(self, *args, **kwargs):
        out = self.generate(*args, **kwargs)
        for row in out[:, kwargs["input_ids"].shape[1] :].tolist():
            self.tokens += row.index(self.eos) if self.eos in row else len(row)
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--before", default=BEFORE, help="git ref of the code to compare with")
    parser.add_argument("--previous", default=PREVIOUS, help="git ref of the earlier decoding loop to compare with")
    parser.add_argument("--ways", default="before,generate-fp32,generate,previous,now-fp32,now")
    args = parser.parse_args()

    import training  # noqa: F401, I001  (first: it sets the OpenMP wait policy the worker runs with before torch loads)
    import torch
    from training.generate import BATCH_ROWS, SamplingConfig, generate_completions, inference_dtype, render_prompt
    from training.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    model32, tokenizer = load_model(str(DEFAULT_MODEL))
    model32.eval()
    fast = inference_dtype(torch.device("cpu"))
    model16 = load_model(str(DEFAULT_MODEL), dtype=fast)[0].eval() if fast != torch.float32 else model32
    conversations = [[{"role": "user", "content": f"{QUESTIONS[i % 8]} ({i})"}] for i in range(args.prompts)]
    sampling = SamplingConfig(temperature=0.8, top_p=0.95, max_new_tokens=args.max_new_tokens)
    before = module_at(args.before, "training/generate.py")
    previous = module_at(args.previous, "training/generate.py")
    rows = args.prompts * args.k
    batch = min(rows, BATCH_ROWS)  # generate_completions' default rows per batch

    def run_before(model) -> int:
        counter = CountingGenerate(model, tokenizer.eos_token_id)
        model.generate = counter
        try:
            before.generate_completions(model, tokenizer, conversations, k=args.k, sampling=sampling)
        finally:
            del model.generate
        return counter.tokens

    def run_generate(model) -> int:
        ids = tokenizer([render_prompt(tokenizer, c) for c in conversations], add_special_tokens=False)["input_ids"]
        order = sorted((i for i in range(len(ids)) for _ in range(args.k)), key=lambda i: (len(ids[i]), i))
        counter = CountingGenerate(model, tokenizer.eos_token_id)
        tokenizer.padding_side = "left"
        try:
            with torch.no_grad():
                for start in range(0, rows, batch):
                    texts = [render_prompt(tokenizer, conversations[i]) for i in order[start : start + batch]]
                    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
                    counter(
                        **enc,
                        do_sample=True,
                        temperature=sampling.temperature,
                        top_p=sampling.top_p,
                        top_k=None,
                        max_new_tokens=sampling.max_new_tokens,
                        pad_token_id=tokenizer.pad_token_id,
                        eos_token_id=tokenizer.eos_token_id,
                    )
        finally:
            tokenizer.padding_side = "right"
        return counter.tokens

    def run_now(model, generate=generate_completions) -> int:
        out = generate(model, tokenizer, conversations, k=args.k, sampling=sampling)
        return sum(s.tokens for samples in out for s in samples)

    ways = {
        "before": lambda: run_before(model32),
        "generate-fp32": lambda: run_generate(model32),
        "generate": lambda: run_generate(model16),
        "previous": lambda: run_now(model16, previous.generate_completions),
        "now-fp32": lambda: run_now(model32),
        "now": lambda: run_now(model16),
    }
    chosen = args.ways.split(",")
    times: dict[str, list[tuple[float, int]]] = {w: [] for w in chosen}
    cpu: dict[str, list[float]] = {w: [] for w in chosen}  # this process's CPU seconds, less moved by other work
    load = os.getloadavg()
    for way in chosen:  # a short warm-up of each way (first-call allocations, oneDNN kernel choice)
        warm = sampling.max_new_tokens
        sampling.max_new_tokens = 2
        ways[way]()
        sampling.max_new_tokens = warm
    for round_ in range(args.rounds):
        for way in chosen:
            torch.manual_seed(round_)
            started, cpu_started = time.perf_counter(), time.process_time()
            tokens = ways[way]()
            seconds = time.perf_counter() - started
            times[way].append((seconds, tokens))
            cpu[way].append(time.process_time() - cpu_started)
            print(
                f"round {round_ + 1} {way}: {tokens} tokens in {seconds:.1f} s, {tokens / seconds:.1f} tokens/s",
                flush=True,
            )

    print(
        f"\n{args.prompts} prompts x {args.k} completions, at most {args.max_new_tokens} new tokens, "
        f"inference dtype {fast}, torch threads {torch.get_num_threads()}, "
        f"load average {load[0]:.1f} before and {os.getloadavg()[0]:.1f} after\n"
    )
    rate = {w: statistics.median(t / s for s, t in times[w]) for w in chosen}
    per_cpu = {w: statistics.median(t / c for (_, t), c in zip(times[w], cpu[w], strict=True)) for w in chosen}
    print(
        "| way | median wall | median tokens | tokens/s (wall) | tokens per CPU second | now vs this way, wall / CPU |"
        "\n|---|---:|---:|---:|---:|---:|"
    )
    for way in chosen:
        seconds = statistics.median(s for s, _ in times[way])
        tokens = statistics.median(t for _, t in times[way])
        ratio = f"{rate['now'] / rate[way]:.2f}x / {per_cpu['now'] / per_cpu[way]:.2f}x" if "now" in rate else ""
        print(f"| {way} | {seconds:.1f} s | {tokens:.0f} | {rate[way]:.1f} | {per_cpu[way]:.1f} | {ratio} |")


if __name__ == "__main__":
    main()
