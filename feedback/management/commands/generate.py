import sys
from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser
from huey.exceptions import TaskLockedException
from tqdm import tqdm

from feedback.management.arguments import named_errors
from feedback.models import Project, Round
from feedback.queue import enqueue, generation_writing, rounds_left_running
from feedback.services.generation import GenerationError, completions_generate, round_write
from feedback.services.rounds import (
    MAX_ROUND_PROMPTS,
    STRATEGIES,
    round_enqueue,
    round_request,
    round_writers_mix,
)

OPTIONS = {"prompts": "--prompts", "strategy": "--strategy", "versions": "--versions", "k": "--k", "round": "--round"}


class Command(BaseCommand):
    help = (
        "Sample K completions for the prompts of a project that have none, or with --round for the prompts a "
        "strategy chooses (queued for the worker unless --sync)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("project", help="project slug")
        parser.add_argument(
            "--round", action="store_true", help="a new round over prompts that may have been answered before"
        )
        parser.add_argument("--prompts", type=int, help="at most this many prompts (default: all)")
        parser.add_argument(
            "--strategy", help=f"with --round, how prompts are chosen: {', '.join(STRATEGIES)} (default: the first)"
        )
        parser.add_argument(
            "--versions",
            help="comma-separated writers: version names of the project, or 'base' (default: the active version)",
        )
        parser.add_argument("--k", type=int, help="completions per prompt (default: the project's K)")
        parser.add_argument(
            "--mix", action="store_true", help="half from the active version, half from the model it was trained from"
        )
        parser.add_argument("--sync", action="store_true", help="generate here and wait instead of queueing")

    def handle(
        self,
        *args: Any,
        project: str,
        round: bool,
        prompts: int | None,
        strategy: str | None,
        versions: str | None,
        k: int | None,
        mix: bool,
        sync: bool,
        **opts: Any,
    ) -> None:
        target = Project.objects.filter(slug=project).first()
        if target is None:
            raise CommandError(f"no project '{project}'")
        if prompts is not None and prompts < 1:
            raise CommandError(f"--prompts must be at least 1, not {prompts}")
        if prompts is not None and prompts > MAX_ROUND_PROMPTS:
            raise CommandError(f"--prompts must be at most {MAX_ROUND_PROMPTS}, not {prompts}")
        if k is not None and not 1 <= k <= 16:
            raise CommandError(f"--k must be between 1 and 16, not {k}")
        if mix and versions is not None:
            raise CommandError("--mix names the writers (the active version and its parent); leave out --versions")
        if not round:
            if strategy is not None or versions is not None:
                raise CommandError("--strategy and --versions choose a new round's prompts and writers; add --round")
            self._fill(target, prompts=prompts, k=k, mix=mix, sync=sync)
            return
        if versions is not None:
            writers: list[str] | None = [name.strip() for name in versions.split(",")]
        else:
            writers = round_writers_mix(project=target) if mix else None
        try:
            requested = round_request(
                project=target,
                prompts=prompts,
                strategy=strategy or Round.Strategy.OLDEST_ROUND_FIRST,
                writers=writers,
                k=k,
            )
        except ValidationError as error:
            left = rounds_left_running([target.pk]) if sync and "round" in error.message_dict else []
            if not left:
                raise CommandError(named_errors(error, OPTIONS)) from None
            requested = left[0]  # its writer stopped: finish it here, then a new round can be asked for
            self.stdout.write(f"Round {requested.number} was left unfinished; writing the rest of it here.")
        if not sync:
            round_enqueue(round=requested)
            self.stdout.write(
                f"Queued round {requested.number} of '{target.slug}' by {' + '.join(requested.writers)}; "
                "the worker writes its completions."
            )
            return
        round_write_here(self, target=target, requested=requested)

    def _fill(self, target: Project, *, prompts: int | None, k: int | None, mix: bool, sync: bool) -> None:
        if not sync:
            enqueue("generate_completions_task", target.pk, prompts, k, mix)
            self.stdout.write(f"Queued generation for '{target.slug}'; the worker writes the completions.")
            return
        with _Bar() as bar:
            try:
                with generation_writing(target.pk, progress=bar) as progress:
                    result = completions_generate(
                        project=target, prompt_limit=prompts, k=k, mix_previous=mix, progress=progress
                    )
            except GenerationError as error:
                raise CommandError(str(error)) from None
            except TaskLockedException:
                raise CommandError(f"A worker is writing completions for '{target.slug}'; try again later.") from None
        self.stdout.write(
            self.style.SUCCESS(
                f"Wrote {result.completions} completions for {result.prompts} prompts with {result.model}."
            )
        )


def round_write_here(command: BaseCommand, *, target: Project, requested: Round) -> None:
    """Write a queued round in this process, with a progress bar on a terminal; a worker busy with the
    project's completions gets the round queued instead (a CommandError says so)."""
    with _Bar() as bar:
        try:
            with generation_writing(target.pk, progress=bar) as progress:
                result = round_write(round_id=requested.pk, progress=progress)
        except GenerationError as error:
            raise CommandError(str(error)) from None
        except TaskLockedException:
            round_enqueue(round=requested)
            raise CommandError(
                f"A worker is writing completions for '{target.slug}'; round {requested.number} is queued for it."
            ) from None
    command.stdout.write(
        command.style.SUCCESS(
            f"Round {requested.number}: wrote {result.completions} completions for {result.prompts} prompts "
            f"with {result.model}."
        )
    )


class _Bar:
    """A tqdm bar on a terminal, fed with (done, total) prompts."""

    def __enter__(self) -> Any:
        self.bar = tqdm(desc="prompts", unit=" prompts", disable=not sys.stdout.isatty())

        def progress(done: int, total: int) -> None:
            self.bar.total = total
            self.bar.update(done - self.bar.n)

        return progress

    def __exit__(self, *exc: object) -> None:
        self.bar.close()
