import json
import sys
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from tqdm import tqdm

from feedback.models import Project, TrainingRun
from feedback.services.training_runs import TrainingRunError, training_run_execute, training_run_start

# Options shared with `python -m training`, mapped to config fields.
OPTIONS = {
    "lr": ("learning_rate", float),
    "epochs": ("epochs", int),
    "beta": ("beta", float),
    "batch_size": ("batch_size", int),
    "max_length": ("max_length", int),
    "loss_type": ("loss_type", str),
    "seed": ("seed", int),
}


class Command(BaseCommand):
    help = "Start a training run on a project's judgements: queued for the worker, or here with --sync."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("project", help="project slug")
        parser.add_argument("--algorithm", choices=["dpo", "grpo"], help="default: the project's setting")
        parser.add_argument("--sync", action="store_true", help="train here and wait, with a progress bar")
        parser.add_argument("--lr", type=float, help="peak learning rate")
        parser.add_argument("--epochs", type=int, help="passes over the training data")
        parser.add_argument("--beta", type=float, help="KL strength (DPO beta, GRPO KL coefficient)")
        parser.add_argument("--batch-size", type=int, help="examples per forward pass")
        parser.add_argument("--max-length", type=int, help="prompt + completion tokens")
        parser.add_argument("--loss-type", help="dpo: sigmoid|ipo|hinge|robust; grpo: grpo|dapo|dr_grpo")
        parser.add_argument("--seed", type=int, help="random seed")
        lora = parser.add_mutually_exclusive_group()
        lora.add_argument("--lora", dest="lora", action="store_true", default=None, help="train LoRA adapters")
        lora.add_argument("--full", dest="lora", action="store_false", help="full fine-tuning")
        parser.add_argument(
            "--config", type=json.loads, default={}, help="more settings as JSON, e.g. '{\"warmup_ratio\": 0}'"
        )

    def handle(self, *args: Any, project: str, algorithm: str | None, sync: bool, **options: Any) -> None:
        target = Project.objects.filter(slug=project).first()
        if target is None:
            raise CommandError(f"no project '{project}'")
        config = dict(options["config"]) if isinstance(options["config"], dict) else None
        if config is None:
            raise CommandError("--config must be a JSON object")
        for option, (name, _) in OPTIONS.items():
            if options.get(option) is not None:
                config[name] = options[option]
        if options.get("lora") is not None:
            config["lora"] = options["lora"]
        try:
            run = training_run_start(
                project=target, algorithm=algorithm, config=config, trigger=TrainingRun.Trigger.COMMAND
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
        before = version.metrics.get("eval_before", {}).get("accuracy")
        after = version.metrics.get("eval_after", {}).get("accuracy")
        self.stdout.write(
            self.style.SUCCESS(
                f"Run {run.pk} succeeded: model version {version.name} in {version.weights_path}; "
                f"held-out preference accuracy {_pct(before)} -> {_pct(after)}."
            )
        )


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"
