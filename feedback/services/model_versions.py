import logging

from django.core.exceptions import ValidationError
from django.db import transaction

from feedback.models import ModelVersion, Project
from feedback.services.rounds import round_enqueue, round_request, round_writers_mix

logger = logging.getLogger(__name__)


class ModelVersionError(Exception):
    """A version that cannot be promoted; the message says why."""


def model_version_promote(*, version: ModelVersion, generate: bool = True) -> ModelVersion:
    """Make this the project's active version (the one that writes new completions).

    A reward model scores completions and never writes them, so it is never promoted.

    Rolling back is promoting an earlier version. When `generate` is on, the worker writes the
    next round over the project's round size (all prompts by default), half of each prompt's
    completions from the new active version and half from the model it was trained from, so
    people compare the two. While another round is being written none is queued (and that is logged).
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
        version.refresh_from_db()
        if generate:
            project = version.project
            try:
                round = round_request(
                    project=project, prompts=project.round_size, writers=round_writers_mix(project=project)
                )
            except ValidationError as error:
                logger.warning("No round queued after promoting %s: %s", version, " ".join(error.messages))
            else:
                round_enqueue(round=round)
    return version
