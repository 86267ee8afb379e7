"""Handing work to the huey worker, for the services: by task name, after the transaction commits.

``feedback.tasks`` defines the tasks and imports the services that do the work, so the services
cannot import it back. They name the task instead; huey registers every task under
``<module>.<function>`` when ``feedback.tasks`` is imported, which the app does at start-up
(``FeedbackConfig.ready``), and the worker resolves the same names from the queued messages.
The per-project locks live here too: the tasks and ``generate --sync`` take them, pages read them,
and the worker frees those a killed process left behind.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any, Literal

from django.conf import settings
from django.core.cache import cache
from django.db import transaction
from huey.contrib.djhuey import HUEY

from feedback.models import Project, Round

TaskName = Literal[
    "generate_completions_task",
    "round_write_task",
    "export_file_task",
    "training_run_task",
    "completion_scores_task",
    "quality_figures_task",
    "side_by_side_task",
    "promotion_gate_task",
]
TASKS_MODULE = "feedback.tasks"


def enqueue(task: TaskName, *args: Any, **kwargs: Any) -> None:
    """Queue ``feedback.tasks.<task>(*args, **kwargs)`` once the current transaction commits (at once outside one).

    A task queued inside a transaction that rolls back is never sent, and a worker never sees a
    row id before the row is committed.
    """
    transaction.on_commit(partial(_send, task, args, kwargs))


def _send(task: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    # huey has no public lookup by name; its registry is what the consumer itself uses.
    task_class = HUEY._registry.string_to_task(f"{TASKS_MODULE}.{task}")
    HUEY.enqueue(task_class(args=args, kwargs=kwargs))


def generation_lock_name(project_id: int) -> str:
    return f"generation-project-{project_id}"


def training_lock_name(project_id: int) -> str:
    return f"training-project-{project_id}"


def generation_running(project_id: int) -> bool:
    """Whether a worker is writing completions for the project now."""
    return HUEY.is_locked(generation_lock_name(project_id))


def _generation_heartbeat_key(project_id: int) -> str:
    return f"generation-heartbeat-project-{project_id}"


def _generation_beat(project_id: int) -> None:
    # In the shared cache (Redis, or files in the data dir), so every worker sees every heartbeat.
    cache.set(_generation_heartbeat_key(project_id), time.time(), timeout=None)


@contextmanager
def generation_writing(
    project_id: int, progress: Callable[[int, int], None] | None = None
) -> Iterator[Callable[[int, int], None]]:
    """Hold the project's generation lock, beating its heartbeat, while completions are written here.

    One generation per project at a time: the worker's tasks and `generate --sync` both write under
    it, so a round a live process is writing is never queued again by the schedule. Yields the
    progress callback to hand the writer (it beats, then calls ``progress``). Raises huey's
    TaskLockedException when another process holds the lock.
    """

    def beat(done: int, total: int) -> None:
        _generation_beat(project_id)
        if progress is not None:
            progress(done, total)

    with HUEY.lock_task(generation_lock_name(project_id)):
        _generation_beat(project_id)
        try:
            yield beat
        finally:
            cache.delete(_generation_heartbeat_key(project_id))


def release_dead_generations(project_ids: list[int] | None = None) -> None:
    """Free the generation lock of a project whose worker died: locked, with a heartbeat gone stale.

    A killed worker keeps its lock. Several workers share the locks, so one starting up must not free
    them all: a lock is freed only once no batch has beaten for TRAINING_RUN_STALE_SECONDS. A lock
    found without a heartbeat (taken a moment ago, or by a worker killed before its first beat)
    gets one now, which starts that clock. Every project's, or those of ``project_ids``.
    """
    stale_before = time.time() - settings.TRAINING_RUN_STALE_SECONDS
    if project_ids is None:
        project_ids = list(Project.objects.values_list("pk", flat=True))
    for project_id in project_ids:
        if not HUEY.is_locked(generation_lock_name(project_id)):
            continue
        beat = cache.get(_generation_heartbeat_key(project_id))
        if beat is None:
            cache.add(_generation_heartbeat_key(project_id), time.time(), timeout=None)
        elif beat < stale_before:
            release_lock(generation_lock_name(project_id))
            cache.delete(_generation_heartbeat_key(project_id))


def rounds_left_running(project_ids: list[int] | None = None) -> list[Round]:
    """Rounds marked running that no live process is writing: their project's generation lock is free.

    A stale lock (its holder killed) is freed first, so a round is found once its heartbeat has been
    silent for TRAINING_RUN_STALE_SECONDS. Writing such a round again resumes it from what it committed.
    """
    running = Round.objects.filter(status=Round.Status.RUNNING)
    if project_ids is not None:
        running = running.filter(project_id__in=project_ids)
    found = list(running.order_by("pk"))
    release_dead_generations(sorted({round.project_id for round in found}))
    return [round for round in found if not HUEY.is_locked(generation_lock_name(round.project_id))]


def release_lock(name: str) -> None:
    # Not HUEY.flush_locks(name): that also frees every lock this process has ever named, which with
    # several workers includes locks that another worker holds for a generation or a run under way.
    HUEY.lock_task(name).clear()
