"""Side-by-side answers after a run: a few held-out prompts answered by the parent and by the new version.

A manager reads them before promoting, to see what the run changed in what the model writes. They
are written by the worker once a run has recorded a policy version (``side_by_side_task``), from the
project's evaluation prompts when it has any, else from the prompts held out of the run's snapshot,
with the project's sampling settings and one seed for both models. They live in the version's
``metrics["side_by_side"]``: ``status`` (``queued``, ``writing``, ``done``, ``failed``), ``error``,
``parent`` (a version name, or ``base``), ``source`` (``eval`` or ``held_out``), ``sampling`` and
``pairs`` (``prompt_id``, ``messages``, ``parent_text``, ``candidate_text``, ``parent_truncated``,
``candidate_truncated``). A failure is recorded there; the run stays succeeded.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import transaction

from feedback.models import ModelVersion, Prompt
from feedback.queue import enqueue
from feedback.selectors.models import model_version_weights_dir
from feedback.services.generation import GenerationError, answers_sample
from feedback.services.rounds import BASE

logger = logging.getLogger(__name__)

SIDE_BY_SIDE_PROMPTS = 5  # enough to see a change, few enough to read before promoting
SIDE_BY_SIDE_SEED = 0
OPEN = ("queued", "writing")


def side_by_side_request(*, version: ModelVersion) -> None:
    """Mark a new policy version's side-by-side answers as queued and queue their writing once this commits.

    A reward model writes nothing, so it gets none.
    """
    if version.kind != ModelVersion.Kind.POLICY:
        return
    _store(version, {"status": "queued"})
    enqueue("side_by_side_task", version.pk)


def side_by_side_prompts(*, version: ModelVersion) -> tuple[str, list[Prompt]]:
    """The prompts to answer and where they come from: ``eval`` or ``held_out``, lowest ids first.

    Evaluation prompts never reach training data, so they are the project's first choice. Without
    them, the prompts of the run's held-out part (its snapshot's ``held_out.jsonl``), which the run did
    not train on either.
    """
    project = version.project
    evaluation = list(project.prompts.filter(split=Prompt.Split.EVAL).order_by("id")[:SIDE_BY_SIDE_PROMPTS])
    if evaluation:
        return "eval", evaluation
    held_out = sorted(_held_out_prompt_ids(version))[:SIDE_BY_SIDE_PROMPTS]
    return "held_out", list(project.prompts.filter(pk__in=held_out).order_by("id"))


def _held_out_prompt_ids(version: ModelVersion) -> set[int]:
    # Imported here: training_runs queues this service's work, so this module cannot import it at the top.
    from feedback.services.training_runs import run_dir

    if version.produced_by_run is None:
        return set()
    path = Path(run_dir(version.produced_by_run)) / "held_out.jsonl"
    if not path.is_file():
        return set()
    with path.open() as lines:
        return {int(json.loads(line)["prompt_id"]) for line in lines if line.strip()}


def side_by_side_write(*, version_id: int) -> dict[str, Any] | None:
    """Write a version's side-by-side answers here and now; returns what is stored (None: no such policy).

    Answers already written are kept as they are (``train --sync`` writes them itself, and a worker may
    take the queued task later); anything else (queued, failed, or left writing by a killed worker) is
    written again, the same prompts with the same seed. Any error is stored as the reason, with its type
    when it is not one of generation's own messages.
    """
    version = ModelVersion.objects.select_related("project", "parent", "produced_by_run").filter(pk=version_id).first()
    if version is None or version.kind != ModelVersion.Kind.POLICY:
        return None
    written = version.metrics.get("side_by_side")
    if isinstance(written, dict) and written.get("status") == "done":
        return written
    project = version.project
    sampling: dict[str, Any] = {
        "temperature": project.temperature,
        "top_p": project.top_p,
        "max_new_tokens": project.max_new_tokens,
        "seed": SIDE_BY_SIDE_SEED,
    }
    parent_name = version.parent.name if version.parent else BASE
    entry: dict[str, Any] = {"status": "writing", "parent": parent_name, "sampling": sampling, "pairs": []}
    _store(version, entry)
    try:
        source, prompts = side_by_side_prompts(version=version)
        entry["source"] = source
        if prompts:
            conversations = [prompt.messages for prompt in prompts]
            parent_model = (
                str(model_version_weights_dir(version=version.parent))
                if version.parent
                else project.base_model or settings.BASE_MODEL
            )
            before = answers_sample(model=parent_model, conversations=conversations, **sampling)
            after = answers_sample(
                model=str(model_version_weights_dir(version=version)), conversations=conversations, **sampling
            )
            entry["pairs"] = [
                {
                    "prompt_id": prompt.pk,
                    "messages": prompt.messages,
                    "parent_text": parent_text,
                    "parent_truncated": parent_cut,
                    "candidate_text": candidate_text,
                    "candidate_truncated": candidate_cut,
                }
                for prompt, (parent_text, parent_cut), (candidate_text, candidate_cut) in zip(
                    prompts, before, after, strict=True
                )
            ]
        entry["status"] = "done"
    except (GenerationError, ValueError) as error:  # ValueError: a weights path outside the versions folder
        entry.update(status="failed", error=str(error), pairs=[])
    except Exception as error:  # recorded for the manager; the worker goes on
        logger.exception("Side-by-side answers of %s failed", version)
        entry.update(status="failed", error=f"{type(error).__name__}: {error}", pairs=[])
    _store(version, entry)
    return entry


def _store(version: ModelVersion, entry: dict[str, Any]) -> None:
    """Put ``entry`` in the version's metrics as ``side_by_side``, leaving every other figure as it is now."""
    with transaction.atomic():
        locked = ModelVersion.objects.select_for_update().get(pk=version.pk)
        locked.metrics = {**locked.metrics, "side_by_side": entry}
        locked.save(update_fields=["metrics"])
    version.metrics = locked.metrics
