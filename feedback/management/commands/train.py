import argparse
import json
import sys
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from tqdm import tqdm

from feedback.management.arguments import round_numbers, writer_names
from feedback.models import ModelVersion, Project, TrainingRun
from feedback.selectors.models import accuracy_interval
from feedback.selectors.preferences import WEIGHTINGS
from feedback.services.side_by_side import side_by_side_write
from feedback.services.training_runs import (
    ALGORITHMS,
    TrainingRunError,
    training_run_execute,
    training_run_start,
)
from training.config import add_config_arguments, config_options

# The same options as `python -m training`, with their help, from the algorithms' configs.
CONFIG_OPTIONS = config_options(*(algorithm.config_class for algorithm in ALGORITHMS.values()))


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"not JSON ({error})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object of setting names and values")
    return value


class Command(BaseCommand):
    help = "Start a training run on a project's judgements: queued for the worker, or here with --sync."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("project", help="project slug")
        parser.add_argument("--algorithm", choices=list(ALGORITHMS), help="default: the project's setting")
        parser.add_argument(
            "--sync", action="store_true", help="train here and wait, with a progress bar (never queued for a worker)"
        )
        add_config_arguments(parser, CONFIG_OPTIONS, show_defaults=False)
        parser.add_argument(
            "--config", type=_json_object, default={}, help="more settings as JSON, e.g. '{\"warmup_ratio\": 0}'"
        )
        parser.add_argument("--rounds", type=round_numbers, help="train only on these rounds, e.g. 2,3 (default: all)")
        parser.add_argument("--since-round", type=int, help="train only on this round and later ones")
        parser.add_argument(
            "--writers", type=writer_names, help="train only on completions by these writers: version names or base"
        )
        parser.add_argument(
            "--weighting",
            choices=WEIGHTINGS,
            help="what a vote counts when DPO pairs are labelled: its annotator's reliability, or one (raw); "
            "default: the project's setting",
        )

    def handle(
        self,
        *args: Any,
        project: str,
        algorithm: str | None,
        sync: bool,
        rounds: list[int] | None,
        since_round: int | None,
        writers: list[str] | None,
        weighting: str | None,
        **options: Any,
    ) -> None:
        target = Project.objects.filter(slug=project).first()
        if target is None:
            raise CommandError(f"no project '{project}'")
        given = {o.name: options[o.name] for o in CONFIG_OPTIONS if options.get(o.name) is not None}
        try:
            run = training_run_start(
                project=target,
                algorithm=algorithm,
                config={**options["config"], **given},
                trigger=TrainingRun.Trigger.COMMAND,
                limits={"rounds": rounds, "since_round": since_round, "writers": writers},
                weighting=weighting,
                enqueue=not sync,
            )
        except TrainingRunError as error:
            raise CommandError(str(error)) from None
        counts = run.data_counts
        self.stdout.write(
            f"Run {run.pk} ({run.algorithm}): {counts['train']} training and {counts['held_out']} held-out rows."
        )
        if not sync:
            self.stdout.write("Queued; the worker trains it. Watch it on the project's training page.")
            return
        self._run_here(run)

    def _run_here(self, run: TrainingRun) -> None:
        bar = tqdm(desc="training", unit=" steps", disable=not sys.stdout.isatty())

        def show(step: int, total: int, metrics: dict) -> None:
            bar.total = total
            if "loss" in metrics:
                bar.set_postfix(loss=f"{metrics['loss']:.4f}")
            bar.update(step - bar.n)

        try:
            run = training_run_execute(run_id=run.pk, on_progress=show)
        finally:
            bar.close()
        if run.status != TrainingRun.Status.SUCCEEDED:
            raise CommandError(f"run {run.pk} {run.status}: {run.error}")
        version = run.produced_version
        eval_before, eval_after = version.metrics.get("eval_before", {}), version.metrics.get("eval_after", {})
        # a DPO or GRPO version: the chosen answer more likely, parent -> trained; a reward model: its own accuracy
        figure = "logp_accuracy" if "logp_accuracy" in eval_after else "accuracy"
        before, after = eval_before.get(figure), eval_after.get(figure)
        pairs = eval_after.get("pairs")
        self.stdout.write(
            self.style.SUCCESS(
                f"Run {run.pk} succeeded: model version {version.name} in {version.weights_path}; "
                f"held-out preference accuracy {_pct(before, pairs)} -> {_pct(after, pairs)}"
                + (f" on {pairs} pairs (95 % intervals; pairs of one prompt are not independent)." if pairs else ".")
            )
        )
        if version.kind == ModelVersion.Kind.POLICY:  # here too: there may be no worker to take the queued task
            self.stdout.write("Writing the parent's and the new version's answers side by side...")
            written = side_by_side_write(version_id=version.pk) or {}
            if written.get("status") == "done":
                self.stdout.write(f"{len(written['pairs'])} side-by-side answers: on the training page.")
            else:
                self.stdout.write(f"The side-by-side answers could not be written: {written.get('error')}")


def _pct(value: float | None, pairs: int | None) -> str:
    interval = accuracy_interval(accuracy=value, pairs=pairs)
    if value is None or interval is None:
        return "n/a"
    return f"{100 * value:.1f}% [{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]"
