from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser

from feedback.management.arguments import named_errors
from feedback.management.commands.generate import round_write_here
from feedback.models import Project
from feedback.services.rounds import MIN_BATTLE_PROMPTS, battle_request, round_enqueue

OPTIONS = {"candidate": "--candidate", "against": "--against", "prompts": "--prompts", "round": "evaluate"}


class Command(BaseCommand):
    help = (
        "Start a blind battle: the candidate version and its opponent each answer the project's evaluation "
        "prompts once, and annotators judge the pairs without knowing who wrote which (queued unless --sync)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("project", help="project slug")
        parser.add_argument("--candidate", required=True, help="a version name of the project")
        parser.add_argument(
            "--against", help="a version name, or 'base' (default: the active version, else the base model)"
        )
        parser.add_argument(
            "--prompts",
            type=int,
            help=f"battle on the first N evaluation prompts, at least {MIN_BATTLE_PROMPTS} (default: all of them)",
        )
        parser.add_argument("--sync", action="store_true", help="write the answers here and wait instead of queueing")

    def handle(
        self,
        *args: Any,
        project: str,
        candidate: str,
        against: str | None,
        prompts: int | None,
        sync: bool,
        **opts: Any,
    ) -> None:
        target = Project.objects.filter(slug=project).first()
        if target is None:
            raise CommandError(f"no project '{project}'")
        try:
            battle = battle_request(project=target, candidate=candidate, against=against, prompts=prompts)
        except ValidationError as error:
            raise CommandError(named_errors(error, OPTIONS)) from None
        one, other = battle.writers
        if not sync:
            round_enqueue(round=battle)
            self.stdout.write(
                f"Queued battle round {battle.number} of '{target.slug}': {one} against {other}; the worker writes "
                "the answers, then annotators judge them blind."
            )
            return
        round_write_here(self, target=target, requested=battle)
        self.stdout.write(f"Battle {one} against {other} is ready for annotators; see the leaderboard as they judge.")
