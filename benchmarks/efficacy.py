"""Efficacy: does a round of judgements visibly change what the model writes?

Usage: python benchmarks/efficacy.py [--preferences short_first_sentence,list,direct] [--rounds 1]
           [--prompts 50] [--held-out 20] [--samples 10] [--config '{"learning_rate": 1e-4}']

Drives the product's own path on the default model (SmolLM2-135M-Instruct), in a temporary data dir with its
own SQLite database, the worker's work done in this process (as `--sync` does):

1. the base model answers ``--prompts`` training prompts, K = 4, at most 64 new tokens (``completions_generate``:
   round 1); a project per preference, the later ones importing the same answers through the API, so the base
   model answers once;
2. simulated annotators, each with one consistent, measurable preference, judge every pair through the REST API
   (``next-task`` and ``judgements``, token auth; two annotators, overlap 1); a pair the preference cannot tell
   apart is judged a tie, which no run trains on;
3. a DPO run at the project's defaults (``training_run_start`` and ``training_run_execute``, over the settings
   of ``--config`` when given) makes v1, which is promoted; with ``--rounds 3`` the promoted version writes a
   new round on the same prompts (``round_request`` / ``round_write``), people judge it, and the next run trains
   on every round, three times;
4. after every round, the base model and the round's version answer ``--held-out`` prompts the runs never saw,
   ``--samples`` each, with the project's sampling settings and the same seed (``answers_sample``, the
   side-by-side path), and the preferred property is measured on both.

Preferences (their property, the direction people prefer, and the extreme it can move to):

- ``short_first_sentence``: words in the first sentence, fewer preferred (extreme 1 word);
- ``list``: whether the answer holds a Markdown list (a line starting with -, *, or 1.), a list preferred
  (extreme: every answer);
- ``direct``: whether the answer opens with a preamble rather than the answer: an interjection ("Sure",
  "Certainly", "Great question", "Here is", ...) or a first sentence that remarks on the question ("... can be a
  daunting task", "... is a great way"); no preamble preferred (extreme: none).

Reported per preference and round: the property on the base model's and the new version's held-out answers with the
standard error of each mean and of their difference (paired by prompt: each prompt's mean over its samples),
how far the change goes toward the extreme (``progress``, per cent), judgements per 10 points of that progress,
and a fluency guard: perplexity on a fixed neutral text set (NEUTRAL_TEXTS) and the count of empty answers and of
repeated ones (a word 3-gram three or more times), with the one-sided p-value of a rise (Fisher's exact test:
how often the new version's count or more would fall on its side if both models wrote such answers equally
often). The base model repeats itself in about 2 % of its answers, so the default 10 answers a prompt (200)
are what tells a rise from luck; 40 cannot. Also the run's own held-out figures (``eval_before`` /
``eval_after``) with 95 % Wilson intervals, for the question of issue 19 ("50.0% -> 27.3% on 22 held-out pairs").
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DEFAULT_MODEL = ROOT / "var" / "models" / "SmolLM2-135M-Instruct"
K = 4
MAX_NEW_TOKENS = 64
SEED = 1234

TOPICS = [
    "keep a houseplant alive", "make a cup of tea", "start running", "save money each month", "learn a new language",
    "write a cover letter", "fall asleep faster", "clean a laptop keyboard", "plan a birthday party",
    "bake bread at home", "study for an exam", "prepare for a job interview", "start a vegetable garden",
    "organise a small kitchen", "take better photos with a phone", "learn to play the guitar", "reduce stress at work",
    "make friends in a new city", "choose a good book", "keep a journal", "cook rice on the stove",
    "stay focused while working from home", "pack for a weekend trip", "care for a pet cat", "fix a flat bicycle tire",
    "learn to swim", "write a short story", "make a budget for a trip", "drink more water", "start meditating",
    "paint a room", "get better at public speaking", "remember people's names", "make homemade pizza",
    "keep a car in good shape", "teach a child to read", "be more productive in the morning", "learn basic coding",
    "write a thank-you note", "recycle at home", "choose running shoes", "brew coffee without a machine",
    "make a simple website", "stretch after exercise", "prepare a healthy lunch", "declutter a closet",
    "learn to draw", "host a dinner for friends", "improve handwriting", "keep bread fresh", "make a paper plane",
    "clean windows without streaks", "learn to juggle", "start a book club", "plan a picnic", "care for a new puppy",
    "build a birdhouse", "improve a credit score", "learn to type faster", "keep a room cool in summer",
    "make soup from leftovers", "choose a laptop", "train for a 5k race", "write a good email subject line",
    "wash a wool sweater", "start a podcast", "grow herbs on a windowsill", "take notes in a meeting",
    "set up a home office", "make a smoothie",
]  # fmt: skip
TEMPLATES = [
    "How do I {}?",
    "What is the best way to {}?",
    "Can you give me some tips to {}?",
    "Explain how to {}.",
    "I want to {}. Where should I start?",
]
NEUTRAL_TEXTS = [
    "The river flows through the valley and reaches the sea after many miles. Along its banks there are small "
    "towns, farms and forests, and in spring the water rises with the melting snow.",
    "A library lends books, music and films to the people of a town. Most libraries also offer quiet rooms for "
    "reading and study, and some hold classes for children and adults.",
    "Bread is made from flour, water, salt and yeast. The dough is kneaded, left to rise, shaped and baked in a "
    "hot oven until the crust is brown.",
    "The train left the station a few minutes late. Through the window the passengers could see fields, a small "
    "lake and, further away, a line of low hills.",
    "Photosynthesis is the process by which plants use light, water and carbon dioxide to make sugar. Oxygen is "
    "released into the air as a by-product.",
    "In the morning the market fills with people buying fruit, vegetables, fish and flowers. By noon most of the "
    "stalls have sold what they brought and begin to close.",
    "A bicycle has two wheels, a frame, pedals and a chain that turns the rear wheel. Riders steer with the "
    "handlebars and stop with brakes on the wheels.",
    "The museum opened a new exhibition about the history of the city. It shows maps, tools and letters from "
    "the people who lived there two hundred years ago.",
    "Rain fell for most of the afternoon, and the streets were quiet. When it stopped, children came out to play "
    "in the puddles and the air smelled fresh.",
    "A computer stores information as numbers. Programs tell it what to do with those numbers, step by step, "
    "many millions of times each second.",
]
PREAMBLES = (
    "sure", "certainly", "of course", "absolutely", "great question", "good question", "what a great",
    "i'd be happy", "i would be happy", "i'm happy", "i am happy", "i'd love", "hello", "hi ", "hi!", "hi,",
    "thank you", "thanks", "as an ai", "here's", "here is", "here are", "well,", "okay", "ok,", "yes,", "no problem",
    "i can help", "i'd be glad", "glad you asked", "that's a great", "that is a great",
)  # fmt: skip
# An opening that remarks on the question instead of answering it ("Learning a language can be a daunting task.").
FILLER = re.compile(
    r"\b(?:can (?:be|seem)|is (?:a|an) (?:great|wonderful|fun|crucial|important|rewarding|exciting|challenging|"
    r"daunting|essential|excellent))\b",
    re.I,
)
LIST_LINE = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+\S", re.M)


def first_sentence(text: str) -> str:
    text = text.strip()
    match = re.search(r"[.!?](?=\s|$)|\n", text)
    return text[: match.start() + 1] if match else text


def first_sentence_words(text: str) -> float:
    return float(len(first_sentence(text).split()))


def uses_list(text: str) -> float:
    return 1.0 if LIST_LINE.search(text) else 0.0


def has_preamble(text: str) -> float:
    opening = text.strip().lower().lstrip("*#_ ")
    return 1.0 if opening.startswith(PREAMBLES) or FILLER.search(first_sentence(opening)) else 0.0


@dataclass(frozen=True)
class Preference:
    measure: Callable[[str], float]
    lower_is_better: bool
    extreme: float
    unit: str

    def better(self, a: str, b: str) -> str:
        """The simulated annotator's choice between two answers: a, b or tie."""
        ma, mb = self.measure(a), self.measure(b)
        if ma == mb:
            return "tie"
        return "a" if (ma < mb) == self.lower_is_better else "b"


PREFERENCES = {
    "short_first_sentence": Preference(first_sentence_words, True, 1.0, "words in the first sentence"),
    "list": Preference(uses_list, False, 1.0, "share of answers with a list"),
    "direct": Preference(has_preamble, True, 0.0, "share of answers opening with a preamble"),
}


def setup_django(data_dir: Path) -> None:
    os.environ["RANKWISE_DATA_DIR"] = str(data_dir)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    os.environ.setdefault("SECRET_KEY", "efficacy-benchmark")
    os.environ.setdefault("DEBUG", "1")
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)


def prompts_for(count: int, start: int) -> list[str]:
    return [TEMPLATES[i % len(TEMPLATES)].format(TOPICS[i % len(TOPICS)]) for i in range(start, start + count)]


def api_client(user: Any) -> Any:
    from rest_framework.authtoken.models import Token
    from rest_framework.test import APIClient

    client = APIClient(SERVER_NAME="localhost")
    client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.get_or_create(user=user)[0].key}")
    return client


def judge_all(project: Any, annotators: list[Any], preference: Preference) -> Counter:
    """Each annotator in turn asks the API for a task and judges it by the preference, until none is left."""
    clients = [api_client(user) for user in annotators]
    choices: Counter = Counter()
    finished: set[int] = set()
    while len(finished) < len(clients):
        for number, client in enumerate(clients):
            if number in finished:
                continue
            task = client.get(f"/api/v1/projects/{project.slug}/next-task/")
            if task.status_code == 204:
                finished.add(number)
                continue
            assert task.status_code == 200, task.content
            body = task.json()
            a, b = (completion["text"] for completion in body["completions"])
            choice = preference.better(a, b)
            submission = {"task_id": body["task_id"], "client_uuid": str(uuid.uuid4()), "kind": "pairwise"}
            submission["choice"] = choice
            while True:
                sent = client.post(f"/api/v1/projects/{project.slug}/judgements/", submission, format="json")
                if sent.status_code != 429:
                    break
                time.sleep(float(sent.headers.get("Retry-After", 1)))  # a person would slow down too
            assert sent.status_code in (200, 201), sent.content
            choices[choice] += 1
    return choices


def perplexity(model_dir: str) -> float:
    import torch

    from training.models import load_model

    model, tokenizer = load_model(model_dir, dtype=torch.float32)
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for text in NEUTRAL_TEXTS:
            ids = torch.tensor([tokenizer(text)["input_ids"]])  # (1, T)
            loss = model(input_ids=ids, labels=ids).loss  # mean over the T - 1 predicted tokens
            nll += float(loss) * (ids.shape[1] - 1)
            tokens += ids.shape[1] - 1
    return math.exp(nll / tokens)


def repeated(text: str) -> bool:
    words = text.lower().split()
    grams = Counter(zip(words, words[1:], words[2:], strict=False))
    return any(count >= 3 for count in grams.values())


def held_out_answers(model: str, conversations: list[list[dict[str, str]]], samples: int) -> list[list[str]]:
    """Each held-out prompt's ``samples`` answers, the project's sampling settings and the same seeds for every
    model. Drawn 10 a prompt at a time (the first 10 with SEED, the next with SEED + 1, ...), so that no batch
    is larger than the 200 rows the default draws in one, and the first 10 are the same whatever ``samples`` is."""
    from feedback.services.generation import answers_sample

    texts = []
    for chunk, start in enumerate(range(0, samples, 10)):
        written = answers_sample(
            model=model,
            conversations=conversations * min(10, samples - start),
            temperature=0.8,
            top_p=0.95,
            max_new_tokens=MAX_NEW_TOKENS,
            seed=SEED + chunk,
        )
        texts += [text for text, _ in written]
    return [texts[i :: len(conversations)] for i in range(len(conversations))]


def mean_se(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return mean, se


def wilson(accuracy: float | None, n: int, z: float = 1.96) -> str:
    if accuracy is None or not n:
        return "n/a"
    centre = (accuracy + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(accuracy * (1 - accuracy) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return f"{100 * accuracy:.1f}% [{100 * (centre - half):.1f}, {100 * (centre + half):.1f}]"


def rise_p_value(base: int, new: int, n: int) -> float:
    """One-sided Fisher exact test on two counts out of ``n`` answers each: the chance, were both models
    equally likely to write such an answer, that the new one has ``new`` of the ``base + new`` or more."""
    total = base + new
    return sum(math.comb(n, k) * math.comb(n, total - k) for k in range(new, min(n, total) + 1)) / math.comb(
        2 * n, total
    )


def guard(counts: tuple[int, int], n: int) -> str:
    base, new = counts
    return f"{base} -> {new} of {n} (p {rise_p_value(base, new, n):.2f})"


def train_and_promote(project: Any, config: dict[str, Any]) -> tuple[Any, Any]:
    from feedback.models import TrainingRun
    from feedback.services.model_versions import model_version_promote
    from feedback.services.training_runs import training_run_execute, training_run_start

    run = training_run_start(project=project, config=config, trigger=TrainingRun.Trigger.COMMAND, enqueue=False)
    run = training_run_execute(run_id=run.pk)
    assert run.status == "succeeded", run.error
    version = run.produced_version
    model_version_promote(version=version, generate=False)
    return run, version


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--preferences", default=",".join(PREFERENCES), help="comma-separated, of: " + ", ".join(PREFERENCES)
    )
    parser.add_argument("--rounds", type=int, default=1, help="rounds of judgements and training (1 to 5)")
    parser.add_argument("--prompts", type=int, default=50, help="training prompts (K = 4: 6 pairs each)")
    parser.add_argument("--held-out", type=int, default=20, help="prompts the runs never see, for the measurement")
    parser.add_argument("--samples", type=int, default=10, help="answers per held-out prompt and model")
    parser.add_argument("--config", type=json.loads, default={}, help="training settings over the defaults (JSON)")
    args = parser.parse_args()
    chosen = [name.strip() for name in args.preferences.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in PREFERENCES]
    if unknown or not chosen:
        parser.error(f"--preferences: unknown {unknown}; use some of {', '.join(PREFERENCES)}")
    for name, value, low, high in (("rounds", args.rounds, 1, 5), ("prompts", args.prompts, 2, 1000),
                                   ("held-out", args.held_out, 2, 1000), ("samples", args.samples, 1, 50)):  # fmt: skip
        if not low <= value <= high:
            parser.error(f"--{name} must be between {low} and {high}, not {value}")
    if not isinstance(args.config, dict):
        parser.error("--config must be a JSON object of setting names and values")
    if not (DEFAULT_MODEL / "config.json").is_file():
        sys.exit("the default model is missing: run `python manage.py fetch_default_model` first")

    with tempfile.TemporaryDirectory() as scratch:
        setup_django(Path(scratch))
        run_benchmark(args, chosen)


def run_benchmark(args: argparse.Namespace, chosen: list[str]) -> None:
    from django.contrib.auth import get_user_model
    from huey.contrib.djhuey import HUEY

    from feedback.models import Completion, Membership, Project
    from feedback.selectors.models import model_version_weights_dir
    from feedback.services.generation import completions_generate, round_write
    from feedback.services.rounds import round_request

    HUEY.immediate = False  # the worker's work is done here, stage by stage
    started = time.perf_counter()
    users = get_user_model().objects
    staff = users.create(username="manager", is_staff=True)
    train_prompts = prompts_for(args.prompts, 0)
    held_out = [[{"role": "user", "content": text}] for text in prompts_for(args.held_out, args.prompts)]
    print(
        f"# efficacy: {len(train_prompts)} training prompts x {K}, {args.held_out} held-out x {args.samples}",
        flush=True,
    )

    base_answers = held_out_answers(str(DEFAULT_MODEL), held_out, args.samples)
    base_ppl = perplexity(str(DEFAULT_MODEL))
    print(
        f"base model: held-out answers and perplexity {base_ppl:.2f} ({time.perf_counter() - started:.0f} s)",
        flush=True,
    )

    first_round: list[dict[str, Any]] = []
    results = []
    for name in chosen:
        preference = PREFERENCES[name]
        t0 = time.perf_counter()
        project = Project.objects.create(
            name=name, slug=name.replace("_", "-"), mode="pairwise", completions_per_prompt=K,
            base_model=str(DEFAULT_MODEL), max_new_tokens=MAX_NEW_TOKENS,
        )  # fmt: skip
        annotators = [users.create(username=f"{name}-{i}") for i in range(2)]
        for user in annotators:
            Membership.objects.create(project=project, user=user, role=Membership.Role.ANNOTATOR)
        Membership.objects.create(project=project, user=staff, role=Membership.Role.MANAGER)
        # The base model answers once; the later projects import the same answers.
        records = first_round or [{"prompt": text} for text in train_prompts]
        imported = api_client(staff).post(
            f"/api/v1/projects/{project.slug}/prompts/", {"records": records}, format="json"
        )
        assert imported.status_code == 201, imported.content
        if not first_round:
            completions_generate(project=project, k=K)
            for prompt in project.prompts.order_by("id"):
                written = [{"text": c.text, "model": "base"} for c in Completion.objects.filter(prompt=prompt)]
                first_round.append({"prompt": prompt.messages[-1]["content"], "completions": written})
        print(f"[{name}] round 1 written ({time.perf_counter() - t0:.0f} s)", flush=True)

        judged: Counter = Counter()
        runs = []
        for number in range(1, args.rounds + 1):
            if number > 1:  # the promoted version answers the same prompts again
                again = round_request(project=project, prompts=len(train_prompts))
                round_write(round_id=again.pk)
            judged += judge_all(project, annotators, preference)
            run, version = train_and_promote(project, args.config)
            runs.append(run)
            print(f"[{name}] round {number}: {sum(judged.values())} judgements {dict(judged)}, "
                  f"run {run.pk} made {version.name} ({time.perf_counter() - t0:.0f} s)", flush=True)  # fmt: skip
            # Measured after every round, so one run with rounds gives the figures after one round too.
            weights = str(model_version_weights_dir(version=version))
            answers = held_out_answers(weights, held_out, args.samples)
            row = report_row(name, preference, base_answers, answers, judged, runs, base_ppl, perplexity(weights))
            results.append({**row, "round": number})
            print(f"[{name}] round {number} measured ({time.perf_counter() - t0:.0f} s): "
                  f"{json.dumps(results[-1], default=str)}", flush=True)  # fmt: skip

    print_results(args, results, time.perf_counter() - started)


def report_row(
    name: str,
    preference: Preference,
    base_answers: list[list[str]],
    answers: list[list[str]],
    judged: Counter,
    runs: list[Any],
    base_ppl: float,
    ppl: float,
) -> dict[str, Any]:
    base_by_prompt = [statistics.fmean(preference.measure(t) for t in texts) for texts in base_answers]
    new_by_prompt = [statistics.fmean(preference.measure(t) for t in texts) for texts in answers]
    base_mean, base_se = mean_se(base_by_prompt)
    new_mean, new_se = mean_se(new_by_prompt)
    change, change_se = mean_se([n - b for n, b in zip(new_by_prompt, base_by_prompt, strict=True)])
    room = preference.extreme - base_mean
    progress = 100 * change / room if room else float("nan")
    judgements = sum(judged.values())
    flat = [t for texts in answers for t in texts]
    base_flat = [t for texts in base_answers for t in texts]
    return {
        "name": name,
        "unit": preference.unit,
        "base": (base_mean, base_se),
        "new": (new_mean, new_se),
        "change": (change, change_se),
        "progress": progress,
        "progress_se": 100 * change_se / abs(room) if room else float("nan"),
        "judgements": judgements,
        "trained_pairs": judged["a"] + judged["b"],
        "per_10_points": judgements / (progress / 10) if progress > 0 else None,
        "ppl": (base_ppl, ppl),
        "answers": len(flat),
        "empty": (sum(not t for t in base_flat), sum(not t for t in flat)),
        "repeated": (sum(map(repeated, base_flat)), sum(map(repeated, flat))),
        "runs": [
            {
                "data": run.data_counts,
                "labels": label_check(run, preference),
                "before": run.produced_version.metrics.get("eval_before") or {},
                "after": run.produced_version.metrics.get("eval_after") or {},
            }
            for run in runs
        ],
    }


def label_check(run: Any, preference: Preference) -> dict[str, Any]:
    """How the run's snapshot rows agree with the judge: (agree, flipped, tie) for train and held-out, and the
    held-out prompts. A fault in how pairs are built would show as flipped rows."""
    from feedback.services.training_runs import run_dir

    found: dict[str, Any] = {}
    for part in ("train", "held_out"):
        rows = [json.loads(line) for line in (run_dir(run) / f"{part}.jsonl").read_text().splitlines() if line]
        verdicts = Counter(preference.better(row["chosen"], row["rejected"]) for row in rows)
        found[part] = (verdicts["a"], verdicts["b"], verdicts["tie"])
        found[f"{part}_prompts"] = len({row["prompt_id"] for row in rows})
    return found


def print_results(args: argparse.Namespace, results: list[dict[str, Any]], seconds: float) -> None:
    print(f"\n{args.rounds} round(s), {args.prompts} training prompts x {K} (at most {MAX_NEW_TOKENS} new tokens), "
          f"{args.held_out} held-out prompts x {args.samples} answers per model, training settings "
          f"{json.dumps(args.config) if args.config else 'the defaults'}; {seconds / 60:.1f} min\n")  # fmt: skip
    print(
        "| preference (property) | rounds | base model | new version | change (SE) | progress to extreme (SE) | "
        "judgements (trained pairs) | judgements per 10 points | perplexity base -> new | empty (p of a rise) | "
        "repeated (p of a rise) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in results:
        (bm, bs), (nm, ns), (c, cs) = row["base"], row["new"], row["change"]
        per = f"{row['per_10_points']:.0f}" if row["per_10_points"] else "no progress"
        print(
            f"| {row['name']} ({row['unit']}) | {row['round']} | {bm:.3f} ± {bs:.3f} | {nm:.3f} ± {ns:.3f} | "
            f"{c:+.3f} ± {cs:.3f} | "
            f"{row['progress']:+.1f} % ± {row['progress_se']:.1f} | {row['judgements']} ({row['trained_pairs']}) | "
            f"{per} | {row['ppl'][0]:.2f} -> {row['ppl'][1]:.2f} | "
            f"{guard(row['empty'], row['answers'])} | {guard(row['repeated'], row['answers'])} |"
        )
    print("\nThe runs' own held-out figures (95 % Wilson intervals; pairs of the run's held-out prompts):\n")
    print(
        "| preference | run | held-out pairs (prompts) | labels agreeing with the judge: train, held-out "
        "| logp_accuracy before -> after | per token before -> after | implicit-reward accuracy after |"
    )
    print("|---|---:|---:|---|---|---|---|")
    for row in results:
        if row["round"] != args.rounds:
            continue  # a preference's last row holds all its runs
        for number, run in enumerate(row["runs"], start=1):
            before, after = run["before"], run["after"]
            n = after.get("pairs") or 0
            labels = run["labels"]
            agree = ", ".join(f"{a}/{a + b + t}" for a, b, t in (labels["train"], labels["held_out"]))
            print(
                f"| {row['name']} | {number} | {n} ({labels['held_out_prompts']}) | {agree} | "
                f"{wilson(before.get('logp_accuracy'), n)} -> "
                f"{wilson(after.get('logp_accuracy'), n)} | {wilson(before.get('logp_accuracy_per_token'), n)} -> "
                f"{wilson(after.get('logp_accuracy_per_token'), n)} | {wilson(after.get('accuracy'), n)} |"
            )


if __name__ == "__main__":
    main()
