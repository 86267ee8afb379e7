"""DPO speed: TRL's DPOTrainer against training.dpo on the same pairs, one process per run.

    python benchmarks/dpo_vs_trl.py [--model var/models/SmolLM2-135M-Instruct] [--pairs 32] [--rounds 1]

Needs the `bench` extra (trl, datasets; `dev` includes it). Runs, one after the other, each in a fresh
Python process whose whole wall time is measured (imports, model load, tokenization,
reference log-probs, training, saving):

1. trl: DPOTrainer, full fine-tuning in fp32, reference log-probs precomputed,
   gradient checkpointing off, batch size 4, max length 256, one epoch.
2. ours-matched: training.dpo with the same settings (full fine-tuning, fp32, same
   learning rate, schedule, clipping, optimizer).
3. ours-default: training.dpo with its defaults (LoRA, precision auto), batch size 4,
   max length 256, one epoch, an empty reference cache.
4. ours-periodic: the next periodic run: the same pairs plus 10% new ones, with the
   reference cache that run 3 filled.

With ``--rounds N`` the four runs are repeated N times in turn (fresh caches each round) and
each run's fastest round is reported, with every round's wall time. It prints a Markdown
report: wall time, pairs/s, tokens/s, speed-ups, first-step
loss of trl and ours-matched, and the largest difference between the per-pair
reference log-probs each computed (same formula, same numbers).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "var/models/SmolLM2-135M-Instruct"
BATCH_SIZE = 4
MAX_LENGTH = 256
MAX_PROMPT_LENGTH = 192
MATCHED_LR = 1e-6  # TRL's default DPO learning rate

WORDS = [
    "the",
    "model",
    "answer",
    "question",
    "people",
    "prefer",
    "clear",
    "short",
    "example",
    "code",
    "list",
    "python",
    "data",
    "value",
    "time",
    "because",
    "when",
    "which",
    "while",
    "after",
    "before",
    "simple",
    "careful",
    "review",
    "test",
    "result",
    "error",
    "change",
    "reason",
    "first",
    "second",
    "then",
    "finally",
    "also",
    "however",
    "therefore",
    "instead",
    "usually",
    "often",
    "never",
    "always",
    "might",
    "function",
    "variable",
    "loop",
    "string",
    "number",
    "file",
    "line",
    "table",
    "chart",
    "user",
    "project",
    "training",
    "reward",
]


def sentence(rng: random.Random, n: int) -> str:
    words = [rng.choice(WORDS) for _ in range(n)]
    return " ".join(words).capitalize() + "."


def make_pairs(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        prompt = f"Question {i}: " + " ".join(sentence(rng, rng.randint(8, 12)) for _ in range(3))
        chosen = " ".join(sentence(rng, rng.randint(9, 13)) for _ in range(6))
        rejected = " ".join(sentence(rng, rng.randint(9, 13)) for _ in range(5))
        pairs.append({"prompt": [{"role": "user", "content": prompt}], "chosen": chosen, "rejected": rejected})
    return pairs


# ---------------------------------------------------------------------------- children


def run_trl(model_path: str, data: list[dict], result_file: Path) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    rows = [
        {
            # The same prompt text training.dpo builds; TRL then appends EOS to each completion.
            "prompt": tokenizer.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True),
            "chosen": r["chosen"],
            "rejected": r["rejected"],
        }
        for r in data
    ]
    with tempfile.TemporaryDirectory() as out:
        args = DPOConfig(
            output_dir=out,
            per_device_train_batch_size=BATCH_SIZE,
            num_train_epochs=1,
            max_length=MAX_LENGTH,
            learning_rate=MATCHED_LR,
            beta=0.1,
            precompute_ref_log_probs=True,
            gradient_checkpointing=False,
            bf16=False,
            use_cpu=True,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            seed=0,
        )
        trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
        started = time.perf_counter()
        trainer.train()
        train_seconds = time.perf_counter() - started
        first = next(log for log in trainer.state.log_history if "loss" in log)
        ds = trainer.train_dataset
        ref = {row["prompt"]: (row["ref_chosen_logps"], row["ref_rejected_logps"]) for row in ds}
        trainer.save_model(out)
    result = {
        "train_seconds": train_seconds,
        "steps": trainer.state.global_step,
        "first_loss": first["loss"],
        "ref_logps": [ref[row["prompt"]] for row in rows],
    }
    result_file.write_text(json.dumps(result))


def run_ours(model_path: str, data: list[dict], result_file: Path, mode: str, cache_dir: Path) -> None:
    from training.dpo import DPOConfig, train_dpo

    if mode == "matched":
        config = DPOConfig(
            lora=False,
            precision="fp32",
            learning_rate=MATCHED_LR,
            warmup_ratio=0.0,
            lr_scheduler="linear",
            batch_size=BATCH_SIZE,
            max_length=MAX_LENGTH,
            max_prompt_length=MAX_PROMPT_LENGTH,
            save_every=0,
        )
    else:
        config = DPOConfig(batch_size=BATCH_SIZE, max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT_LENGTH)
    first: dict[str, float] = {}

    def progress(step: int, total: int, metrics: dict[str, float]) -> None:
        if step == 1:
            first.update(metrics)

    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        result = train_dpo(
            config,
            train_examples=data,
            eval_examples=[],
            model=model_path,
            out_dir=Path(out) / "model",
            cache_dir=cache_dir,
            progress=progress,
        )
        train_seconds = time.perf_counter() - started
    m = result.metrics
    result_file.write_text(
        json.dumps(
            {
                "train_seconds": train_seconds,
                "steps": m["steps"],
                "first_loss": first["loss"],
                "precision": m["precision"],
                "reference_computed": m["reference_computed"],
                "reference_cached": m["reference_cached"],
                "reference_seconds": m["reference_seconds"],
                "loop_seconds": m["train_seconds"],
            }
        )
    )


# ------------------------------------------------------------------------------ parent


def load_average() -> str:
    return ", ".join(f"{x:.1f}" for x in os.getloadavg())


def child(engine: str, model: str, data_file: Path, cache_dir: Path) -> dict:
    """Run one engine in a fresh process; every engine gets the OpenMP wait policy `training` sets for itself."""
    import training  # noqa: F401  (puts that policy in os.environ, which the child inherits)

    result_file = data_file.with_suffix(f".{engine}.json")
    load_before = load_average()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, __file__, "--child", engine, "--model", model, "--data", str(data_file)]
        + ["--result", str(result_file), "--cache-dir", str(cache_dir)],
        check=True,
        cwd=REPO,
    )
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    result = json.loads(result_file.read_text())
    result.update(wall_seconds=wall, cpu_seconds=cpu, load_before=load_before, load_after=load_average())
    return result


def cached_reference_logps(
    model: str, tokenizer: Any, data: list[dict], cache_dir: Path, precision: str
) -> list[tuple[float, float]]:
    """Per-pair (chosen, rejected) reference log-probs that a run of ours left in its cache, read after the run."""
    from training.data import sequence_key, tokenize_pairs
    from training.logprobs import ReferenceCache, model_fingerprint

    pairs = tokenize_pairs(data, tokenizer, max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT_LENGTH).examples
    cache = ReferenceCache(cache_dir, model_fingerprint(model, precision))
    return [
        (
            float(cache.get(sequence_key(p.prompt_ids, p.chosen_ids)).sum()),  # type: ignore[union-attr]
            float(cache.get(sequence_key(p.prompt_ids, p.rejected_ids)).sum()),  # type: ignore[union-attr]
        )
        for p in pairs
    ]


def count_tokens(tokenizer: Any, data: list[dict]) -> int:
    """Real tokens one epoch puts through the model: prompt + completion, for chosen and rejected."""
    from training.data import tokenize_pairs

    pairs = tokenize_pairs(data, tokenizer, max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT_LENGTH).examples
    return sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="model directory")
    parser.add_argument("--pairs", type=int, default=32, help="pairs in the first run")
    parser.add_argument("--only", nargs="*", help="run only these: trl matched default periodic")
    parser.add_argument(
        "--rounds", type=int, default=1, help="run the four one after the other this many times; report each one's best"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        data = json.loads(args.data.read_text())
        if args.child == "trl":
            run_trl(args.model, data, args.result)
        else:
            run_ours(args.model, data, args.result, args.child, args.cache_dir)
        return

    work = Path(tempfile.mkdtemp(prefix="dpo-bench-"))
    base = make_pairs(args.pairs, seed=0)
    extra = make_pairs(args.pairs + math.ceil(args.pairs * 0.1), seed=1)[args.pairs :]
    first_file, second_file = work / "pairs.json", work / "pairs_plus_10pct.json"
    first_file.write_text(json.dumps(base))
    second_file.write_text(json.dumps(base + extra))
    from training.models import load_model

    _, tokenizer = load_model(args.model)
    tokens = {first_file: count_tokens(tokenizer, base), second_file: count_tokens(tokenizer, base + extra)}
    print(f"{len(base)} pairs, {tokens[first_file] / (2 * len(base)):.0f} tokens a sequence on average", flush=True)

    results: dict[str, dict] = {}
    walls: dict[str, list[float]] = {}
    for round_no in range(args.rounds):
        runs = [
            ("trl", "trl", first_file, work / f"cache-matched-{round_no}"),
            ("ours-matched", "matched", first_file, work / f"cache-matched-{round_no}"),
            ("ours-default", "default", first_file, work / f"cache-default-{round_no}"),
            ("ours-periodic", "default", second_file, work / f"cache-default-{round_no}"),
        ]
        for name, engine, data_file, cache in runs:
            if args.only and name.removeprefix("ours-") not in args.only:
                continue
            print(f"round {round_no + 1}: running {name} ...", flush=True)
            data = json.loads(data_file.read_text())
            result = child(engine, args.model, data_file, cache)
            if name == "ours-matched":  # outside the timed process: the comparison is not part of training
                result["ref_logps"] = cached_reference_logps(args.model, tokenizer, data, cache, result["precision"])
            result["pairs"] = len(data)
            result["tokens"] = tokens[data_file]
            walls.setdefault(name, []).append(result["wall_seconds"])
            # On a shared machine the fastest round is the one least slowed by other work.
            if name not in results or result["wall_seconds"] < results[name]["wall_seconds"]:
                results[name] = result

    print()
    for name, seconds in walls.items():
        print(f"{name}: wall seconds by round " + ", ".join(f"{x:.1f}" for x in seconds))
    print()
    print("| run | wall s | CPU s | pairs/s | tokens/s | train() s | first-step loss | ref computed / cached | load |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name} | {r['wall_seconds']:.1f} | {r['cpu_seconds']:.1f} | {r['pairs'] / r['wall_seconds']:.2f} | "
            f"{r['tokens'] / r['wall_seconds']:.0f} | {r['train_seconds']:.1f} | {r['first_loss']:.6f} | "
            f"{r.get('reference_computed', '-')} / {r.get('reference_cached', '-')} | "
            f"{r['load_before']} -> {r['load_after']} |"
        )
    if "trl" in results:
        trl = results["trl"]["wall_seconds"]
        for name in ("ours-matched", "ours-default", "ours-periodic"):
            if name in results:
                speed_up = (results[name]["pairs"] / results[name]["wall_seconds"]) / (results["trl"]["pairs"] / trl)
                cpu_ratio = (
                    results["trl"]["cpu_seconds"]
                    / results[name]["cpu_seconds"]
                    * (results[name]["pairs"] / results["trl"]["pairs"])
                )
                print(f"\n{name}: {speed_up:.2f}x TRL's pairs/s (whole process, wall); {cpu_ratio:.2f}x per CPU second")
        if "ours-matched" in results:
            a, b = results["trl"], results["ours-matched"]
            print(f"first-step loss difference (fp32): {abs(a['first_loss'] - b['first_loss']):.2e}")
            pairs = zip(a["ref_logps"], b["ref_logps"], strict=True)
            diffs = [abs(x - y) for ra, rb in pairs for x, y in zip(ra, rb, strict=True)]
            print(f"largest per-sequence reference log-prob difference: {max(diffs):.2e} (of {len(diffs)} sequences)")
    (work / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\nraw results: {work / 'results.json'}")


if __name__ == "__main__":
    main()
