"""A version's side-by-side answers (its parent's and its own on a few held-out prompts), for the page and the API.

The worker stores the texts (feedback/services/side_by_side.py); each is rendered here to sanitized HTML
the same way completions are, so no model output reaches a page unsanitised.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from feedback.models import ModelVersion
from feedback.rendering import markdown_to_safe_html

WRITING = ("queued", "writing")


@dataclass(frozen=True)
class SideBySidePair:
    prompt_id: int
    messages: list[dict[str, str]]
    parent_text: str
    parent_html: str
    parent_truncated: bool
    candidate_text: str
    candidate_html: str
    candidate_truncated: bool


@dataclass(frozen=True)
class SideBySide:
    version_id: int
    version: str  # the new version's name
    parent: str  # its parent's name, or "base"
    status: str  # queued, writing, done or failed
    error: str
    source: str  # "eval" (evaluation prompts), "held_out" (the run's held-out prompts), or "" before it is known
    sampling: dict[str, Any]
    pairs: list[SideBySidePair]

    @property
    def writing(self) -> bool:
        return self.status in WRITING


def side_by_side_read(*, version: ModelVersion) -> SideBySide | None:
    """The version's side-by-side answers as stored, with HTML; None when none were asked for.

    None for reward models, which write nothing, and for versions recorded before runs wrote them.
    """
    entry = version.metrics.get("side_by_side")
    if version.kind != ModelVersion.Kind.POLICY or not isinstance(entry, dict):
        return None
    pairs = [
        SideBySidePair(
            prompt_id=pair["prompt_id"],
            messages=pair["messages"],
            parent_text=pair["parent_text"],
            parent_html=markdown_to_safe_html(pair["parent_text"]),
            parent_truncated=bool(pair.get("parent_truncated")),
            candidate_text=pair["candidate_text"],
            candidate_html=markdown_to_safe_html(pair["candidate_text"]),
            candidate_truncated=bool(pair.get("candidate_truncated")),
        )
        for pair in entry.get("pairs") or []
    ]
    return SideBySide(
        version_id=version.pk,
        version=version.name,
        parent=entry.get("parent") or (version.parent.name if version.parent else "base"),
        status=str(entry.get("status", "queued")),
        error=str(entry.get("error", "")),
        source=str(entry.get("source", "")),
        sampling=dict(entry.get("sampling") or {}),
        pairs=pairs,
    )
