"""Parsing the pages' plain form posts into the arguments of the services and selectors.

The forms only check shapes (numbers, UUIDs, choices); the rules (a ranking covers the task,
the task is leased to you, which export options go together, ...) live in the services and
selectors so the pages and the API agree.
"""

from __future__ import annotations

from datetime import datetime, time, timedelta
from typing import Any, cast

from django import forms
from django.contrib.auth import get_user_model
from django.utils import timezone

from feedback.models import ModelVersion, Project
from feedback.selectors.preferences import FORMATS, PAIR_MODES, WEIGHTINGS, PreferenceExportOptions

RANK_PREFIX = "rank-"


class JudgementForm(forms.Form):
    task_id = forms.IntegerField(min_value=1)
    client_uuid = forms.UUIDField()
    choice = forms.CharField(required=False)
    strength = forms.CharField(required=False)
    rationale = forms.CharField(required=False, strip=True)
    time_ms = forms.IntegerField(required=False)

    def clean(self) -> dict[str, Any]:
        """Collect ``rank-<completion id>`` fields into groups, best first; equal ranks are ties."""
        super().clean()
        cleaned = self.cleaned_data
        ranks: dict[int, int] = {}
        for name, value in self.data.items():
            if not name.startswith(RANK_PREFIX):
                continue
            try:
                completion_id, rank = int(name.removeprefix(RANK_PREFIX)), int(value)
            except (TypeError, ValueError):
                self.add_error(None, f"'{value}' is not a rank: give each completion a number, 1 for the best.")
                continue
            if rank < 1:
                self.add_error(None, "Ranks start at 1 for the best completion.")
                continue
            ranks[completion_id] = rank
        cleaned["ranking"] = (
            [[c for c, r in ranks.items() if r == rank] for rank in sorted(set(ranks.values()))] if ranks else None
        )
        return cleaned


class SkipForm(forms.Form):
    task_id = forms.IntegerField(min_value=1)
    reason = forms.CharField(required=False, strip=True)


class ExportForm(forms.Form):
    """The export page's options, named as the API's (but for whole days: created_from to created_until)."""

    format = forms.ChoiceField(choices=[(f, f) for f in FORMATS], initial="dpo")
    pairs = forms.ChoiceField(
        choices=[(m, m.replace("_", " ")) for m in PAIR_MODES], initial="all", help_text="dpo: pairs from rankings"
    )
    conversational = forms.BooleanField(required=False, help_text="message lists instead of strings")
    min_agreement = forms.FloatField(min_value=0, max_value=1, initial=0, help_text="dpo: leave out pairs below this")
    weighting = forms.ChoiceField(
        choices=[(w, w) for w in WEIGHTINGS],
        initial="reliability",
        required=False,
        help_text="dpo: a vote counts its annotator's reliability, or one (raw)",
    )
    created_from = forms.DateField(required=False, help_text="judgements from this day")
    created_until = forms.DateField(required=False, help_text="to this day, inclusive")
    annotators = forms.ModelMultipleChoiceField(queryset=get_user_model().objects.none(), required=False)
    model_versions = forms.ModelMultipleChoiceField(queryset=ModelVersion.objects.none(), required=False)
    split = forms.ChoiceField(
        choices=[
            ("", "all training prompts"),
            ("train", "train"),
            ("test", "test"),
            ("eval", "evaluation prompts (analysis, never training)"),
        ],
        required=False,
    )
    test_fraction = forms.FloatField(min_value=0.001, max_value=0.999, initial=0.1)
    pseudonymise = forms.BooleanField(required=False, help_text="judgements: pseudonyms instead of user ids")
    gold = forms.BooleanField(required=False, help_text="also the gold items (prompts with a known answer)")
    reward_scores = forms.BooleanField(required=False, help_text="each completion's score by the newest reward model")

    def __init__(self, *args: Any, project: Project, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        annotators = cast(forms.ModelMultipleChoiceField, self.fields["annotators"])
        annotators.queryset = get_user_model().objects.filter(memberships__project=project)
        versions = cast(forms.ModelMultipleChoiceField, self.fields["model_versions"])
        versions.queryset = project.model_versions.all()

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean() or {}
        start, end = cleaned.get("created_from"), cleaned.get("created_until")
        if start and end and start > end:
            self.add_error("created_until", "must not be before the first day")
        return cleaned

    def options(self) -> PreferenceExportOptions:
        """The cleaned options; the days become the moments from the first day's start to the last day's end."""
        data = dict(self.cleaned_data)
        start, end = data.pop("created_from"), data.pop("created_until")
        zone = timezone.get_current_timezone()
        return PreferenceExportOptions.from_mapping(
            {
                **data,
                "created_from": datetime.combine(start, time.min, tzinfo=zone) if start else None,
                "created_before": datetime.combine(end, time.min, tzinfo=zone) + timedelta(days=1) if end else None,
                "annotators": [user.pk for user in data["annotators"]],
                "model_versions": [version.pk for version in data["model_versions"]],
            }
        )
