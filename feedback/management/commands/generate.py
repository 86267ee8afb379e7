import sys
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from tqdm import tqdm

from feedback.models import Project
from feedback.services.generation import GenerationError, completions_generate
from feedback.tasks import generate_completions_task


class Command(BaseCommand):
    help = "Sample K completions for each prompt of a project that lacks them (queued for the worker unless --sync)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("project", help="project slug")
        parser.add_argument("--prompts", type=int, help="at most this many prompts")
        parser.add_argument("--k", type=int, help="completions per prompt (default: the project's K)")
        parser.add_argument(
            "--mix", action="store_true", help="half from the active version, half from the model it was trained from"
        )
        parser.add_argument("--sync", action="store_true", help="generate here and wait instead of queueing")

    def handle(
        self, *args: Any, project: str, prompts: int | None, k: int | None, mix: bool, sync: bool, **opts: Any
    ) -> None:
        target = Project.objects.filter(slug=project).first()
        if target is None:
            raise CommandError(f"no project '{project}'")
        if prompts is not None and prompts < 1:
            raise CommandError(f"--prompts must be positive, not {prompts}")
        if k is not None and not 1 <= k <= 16:
            raise CommandError(f"--k must be between 1 and 16, not {k}")
        if not sync:
            generate_completions_task(target.pk, prompts, k, mix)
            self.stdout.write(f"Queued generation for '{target.slug}'; the worker writes the completions.")
            return
        bar = tqdm(desc="prompts", unit=" prompts", disable=not sys.stdout.isatty())

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        try:
            result = completions_generate(
                project=target, prompt_limit=prompts, k=k, mix_previous=mix, progress=progress
            )
        except GenerationError as error:
            raise CommandError(str(error)) from None
        finally:
            bar.close()
        self.stdout.write(
            self.style.SUCCESS(
                f"Wrote {result.completions} completions for {result.prompts} prompts with {result.model}."
            )
        )
