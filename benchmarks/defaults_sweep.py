"""Training settings against efficacy.py's preferences, fast: the numbers behind the training defaults.

Usage: python benchmarks/defaults_sweep.py [--work DIR] [--samples N] [--reuse] dpo|grpo PREFERENCE
           [-- TRAINING OPTIONS...]      (everything after PREFERENCE goes to ``python -m training``)
       e.g. python benchmarks/defaults_sweep.py dpo list -- --lr 2e-4 --min-steps 48

efficacy.py drives the whole product path (the API, runs, promotion, rounds) and takes about ten minutes a
preference; this takes the same measurement without the app, so that many settings can be tried:

1. the default model answers efficacy.py's 50 training prompts 4 times (temperature 0.8, top-p 0.95, at most
   64 new tokens, seed 7) and its 20 held-out prompts ``--samples`` times (10 by default, efficacy.py's
   ``held_out_answers``); both are kept in ``--work`` and reused by every later call;
2. the simulated annotator of PREFERENCE judges every pair of each training prompt's answers (ties left out)
   into a ``dpo`` file, or ranks each prompt's 4 answers by the property (equal values tied) into a ``grpo``
   file;
3. ``python -m training dpo|grpo`` trains on all of it with the options given (no held-out split), or, with
   ``--reuse``, the model an earlier call with the same options trained is measured again (for example on
   more answers: repeated answers are rare, and 40 of them cannot tell 1 from 2 %);
4. the trained model answers the held-out prompts as the base model did, and the property's change is
   reported as efficacy.py reports it (progress toward the extreme), with perplexity on efficacy.py's neutral
   texts (the base model's beside it) and the empty and repeated answers among its answers (200 by default);
   its answers are kept in the run's directory (held_out_answers-SAMPLES.json), to read what the guard counted.

One line of JSON per call is printed and appended to ``--work``/results.jsonl.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import efficacy  # noqa: E402

ROOT = efficacy.ROOT
TRAIN_PROMPTS, HELD_OUT_PROMPTS = 50, 20


def conversation(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def base_answers(work: Path, samples: int) -> dict[str, Any]:
    cached = work / "base.json"
    if not cached.exists():
        from feedback.services.generation import answers_sample

        train = efficacy.prompts_for(TRAIN_PROMPTS, 0)
        written = answers_sample(
            model=str(efficacy.DEFAULT_MODEL),
            conversations=[conversation(text) for text in train] * efficacy.K,
            temperature=0.8,
            top_p=0.95,
            max_new_tokens=efficacy.MAX_NEW_TOKENS,
            seed=7,
        )
        texts = [text for text, _ in written]
        cached.write_text(json.dumps({"train": [texts[i :: len(train)] for i in range(len(train))]}))
    answers = json.loads(cached.read_text())
    if f"held_out_{samples}" not in answers:
        held_out = [conversation(text) for text in efficacy.prompts_for(HELD_OUT_PROMPTS, TRAIN_PROMPTS)]
        answers[f"held_out_{samples}"] = efficacy.held_out_answers(str(efficacy.DEFAULT_MODEL), held_out, samples)
        cached.write_text(json.dumps(answers))
    if answers.get("perplexity") is None:
        answers["perplexity"] = efficacy.perplexity(str(efficacy.DEFAULT_MODEL))
        cached.write_text(json.dumps(answers))
    return answers


def judged_rows(algorithm: str, preference: efficacy.Preference, answers: list[list[str]]) -> list[dict[str, Any]]:
    rows = []
    for text, written in zip(efficacy.prompts_for(TRAIN_PROMPTS, 0), answers, strict=True):
        if algorithm == "dpo":
            for i, j in itertools.combinations(range(len(written)), 2):
                choice = preference.better(written[i], written[j])
                if choice != "tie":
                    chosen, rejected = (i, j) if choice == "a" else (j, i)
                    rows.append(
                        {"prompt": conversation(text), "chosen": written[chosen], "rejected": written[rejected]}
                    )
            continue
        values = [preference.measure(answer) for answer in written]
        order = sorted(set(values), reverse=not preference.lower_is_better)  # best first
        if len(order) > 1:
            rows.append(
                {"prompt": conversation(text), "completions": written, "ranks": [order.index(v) + 1 for v in values]}
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("algorithm", choices=("dpo", "grpo"))
    parser.add_argument("preference", choices=sorted(efficacy.PREFERENCES))
    parser.add_argument("--work", type=Path, default=ROOT / "var" / "defaults-sweep", help="cache and results")
    parser.add_argument("--samples", type=int, default=10, help="answers per held-out prompt, of each model")
    parser.add_argument("--reuse", action="store_true", help="measure the model trained with these options again")
    parser.add_argument("options", nargs=argparse.REMAINDER, help="after --: python -m training options")
    args = parser.parse_args()
    options = args.options[1:] if args.options[:1] == ["--"] else args.options
    if not 1 <= args.samples <= 50:
        parser.error(f"--samples must be between 1 and 50, not {args.samples}")
    if not (efficacy.DEFAULT_MODEL / "config.json").is_file():
        sys.exit("the default model is missing: run `python manage.py fetch_default_model` first")
    args.work.mkdir(parents=True, exist_ok=True)
    efficacy.setup_django(args.work / "app")

    preference = efficacy.PREFERENCES[args.preference]
    answers = base_answers(args.work, args.samples)
    rows = judged_rows(args.algorithm, preference, answers["train"])
    data = args.work / f"{args.preference}-{args.algorithm}.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = args.work / "runs" / f"{args.algorithm}-{args.preference}-{'_'.join(options) or 'defaults'}"
    command = [sys.executable, "-m", "training", args.algorithm, "--data", str(data), "--model",
               str(efficacy.DEFAULT_MODEL), "--out", str(out), "--eval-fraction", "0", "--no-resume", "--quiet",
               *options]  # fmt: skip
    started = time.perf_counter()
    if args.reuse:
        if not (out / "metrics.json").is_file():
            sys.exit(f"--reuse: nothing was trained with these options yet ({out} has no metrics.json)")
    else:
        done = subprocess.run(command, cwd=ROOT, env=os.environ, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"training failed:\n{done.stderr[-3000:]}")
    trained = time.perf_counter() - started
    held_out = [conversation(text) for text in efficacy.prompts_for(HELD_OUT_PROMPTS, TRAIN_PROMPTS)]
    base = answers[f"held_out_{args.samples}"]
    new = efficacy.held_out_answers(str(out), held_out, args.samples)
    measured = [statistics.fmean(statistics.fmean(map(preference.measure, texts)) for texts in side)
                for side in (base, new)]  # fmt: skip
    flat = [text for texts in new for text in texts]
    (out / f"held_out_answers-{args.samples}.json").write_text(json.dumps(new, indent=1))  # to read the repeated ones
    result = {
        "algorithm": args.algorithm,
        "preference": args.preference,
        "options": options,
        "examples": len(rows),
        "steps": json.loads((out / "metrics.json").read_text()).get("steps"),
        "base": measured[0],
        "new": measured[1],
        "progress": 100 * (measured[1] - measured[0]) / (preference.extreme - measured[0]),
        "perplexity": (answers["perplexity"], efficacy.perplexity(str(out))),
        "base_repeated": sum(efficacy.repeated(text) for texts in base for text in texts),
        "empty": sum(not text for text in flat),
        "repeated": sum(map(efficacy.repeated, flat)),
        "answers": len(flat),
        "train_seconds": None if args.reuse else round(trained),
    }
    print(json.dumps(result))
    with (args.work / "results.jsonl").open("a") as results:
        results.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
