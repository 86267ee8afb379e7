from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from feedback.services.demo import DEMO_FIRST_ROUND, demo_first_round_write


class Command(BaseCommand):
    help = (
        "Write the demo's shipped first round (feedback/demo/first_round.jsonl): the default model's own "
        "completions for a few demo prompts, sampled with the demo's settings and a fixed seed."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--prompts", type=int, default=8, help="How many demo prompts, taken from each topic in turn."
        )
        parser.add_argument("--seed", type=int, default=0, help="The sampling seed.")
        parser.add_argument("--out", type=Path, default=DEMO_FIRST_ROUND, help="Where to write the file.")

    def handle(self, *args: Any, **options: Any) -> None:
        model: Path = settings.DEFAULT_MODEL_DIR  # the writer the file names; no other model is shipped as it
        if not (model / "config.json").is_file():
            raise CommandError(f"no model at {model}; run `python manage.py fetch_default_model` first")
        if options["prompts"] < 1:
            raise CommandError("--prompts must be at least 1")
        written = demo_first_round_write(
            model_dir=model, prompts=options["prompts"], seed=options["seed"], path=options["out"]
        )
        self.stdout.write(self.style.SUCCESS(f"Wrote {written} prompts with their completions to {options['out']}."))
