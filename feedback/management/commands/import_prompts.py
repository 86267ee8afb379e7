import sys
from pathlib import Path
from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import transaction
from tqdm import tqdm

from feedback.services.projects import project_get_or_create
from feedback.services.prompts import PromptImportError, prompts_import_csv, prompts_import_jsonl


class Command(BaseCommand):
    help = "Import prompts (and optional completions) from a JSONL or CSV file into a project, all or nothing."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("project", help="project slug; the project is created when it is new")
        parser.add_argument("file", type=Path, help="a .jsonl or .csv file")
        parser.add_argument("--mode", choices=["pairwise", "ranking"], help="annotation mode of a new project")
        parser.add_argument("--k", type=int, help="completions per prompt of a new project (2-16)")

    def handle(self, *args: Any, project: str, file: Path, mode: str | None, k: int | None, **options: Any) -> None:
        suffix = file.suffix.lower()
        if suffix not in (".jsonl", ".csv"):
            raise CommandError(f"{file}: expected a .jsonl or .csv file")
        if not file.is_file():
            raise CommandError(f"{file}: no such file")
        show_progress = sys.stdout.isatty()
        try:
            with (
                file.open("rb") as binary,
                tqdm(desc="writing", unit=" prompts", disable=not show_progress) as written,
                transaction.atomic(),
            ):
                target, created = project_get_or_create(slug=project, mode=mode, k=k)
                lines = tqdm(binary, desc="reading", unit=" lines", disable=not show_progress)
                if suffix == ".csv":
                    text = (raw.decode("utf-8") for raw in lines)
                    result = prompts_import_csv(project=target, lines=text, progress=written.update)
                else:
                    result = prompts_import_jsonl(project=target, lines=lines, progress=written.update)
        except PromptImportError as error:
            more = f"\n  ... and {error.more} more" if error.more else ""
            problems = "\n  ".join(str(p) for p in error.problems)
            raise CommandError(f"{file}: nothing was imported.\n  {problems}{more}") from None
        except ValidationError as error:
            raise CommandError("; ".join(error.messages)) from None
        except UnicodeDecodeError:
            raise CommandError(f"{file}: not UTF-8 text; nothing was imported") from None
        except OSError as error:
            raise CommandError(f"{file}: {error.strerror}") from None
        what = "created project" if created else "project"
        self.stdout.write(
            self.style.SUCCESS(
                f"Imported {result.prompts} prompts and {result.completions} completions into {what} '{target.slug}'."
            )
        )
