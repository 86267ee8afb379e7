"""Handing work to the huey worker, for the services: by task name, after the transaction commits.

``feedback.tasks`` defines the tasks and imports the services that do the work, so the services
cannot import it back. They name the task instead; huey registers every task under
``<module>.<function>`` when ``feedback.tasks`` is imported, which the app does at start-up
(``FeedbackConfig.ready``), and the worker resolves the same names from the queued messages.
The per-project lock names live here too: the tasks take the locks, pages read them.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Literal

from django.db import transaction
from huey.contrib.djhuey import HUEY

TaskName = Literal[
    "generate_completions_task", "round_write_task", "export_file_task", "training_run_task", "completion_scores_task"
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
