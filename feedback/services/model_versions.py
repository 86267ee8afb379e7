from django.db import transaction

from feedback.models import ModelVersion, Project
from feedback.queue import enqueue


class ModelVersionError(Exception):
    """A version that cannot be promoted; the message says why."""


def model_version_promote(*, version: ModelVersion, generate: bool = True) -> ModelVersion:
    """Make this the project's active version (the one that writes new completions).

    A reward model scores completions and never writes them, so it is never promoted.

    Rolling back is promoting an earlier version. When `generate` is on, the worker writes
    the next round: completions for the prompts that lack them, half from the new active
    version and half from the model it was trained from, so people compare the two.
    """
    if version.kind == ModelVersion.Kind.REWARD:
        raise ModelVersionError(f"{version.name} is a reward model: it scores completions and is never promoted")
    with transaction.atomic():
        # Promotions of one project take turns on its row. Without the lock, two at once on PostgreSQL each
        # deactivate what was active when they began, and the second to commit breaks one_active_version_per_project.
        Project.objects.select_for_update().filter(pk=version.project_id).first()
        ModelVersion.objects.filter(project_id=version.project_id, is_active=True).exclude(pk=version.pk).update(
            is_active=False
        )
        ModelVersion.objects.filter(pk=version.pk).update(is_active=True)
        if generate:
            enqueue("generate_completions_task", version.project_id, mix_previous=True)
    version.refresh_from_db()
    return version
