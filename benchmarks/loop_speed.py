"""One turn of the closed loop with the default model, timed by stage.

200 pairwise judgements -> training run (DPO, LoRA, project defaults) -> model version ->
promotion -> 20 prompts x 4 new completions from the new version. Before the promotion,
20 more judgements (10% new data) and a second run over all of it show the reference
log-prob cache at work: with the same reference model, only the new pairs need a reference
forward pass. (A run after a promotion starts from the new version, which is then its
reference, so its reference log-probs are all new.)

Usage: python benchmarks/loop_speed.py [--pairs 200] [--generate 20]
Runs in a temporary data dir with its own SQLite database; needs the default model
(`python manage.py fetch_default_model`).
"""

import argparse
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DEFAULT_MODEL = ROOT / "var" / "models" / "SmolLM2-135M-Instruct"

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
GOOD = "Here is a clear answer to {q} It depends on a few well-known facts, explained step by step."
BAD = "I don't know."


def setup_django(data_dir: Path) -> None:
    os.environ["RANKWISE_DATA_DIR"] = str(data_dir)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)


def add_judgements(project, annotator, start: int, count: int) -> None:
    from feedback.models import Completion, PairwiseJudgement, Prompt, Round
    from feedback.rendering import markdown_to_safe_html

    # the judged completions come as one finished round of imported ones
    imported, _ = Round.objects.get_or_create(
        project=project,
        number=1,
        defaults={"status": Round.Status.DONE, "strategy": Round.Strategy.IMPORTED, "writers": ["bench"]},
    )
    for i in range(start, start + count):
        question = f"{QUESTIONS[i % len(QUESTIONS)]} (case {i})"
        prompt = Prompt.objects.create(project=project, messages=[{"role": "user", "content": question}])
        # K = 4 completions a prompt, as in the project; one pair of them is judged
        good, bad, *_ = (
            Completion.objects.create(
                prompt=prompt, round=imported, text=t, html=markdown_to_safe_html(t), source_model="bench"
            )
            for t in (GOOD.format(q=question), BAD, BAD + " Sorry.", "Maybe.")
        )
        left, right = (good, bad) if i % 2 else (bad, good)
        PairwiseJudgement.objects.create(
            project=project,
            annotator=annotator,
            prompt=prompt,
            left=left,
            right=right,
            round=imported,
            item_key=f"c{min(good.pk, bad.pk)}-{max(good.pk, bad.pk)}",
            choice="a" if left == good else "b",
            client_uuid=uuid.uuid4(),
        )


def timed_run(project) -> tuple[float, object]:
    from feedback.models import TrainingRun
    from feedback.services.training_runs import training_run_execute, training_run_start

    started = time.perf_counter()
    run = training_run_start(project=project, trigger=TrainingRun.Trigger.COMMAND)
    snapshot = time.perf_counter() - started
    run = training_run_execute(run_id=run.pk)
    assert run.status == "succeeded", run.error
    return snapshot, run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pairs", type=int, default=200)
    parser.add_argument("--generate", type=int, default=20)
    args = parser.parse_args()
    if not (DEFAULT_MODEL / "config.json").is_file():
        sys.exit("the default model is missing: run `python manage.py fetch_default_model` first")
    with tempfile.TemporaryDirectory() as scratch:
        setup_django(Path(scratch))
        from django.contrib.auth import get_user_model
        from huey.contrib.djhuey import HUEY

        from feedback.models import Project, Prompt
        from feedback.services.generation import completions_generate
        from feedback.services.model_versions import model_version_promote

        HUEY.immediate = False  # stages are run and timed here, not in a worker
        annotator = get_user_model().objects.create(username="bench")
        project = Project.objects.create(
            name="Loop",
            slug="loop",
            mode="pairwise",
            completions_per_prompt=4,
            base_model=str(DEFAULT_MODEL),
            max_new_tokens=64,
        )
        add_judgements(project, annotator, 0, args.pairs)

        snapshot, run = timed_run(project)
        version = run.produced_version
        metrics = version.metrics

        # The next periodic run before anything is promoted: same reference model, so the
        # reference log-probs of the pairs seen before come from the cache.
        add_judgements(project, annotator, args.pairs, args.pairs // 10)
        snapshot2, second = timed_run(project)
        m2 = second.produced_version.metrics

        model_version_promote(version=version, generate=False)
        for i in range(args.generate):
            Prompt.objects.create(project=project, messages=[{"role": "user", "content": f"{QUESTIONS[i % 8]} ({i})"}])
        started = time.perf_counter()
        generated = completions_generate(project=project, k=4)
        generation = time.perf_counter() - started

        def line(name: str, seconds: float) -> str:
            return f"| {name} | {seconds:.1f} s |"

        print("| stage | wall time |\n|---|---|")
        print(
            line(f"snapshot {run.data_counts['train']} + {run.data_counts['held_out']} pairs, queue the run", snapshot)
        )
        print(line(f"reference log-probs ({metrics['reference_computed']} sequences)", metrics["reference_seconds"]))
        print(
            line(
                f"training ({metrics['steps']} steps, {metrics['tokens_per_second']:.0f} tokens/s)",
                metrics["train_seconds"],
            )
        )
        print(line("whole run, incl. model load, evaluation and saving", metrics["seconds"]))
        print(line(f"generation: {generated.prompts} prompts x 4 completions, 64 new tokens max", generation))
        print(
            line(
                f"second run: snapshot ({second.data_counts['train']} + {second.data_counts['held_out']} pairs)",
                snapshot2,
            )
        )
        print(
            line(
                f"second run: reference log-probs ({m2['reference_computed']} new, {m2['reference_cached']} cached)",
                m2["reference_seconds"],
            )
        )
        print(line("second run: whole run", m2["seconds"]))
        before, after = metrics["eval_before"]["logp_accuracy"], metrics["eval_after"]["logp_accuracy"]
        implicit = metrics["eval_after"]["accuracy"]
        print(
            f"\nheld-out accuracy of the first run (chosen answer more likely), parent -> trained: "
            f"{before:.2f} -> {after:.2f}; implicit-reward accuracy after training {implicit:.2f}"
        )


if __name__ == "__main__":
    main()
