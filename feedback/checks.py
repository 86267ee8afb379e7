"""System checks for a production start (`manage.py check --deploy`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.checks import Error, Tags, register


@register(Tags.staticfiles, deploy=True)
def static_files_collected(**kwargs: Any) -> list[Error]:
    """Without DEBUG, pages name their CSS and scripts from collectstatic's manifest: missing, every page is a 500."""
    if settings.DEBUG:
        return []
    manifest = Path(settings.STATIC_ROOT) / "staticfiles.json"
    if manifest.is_file():
        return []
    return [
        Error(
            f"Static files are not collected: {manifest} is missing, so every page would fail.",
            hint="Run `python manage.py collectstatic --noinput` (`make serve` does).",
            id="rankwise.E001",
        )
    ]
