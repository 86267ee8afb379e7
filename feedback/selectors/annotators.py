"""Which annotators' judgements a project leaves out (services/annotators.py excludes and includes them)."""

from __future__ import annotations

from django.db.models import QuerySet

from feedback.models import AnnotatorExclusion, Project


def excluded_annotator_ids(*, project: Project) -> QuerySet:
    """The ids of the project's excluded annotators, as a subquery for ``annotator_id__in``."""
    return AnnotatorExclusion.objects.filter(project=project).values("annotator_id")
