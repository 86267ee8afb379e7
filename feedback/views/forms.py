"""Parsing the annotate page's plain form posts into the arguments of the services.

The forms only check shapes (numbers, UUIDs); the rules (a ranking covers the task, the
task is leased to you, ...) live in the services so the page and the API agree.
"""

from __future__ import annotations

from typing import Any

from django import forms

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
