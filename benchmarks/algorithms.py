"""DPO, offline GRPO, reward model + PPO and reward model + online GRPO from the same judgements.

    python benchmarks/algorithms.py [--model var/models/SmolLM2-135M-Instruct] [--prompts 64] [--held-out 16]
        [--k 4] [--max-new-tokens 96] [--samples 4] [--epochs 1] [--only dpo grpo reward ppo grpo_online]
        [--set METHOD:OPTIONS ...]

The judgements are made as a ranking project would see them: the base model answers each prompt
K times (temperature 0.8, top-p 0.95, the project defaults), and simulated annotators rank each
prompt's K answers by length, the answer of fewer words first (equal counts tie). From those
rankings the benchmark writes the two exports ``python -m training`` reads: ``dpo`` (every pair
with r_i < r_j, the shorter chosen, as the export's default) and ``grpo`` (completions with their
ranks). The prompts are the demo prompts (feedback/demo/prompts.jsonl) and a few short neutral
ones below; ``--held-out`` of them (chosen at random, seeded) are never trained on.

Each method then runs as ``python -m training ...`` in a process of its own, with its defaults
(or the options ``--set`` gives it, as ``--set 'grpo_online:--lr 3e-4'``) and rollouts sampled as
the project samples: dpo on the pairs; grpo on the ranked groups; reward
on the ranked groups (Plackett-Luce); ppo and grpo_online on the training prompts against that
reward model. For each: wall time, CPU time and peak resident memory of that process, and the
held-out figures the loop reports (``eval_before`` / ``eval_after`` in its metrics.json).

Then, in this process, every version and the base model answer the held-out prompts ``--samples``
times each with the same sampling settings and the same seed, and the benchmark reports each one's
mean answer length (tokens, and words) with the mean per-prompt difference from the base model and
its standard error over the prompts; and, computed the same way for all, the held-out pairs' share
where the model finds the chosen (shorter) answer more likely. Prints a Markdown report.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from measured import Measured, run_measured  # noqa: E402

DEFAULT_MODEL = ROOT / "var/models/SmolLM2-135M-Instruct"
DEMO_PROMPTS = ROOT / "feedback/demo/prompts.jsonl"
TEMPERATURE, TOP_P = 0.8, 0.95  # the project defaults (feedback.models.Project)
METHODS = ("dpo", "grpo", "reward", "ppo", "grpo_online")

# Questions with short answers, so that a preference for short answers has more to act on than the
# demo prompts' long ones (which the length limit cuts at least as often as not).
OWN_PROMPTS = [
    "What is the capital of Italy?",
    "Name a primary colour.",
    "How many days are in a leap year?",
    "What is 12 times 12?",
    "Which planet is closest to the sun?",
    "What is the boiling point of water at sea level in Celsius?",
    "Give a synonym for 'happy'.",
    "What language is spoken in Brazil?",
    "Who wrote 'Romeo and Juliet'?",
    "What is the chemical symbol for gold?",
    "How many legs does a spider have?",
    "What is the largest ocean on Earth?",
    "Translate 'thank you' into French.",
    "What is the square root of 81?",
    "Name a mammal that can fly.",
    "What gas do plants take in from the air?",
    "In which continent is Kenya?",
    "What is the opposite of 'ancient'?",
    "How many minutes are in two hours?",
    "What is the freezing point of water in Fahrenheit?",
    "Name one of the Great Lakes.",
    "What is the plural of 'mouse'?",
    "Which instrument has 88 keys?",
    "What is the main ingredient of guacamole?",
]


def load_prompts(count: int) -> list[Any]:
    demo = [json.loads(line)["prompt"] for line in DEMO_PROMPTS.read_text().splitlines() if line.strip()]
    prompts = demo + OWN_PROMPTS
    if count > len(prompts):
        sys.exit(f"--prompts: at most {len(prompts)} ({len(demo)} demo prompts and {len(OWN_PROMPTS)} of our own)")
    return random.Random(0).sample(prompts, count)


def words(text: str) -> int:
    return len(text.split())


def length_ranks(texts: list[str]) -> list[int]:
    """The simulated annotator: 1 = fewest words; equal counts share a rank (competition ranking)."""
    counts = [words(t) for t in texts]
    return [1 + sum(other < own for other in counts) for own in counts]


def judgement_rows(prompts: list[Any], answers: list[list[Any]]) -> tuple[list[dict], list[dict]]:
    """The ``dpo`` and ``grpo`` export rows of the simulated rankings."""
    pairs, groups = [], []
    for prompt, samples in zip(prompts, answers, strict=True):
        texts = [s.text for s in samples]
        ranks = length_ranks(texts)
        groups.append(
            {"prompt": prompt, "completions": texts, "ranks": ranks, "truncated": [s.truncated for s in samples]}
        )
        for i in range(len(texts)):
            for j in range(len(texts)):
                if ranks[i] < ranks[j]:
                    pairs.append({"prompt": prompt, "chosen": texts[i], "rejected": texts[j], "weight": 1.0})
    return pairs, groups


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sample_answers(model_dir: str, prompts: list[Any], *, k: int, max_new_tokens: int, seed: int) -> list[list[Any]]:
    import torch

    from training.data import prompt_messages
    from training.generate import SamplingConfig, generate_completions, inference_dtype
    from training.models import load_model

    model, tokenizer = load_model(model_dir)
    model = model.to(inference_dtype(torch.device("cpu")))
    sampling = SamplingConfig(temperature=TEMPERATURE, top_p=TOP_P, max_new_tokens=max_new_tokens, seed=seed)
    return generate_completions(model, tokenizer, [prompt_messages(p) for p in prompts], k=k, sampling=sampling)


def pair_preference(model_dir: str, pair_rows: list[dict]) -> dict[str, float | None]:
    """``logp_metrics`` of a model on the held-out pairs, computed alike for every version and the base."""
    import torch

    from training.data import collate_pairs, length_sorted_batches, tokenize_pairs
    from training.logprobs import autocast_context, evaluation, sequence_logps
    from training.models import load_model
    from training.runs import logp_metrics, resolve_precision

    model, tokenizer = load_model(model_dir)
    device = torch.device("cpu")
    pairs = tokenize_pairs(pair_rows, tokenizer, max_length=512, max_prompt_length=256).examples
    chosen, rejected = torch.zeros(len(pairs)), torch.zeros(len(pairs))
    lengths = [len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs]
    with torch.no_grad(), evaluation(model), autocast_context(resolve_precision("auto", device), device):
        for idx in length_sorted_batches(lengths, 8, seed=0, shuffle=False):
            logps = sequence_logps(model, collate_pairs([pairs[i] for i in idx], int(tokenizer.pad_token_id))).float()
            chosen[idx], rejected[idx] = logps[: len(idx)], logps[len(idx) :]
    return logp_metrics(
        chosen,
        rejected,
        chosen_lengths=torch.tensor([len(p.chosen_ids) for p in pairs]),
        rejected_lengths=torch.tensor([len(p.rejected_ids) for p in pairs]),
    )


def per_prompt_lengths(answers: list[list[Any]]) -> tuple[list[float], list[float], float]:
    """Each prompt's mean answer length in tokens and in words, and the share of answers the limit cut."""
    tokens = [statistics.fmean(s.tokens for s in group) for group in answers]
    word_counts = [statistics.fmean(words(s.text) for s in group) for group in answers]
    cut = sum(s.truncated for group in answers for s in group) / sum(len(group) for group in answers)
    return tokens, word_counts, cut


def paired(new: list[float], base: list[float]) -> tuple[float, float]:
    """Mean per-prompt difference and its standard error over the prompts."""
    diffs = [a - b for a, b in zip(new, base, strict=True)]
    return statistics.fmean(diffs), statistics.stdev(diffs) / math.sqrt(len(diffs))


def train_command(method: str, args: argparse.Namespace, files: dict[str, Path], out: Path) -> list[str]:
    command = [sys.executable, "-m", "training", method, "--model", args.model, "--out", str(out), "--quiet"]
    command += ["--epochs", str(args.epochs), *args.options.get(method, [])]
    if method == "dpo":
        return command + ["--data", str(files["train_pairs"]), "--eval-data", str(files["held_pairs"])]
    if method in ("grpo", "reward"):
        return command + ["--data", str(files["train_groups"]), "--eval-data", str(files["held_groups"])]
    sampling = ["--temperature", str(TEMPERATURE), "--top-p", str(TOP_P), "--max-new-tokens", str(args.max_new_tokens)]
    return command + [
        "--prompts",
        str(files["train_prompts"]),
        "--eval-data",
        str(files["held_prompts"]),
        "--reward-model",
        str(files["reward_model"]),
        *sampling,
    ]


def held_out_figures(method: str, metrics: dict[str, Any]) -> str:
    before, after = metrics["eval_before"], metrics["eval_after"]
    if method == "reward":
        return f"accuracy {before['accuracy']:.3f} -> {after['accuracy']:.3f} ({before['pairs']} pairs)"
    if method in ("ppo", "grpo_online"):
        return (
            f"reward-model score of samples {before['reward']:.3f} ± {before['reward_stderr']:.3f} -> "
            f"{after['reward']:.3f} ± {after['reward_stderr']:.3f}"
        )
    text = (
        f"logp_accuracy {before['logp_accuracy']:.3f} -> {after['logp_accuracy']:.3f}, per token "
        f"{before['logp_accuracy_per_token']:.3f} -> {after['logp_accuracy_per_token']:.3f}, "
        f"implicit-reward accuracy {after['accuracy']:.3f}"
    )
    if after.get("kendall_tau") is not None:
        text += f", Kendall tau {before['kendall_tau']:.3f} -> {after['kendall_tau']:.3f}"
    return text


def train_all(
    args: argparse.Namespace, work: Path, runs: dict[str, tuple[Measured | None, dict[str, Any]]]
) -> tuple[list[Any], list[dict]]:
    """Sample and rank the base model's answers, write the exports and train each method.

    Returns the held-out prompts and pairs."""
    prompts = load_prompts(args.prompts)
    held_prompts, train_prompts = prompts[: args.held_out], prompts[args.held_out :]

    started = time.perf_counter()
    answers = sample_answers(args.model, prompts, k=args.k, max_new_tokens=args.max_new_tokens, seed=0)
    data_seconds = time.perf_counter() - started
    train_pairs, train_groups = judgement_rows(train_prompts, answers[args.held_out :])
    held_pairs, held_groups = judgement_rows(held_prompts, answers[: args.held_out])
    files = {
        "train_pairs": write_jsonl(work / "train_pairs.jsonl", train_pairs),
        "held_pairs": write_jsonl(work / "held_pairs.jsonl", held_pairs),
        "train_groups": write_jsonl(work / "train_groups.jsonl", train_groups),
        "held_groups": write_jsonl(work / "held_groups.jsonl", held_groups),
        "train_prompts": write_jsonl(work / "train_prompts.jsonl", [{"prompt": p} for p in train_prompts]),
        "held_prompts": write_jsonl(work / "held_prompts.jsonl", [{"prompt": p} for p in held_prompts]),
        "reward_model": work / "reward",
    }
    _, _, judged_cut = per_prompt_lengths(answers)
    print(
        f"{len(train_prompts)} training and {len(held_prompts)} held-out prompts x {args.k} base answers in "
        f"{data_seconds:.0f} s ({judged_cut:.0%} cut at {args.max_new_tokens} tokens); {len(train_pairs)} training "
        f"pairs and {len(held_pairs)} held-out pairs; data in {work}",
        flush=True,
    )

    for method in METHODS:
        if args.only and method not in args.only:
            continue
        out = files["reward_model"] if method == "reward" else work / method
        print(f"running {method} ...", flush=True)
        measured = run_measured(train_command(method, args, files, out), cwd=ROOT)
        runs[method] = (measured, json.loads((out / "metrics.json").read_text()))
        print(
            f"  {measured.wall_seconds:.0f} s wall, {measured.cpu_seconds:.0f} s CPU, "
            f"peak {measured.peak_rss_mb:.0f} MB",
            flush=True,
        )
    return held_prompts, held_pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="base model directory")
    parser.add_argument("--prompts", type=int, default=64, help="prompts in all, held-out ones included")
    parser.add_argument("--held-out", type=int, default=16, help="prompts never trained on, for the figures")
    parser.add_argument("--k", type=int, default=4, help="base-model answers per prompt, ranked together")
    parser.add_argument("--max-new-tokens", type=int, default=96, help="length limit of every answer sampled")
    parser.add_argument("--samples", type=int, default=4, help="answers per held-out prompt to measure lengths")
    parser.add_argument("--epochs", type=int, default=1, help="passes over the training data, every method")
    parser.add_argument("--only", nargs="*", choices=METHODS, help="run only these (ppo and grpo_online need reward)")
    parser.add_argument("--work", type=Path, help="directory for the data and models (default: a new temporary one)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="METHOD:OPTIONS",
        help="options of one method's training command in place of its defaults, e.g. 'grpo_online:--lr 3e-4'",
    )
    parser.add_argument(
        "--measure-only", action="store_true", help="train nothing: measure the versions an earlier run left in --work"
    )
    args = parser.parse_args()
    if args.measure_only and args.work is None:
        parser.error("--measure-only needs --work")
    args.options = {}
    for item in args.set:
        method, _, options = item.partition(":")
        if method not in METHODS or not options.strip():
            parser.error(f"--set {item!r}: expected METHOD:OPTIONS with METHOD one of {', '.join(METHODS)}")
        args.options.setdefault(method, []).extend(shlex.split(options))
    if not (Path(args.model) / "config.json").is_file():
        sys.exit(f"no model at {args.model}: run `python manage.py fetch_default_model` first")
    import training  # noqa: F401  (the OpenMP wait policy it sets is inherited by the children)

    work = args.work or Path(tempfile.mkdtemp(prefix="algorithms-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    runs: dict[str, tuple[Measured | None, dict[str, Any]]] = {}
    if args.measure_only:
        held_prompts = [row["prompt"] for row in read_jsonl(work / "held_prompts.jsonl")]
        held_pairs = read_jsonl(work / "held_pairs.jsonl")
        for method in METHODS:
            if (work / method / "metrics.json").is_file():
                runs[method] = (None, json.loads((work / method / "metrics.json").read_text()))
    else:
        held_prompts, held_pairs = train_all(args, work, runs)

    print("measuring answers on the held-out prompts ...", flush=True)
    versions = {"base": args.model} | {m: str(work / m) for m in runs if m != "reward"}
    lengths: dict[str, tuple[list[float], list[float], float]] = {}
    preference: dict[str, dict[str, float | None]] = {}
    for name, model_dir in versions.items():
        held_answers = sample_answers(
            model_dir, held_prompts, k=args.samples, max_new_tokens=args.max_new_tokens, seed=1
        )
        lengths[name] = per_prompt_lengths(held_answers)
        preference[name] = pair_preference(model_dir, held_pairs)

    print()
    print("| method | wall | CPU | peak RSS | steps | held-out figures of the loop (before -> after) | load |")
    print("|---|---:|---:|---:|---:|---|---|")
    for method, (m, metrics) in runs.items():
        measured = (
            f"{m.wall_seconds:.0f} s | {m.cpu_seconds:.0f} s | {m.peak_rss_mb:.0f} MB"
            if m is not None
            else "– | – | –"  # an earlier run's: its own output has them
        )
        load = f"{m.load_before} -> {m.load_after}" if m is not None else "–"
        print(f"| {method} | {measured} | {metrics['steps']} | {held_out_figures(method, metrics)} | {load} |")
    print()
    print(
        f"Answers to the {len(held_prompts)} held-out prompts, {args.samples} each, temperature {TEMPERATURE}, "
        f"top-p {TOP_P}, at most {args.max_new_tokens} new tokens, seed 1 for every model; differences are per "
        "prompt against the base model, ± their standard error over the prompts:"
    )
    print()
    print(
        "| model | mean tokens | vs base | mean words | vs base | cut at the limit | "
        "held-out pairs: chosen more likely (per token) |"
    )
    print("|---|---:|---:|---:|---:|---:|---|")
    base_tokens, base_words, _ = lengths["base"]
    for name, (tokens, word_counts, cut) in lengths.items():
        if name == "base":
            vs_tokens = vs_words = "–"
        else:
            (dt, st), (dw, sw) = paired(tokens, base_tokens), paired(word_counts, base_words)
            vs_tokens, vs_words = f"{dt:+.1f} ± {st:.1f}", f"{dw:+.1f} ± {sw:.1f}"
        p = preference[name]
        print(
            f"| {name} | {statistics.fmean(tokens):.1f} | {vs_tokens} | {statistics.fmean(word_counts):.1f} | "
            f"{vs_words} | {cut:.0%} | {p['logp_accuracy']:.3f} ({p['logp_accuracy_per_token']:.3f}) |"
        )
    if "reward" in runs and runs["reward"][0] is not None:
        for method in ("ppo", "grpo_online"):
            if method in runs and runs[method][0] is not None:
                total = runs["reward"][0].wall_seconds + runs[method][0].wall_seconds  # type: ignore[union-attr]
                print(f"\nreward model + {method}: {total:.0f} s wall in all")
    raw = {m: {"measured": measured and vars(measured), "metrics": metrics} for m, (measured, metrics) in runs.items()}
    (work / "results.json").write_text(
        json.dumps({"runs": raw, "lengths": lengths, "preference": preference}, indent=2)
    )
    print(f"\nraw results: {work / 'results.json'}")


if __name__ == "__main__":
    main()
