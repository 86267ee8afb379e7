from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser

from feedback.models import Project
from feedback.services.annotators import annotator_exclude, annotator_include


class Command(BaseCommand):
    help = (
        "Leave an annotator's judgements out of a project's exports, training snapshots and battles (--exclude), "
        "or count them again (--include). Nothing is deleted."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("project", help="project slug")
        parser.add_argument("username", help="the annotator")
        which = parser.add_mutually_exclusive_group(required=True)
        which.add_argument("--exclude", action="store_true", help="leave their judgements out")
        which.add_argument("--include", action="store_true", help="count their judgements again")
        parser.add_argument("--reason", default="", help="why, kept with the exclusion")

    def handle(
        self, *args: Any, project: str, username: str, exclude: bool, include: bool, reason: str, **opts: Any
    ) -> None:
        target = Project.objects.filter(slug=project).first()
        if target is None:
            raise CommandError(f"no project '{project}'")
        try:
            if exclude:
                changed = annotator_exclude(project=target, username=username, reason=reason)
            else:
                changed = annotator_include(project=target, username=username)
        except ValidationError as error:
            raise CommandError(" ".join(error.messages)) from None
        if exclude:
            what = "are now left out of" if changed else "were already left out of"
        else:
            what = "count again in" if changed else "already counted in"
        self.stdout.write(f"{username}'s judgements {what} '{target.slug}''s exports, training and battles.")
