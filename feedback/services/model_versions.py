from django.db import transaction

from feedback.models import ModelVersion


def model_version_promote(*, version: ModelVersion, generate: bool = True) -> ModelVersion:
    """Make this the project's active version (the one that writes new completions).

    Rolling back is promoting an earlier version. When `generate` is on, the new active
    version writes completions for the prompts that lack them, in the worker.
    """
    from feedback.tasks import generate_completions_task

    with transaction.atomic():
        ModelVersion.objects.filter(project_id=version.project_id, is_active=True).exclude(pk=version.pk).update(
            is_active=False
        )
        ModelVersion.objects.filter(pk=version.pk).update(is_active=True)
        if generate:
            transaction.on_commit(lambda: generate_completions_task(version.project_id))
    version.refresh_from_db()
    return version
