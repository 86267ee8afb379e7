"""Locks that several workers share: one worker's start-up or tick never frees a lock another still holds."""

import time

import pytest
from django.core.cache import cache
from django.utils import timezone
from huey.contrib.djhuey import HUEY

from feedback import tasks
from feedback.models import TrainingRun
from feedback.queue import release_dead_generations
from tests.factories import ProjectFactory, TrainingRunFactory

pytestmark = pytest.mark.django_db


def hold(name: str) -> None:
    """Take a lock as a task of another worker would, and leave it held."""
    HUEY.lock_task(name).acquire()


def test_a_worker_starting_leaves_a_generation_under_way_locked():
    project = ProjectFactory()
    hold(f"generation-project-{project.pk}")
    cache.set(f"generation-heartbeat-project-{project.pk}", time.time(), timeout=None)
    tasks.release_dead_runs_on_startup()
    assert HUEY.is_locked(f"generation-project-{project.pk}")


def test_the_schedule_tick_frees_training_locks_of_idle_projects_only():
    busy, idle = ProjectFactory(), ProjectFactory()
    TrainingRunFactory(project=busy, status=TrainingRun.Status.RUNNING, heartbeat_at=timezone.now())
    hold(f"training-project-{busy.pk}")
    hold(f"training-project-{idle.pk}")  # left by a worker killed after its run ended
    hold(f"generation-project-{busy.pk}")  # this process has named it, as a worker that generated before has
    cache.set(f"generation-heartbeat-project-{busy.pk}", time.time(), timeout=None)
    tasks.training_schedule_task.call_local()
    assert not HUEY.is_locked(f"training-project-{idle.pk}")
    assert HUEY.is_locked(f"training-project-{busy.pk}")
    assert HUEY.is_locked(f"generation-project-{busy.pk}")


def test_a_generation_lock_whose_heartbeat_went_stale_is_freed(settings):
    settings.TRAINING_RUN_STALE_SECONDS = 60
    project = ProjectFactory()
    hold(f"generation-project-{project.pk}")
    cache.set(f"generation-heartbeat-project-{project.pk}", time.time() - 61, timeout=None)
    tasks.training_schedule_task.call_local()
    assert not HUEY.is_locked(f"generation-project-{project.pk}")
    assert cache.get(f"generation-heartbeat-project-{project.pk}") is None


def test_a_generation_lock_without_a_heartbeat_gets_one_and_is_freed_once_it_is_stale(settings):
    settings.TRAINING_RUN_STALE_SECONDS = 60
    project = ProjectFactory()
    hold(f"generation-project-{project.pk}")  # a worker killed before its first heartbeat
    release_dead_generations()
    assert HUEY.is_locked(f"generation-project-{project.pk}")
    started = cache.get(f"generation-heartbeat-project-{project.pk}")
    assert started is not None
    cache.set(f"generation-heartbeat-project-{project.pk}", started - 61, timeout=None)  # the clock runs out
    release_dead_generations()
    assert not HUEY.is_locked(f"generation-project-{project.pk}")
