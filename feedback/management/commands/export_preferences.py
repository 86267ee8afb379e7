"""python manage.py export_preferences PROJECT --format dpo|grpo|judgements --out FILE.jsonl|FILE.parquet"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone
from tqdm import tqdm

from feedback.management.arguments import round_numbers, writer_names
from feedback.models import ModelVersion, Project
from feedback.selectors.preferences import (
    FORMATS,
    PAIR_MODES,
    SPLITS,
    WEIGHTINGS,
    ExportOptionsError,
    PreferenceExportOptions,
)
from feedback.services.exports import ExportError, export_file_type, export_write_file


def _moment(value: str) -> datetime:
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an ISO date or date-time (2026-01-31[T12:00])") from None
    return timezone.make_aware(moment) if timezone.is_naive(moment) else moment


def _fraction(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None


class Command(BaseCommand):
    help = "Export a project's preference data (DESIGN.md 'Formats') to a JSONL or Parquet file."
    # A read-only export: skipping the system checks saves importing every view to check the URLconf first.
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("project", help="project slug")
        parser.add_argument("--format", required=True, choices=FORMATS, dest="export_format")
        parser.add_argument("--out", required=True, type=Path, help="FILE.jsonl or FILE.parquet")
        parser.add_argument(
            "--conversational", action="store_true", help="message lists instead of strings (TRL conversational)"
        )
        parser.add_argument("--pairs", choices=PAIR_MODES, default="all", help="pairs derived from rankings (dpo)")
        parser.add_argument("--min-agreement", type=_fraction, default=0.0, help="leave out pairs below this (dpo)")
        parser.add_argument(
            "--weighting",
            choices=WEIGHTINGS,
            default="reliability",
            help="what a vote counts (dpo): its annotator's reliability, or one (raw)",
        )
        parser.add_argument("--since", type=_moment, help="judgements created at or after this date")
        parser.add_argument("--until", type=_moment, help="judgements created before this date")
        parser.add_argument("--annotator", action="append", default=[], help="username; repeat for several")
        parser.add_argument("--model-version", action="append", default=[], help="version name; repeat for several")
        parser.add_argument("--rounds", type=round_numbers, help="only these rounds, e.g. 2,3 (default: every round)")
        parser.add_argument("--since-round", type=int, help="only this round and later ones")
        parser.add_argument(
            "--writers",
            type=writer_names,
            help="only completions by these writers: version names or base, e.g. v3,base",
        )
        parser.add_argument(
            "--split",
            choices=SPLITS,
            help="write only the train or the test part of the training prompts (split by prompt), or eval: "
            "the evaluation prompts alone, for analysis (default: every training prompt)",
        )
        parser.add_argument("--test-fraction", type=_fraction, default=0.1, help="share of prompts in the test part")
        parser.add_argument("--split-seed", default="rankwise", help="changes which prompts are in the test part")
        parser.add_argument("--pseudonymise", action="store_true", help="judgements: HMAC pseudonyms for annotators")
        parser.add_argument(
            "--gold", action="store_true", help="also the gold items (prompts with a known answer), left out by default"
        )
        parser.add_argument(
            "--reward-scores", action="store_true", help="each completion's score by the newest reward model"
        )

    def handle(self, *args: Any, **opts: Any) -> None:
        out: Path = opts["out"]
        try:
            export_file_type(path=out)
        except ExportError as error:
            raise CommandError(str(error)) from None
        project = Project.objects.filter(slug=opts["project"]).first()
        if project is None:
            raise CommandError(f"no project with the slug {opts['project']!r}")
        if opts["since"] and opts["until"] and opts["since"] >= opts["until"]:
            raise CommandError("--until must be later than --since")
        try:
            options = PreferenceExportOptions.from_mapping(
                {
                    "format": opts["export_format"],
                    "conversational": opts["conversational"],
                    "pairs": opts["pairs"],
                    "min_agreement": opts["min_agreement"],
                    "weighting": opts["weighting"],
                    "created_from": opts["since"],
                    "created_before": opts["until"],
                    "annotators": self._annotator_ids(opts["annotator"]),
                    "model_versions": self._version_ids(project, opts["model_version"]),
                    "rounds": opts["rounds"],
                    "since_round": opts["since_round"],
                    "writers": self._writers(project, opts["writers"]),
                    "split": opts["split"],
                    "test_fraction": opts["test_fraction"],
                    "split_seed": opts["split_seed"],
                    "pseudonymise": opts["pseudonymise"],
                    "gold": opts["gold"],
                    "reward_scores": opts["reward_scores"],
                }
            )
        except ExportOptionsError as error:
            raise CommandError(f"--{error.field.replace('_', '-')}: {error.message}") from None

        show_progress = self.stdout.isatty()
        with tqdm(total=project.prompts.count(), unit="prompt", disable=not show_progress, file=sys.stderr) as progress:
            try:
                on_prompt = progress.update if show_progress else None
                rows = export_write_file(project=project, options=options, path=out, on_prompt=on_prompt)
            except ExportError as error:
                raise CommandError(str(error)) from None
            except OSError as error:
                raise CommandError(f"{out}: {error.strerror or error}") from None
        self.stdout.write(f"{rows} {options.format} rows from {project.slug} written to {out}")

    def _annotator_ids(self, usernames: list[str]) -> list[int]:
        found = dict(get_user_model().objects.filter(username__in=usernames).values_list("username", "id"))
        missing = [name for name in usernames if name not in found]
        if missing:
            raise CommandError(f"--annotator: no user named {', '.join(map(repr, missing))}")
        return [found[name] for name in usernames]

    def _writers(self, project: Project, writers: list[str] | None) -> list[str] | None:
        if writers is None:
            return None
        known = set(ModelVersion.objects.filter(project=project, name__in=writers).values_list("name", flat=True))
        missing = [name for name in writers if name != "base" and name not in known]
        if missing:
            raise CommandError(f"--writers: {project.slug} has no version {', '.join(map(repr, missing))}")
        return writers

    def _version_ids(self, project: Project, names: list[str]) -> list[int]:
        found = dict(ModelVersion.objects.filter(project=project, name__in=names).values_list("name", "id"))
        missing = [name for name in names if name not in found]
        if missing:
            raise CommandError(f"--model-version: {project.slug} has no version {', '.join(map(repr, missing))}")
        return [found[name] for name in names]
