import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.factories import UserFactory

PASSWORD = "correct horse battery staple"
REAL_MODEL_DIR = Path(__file__).resolve().parents[1] / "var/models/SmolLM2-135M-Instruct"


@pytest.fixture(autouse=True)
def _data_dir(settings, tmp_path: Path) -> Path:
    """Every test writes model versions, exports and caches under its own temporary data dir."""
    settings.DATA_DIR = tmp_path / "data"
    settings.MODEL_VERSIONS_DIR = settings.DATA_DIR / "versions"
    settings.EXPORTS_DIR = settings.DATA_DIR / "exports"
    settings.REFERENCE_CACHE_DIR = settings.DATA_DIR / "reference-cache"
    settings.DATA_DIR.mkdir(parents=True)
    return settings.DATA_DIR


@pytest.fixture(autouse=True)
def _own_cache(settings, tmp_path: Path) -> None:
    """Every test counts rate limits and failed logins in a cache of its own (files, as in production)."""
    backend = "django.core.cache.backends.filebased.FileBasedCache"
    settings.CACHES = {"default": {"BACKEND": backend, "LOCATION": str(tmp_path / "cache")}}


@pytest.fixture(autouse=True)
def _fast_password_hashing(settings) -> None:
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def staff_user(db):
    return UserFactory(username="staff", is_staff=True, is_superuser=True)


@pytest.fixture
def annotator(db):
    return UserFactory(username="annotator")


@pytest.fixture(autouse=True)
def huey_immediate():
    """Run huey tasks in the calling thread as they are enqueued (and never touch the real queue)."""
    from huey.contrib.djhuey import HUEY

    HUEY.immediate = True
    yield HUEY
    HUEY.immediate = False


class QueueRecorder:
    """What the services queued for the worker, in order, instead of running it."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
        self._workers: dict[str, Callable[..., Any]] = {}

    def args(self, task: str) -> list[tuple[Any, ...]]:
        """The positional arguments of each queued call of one task."""
        return [args for name, args, _ in self.sent if name == task]

    def run_with(self, task: str, worker: Callable[..., Any]) -> None:
        """Hand every later call of this task to ``worker`` as well as recording it."""
        self._workers[task] = worker

    def _send(self, task: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.sent.append((task, args, kwargs))
        if task in self._workers:
            self._workers[task](*args, **kwargs)


@pytest.fixture
def queue(monkeypatch) -> QueueRecorder:
    """Tasks the services queue (on commit, as in production) are recorded, not run."""
    recorder = QueueRecorder()
    monkeypatch.setattr("feedback.queue._send", recorder._send)
    return recorder


@pytest.fixture
def shared_queue():
    """With REDIS_URL, workers that tests start share one Redis queue: each such test starts and ends it empty
    (tasks, results and locks). On huey's SQLite queue each test's data dir has a queue of its own."""
    from django.conf import settings
    from huey import RedisHuey

    queue = RedisHuey(settings.HUEY["name"], url=settings.REDIS_URL) if settings.REDIS_URL else None
    if queue is not None:
        queue.storage.flush_all()
    yield queue
    if queue is not None:
        queue.storage.flush_all()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama with a tokenizer and chat template, as a model directory."""
    from tests.tiny_model import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture
def real_model_dir() -> Path:
    """The default model as `make test` fetches it (or RANKWISE_BASE_MODEL)."""
    path = Path(os.environ.get("RANKWISE_BASE_MODEL", REAL_MODEL_DIR))
    if not (path / "config.json").is_file():
        pytest.skip(f"the default model is not at {path} (run `python manage.py fetch_default_model`)")
    return path


def pytest_collection_modifyitems(config, items) -> None:
    """Skip `sqlite_only(reason)` tests on other databases, with the reason the marker gives, and `gpu` tests
    where torch sees no GPU."""
    _skip_gpu_tests_without_cuda(items)
    from django.conf import settings

    engine = settings.DATABASES["default"]["ENGINE"]
    if engine == "django.db.backends.sqlite3":
        return
    for item in items:
        marker = item.get_closest_marker("sqlite_only")
        if marker is not None:
            item.add_marker(pytest.mark.skip(reason=f"SQLite only ({marker.args[0]}); this run is on {engine}"))


def _skip_gpu_tests_without_cuda(items) -> None:
    gpu = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu:
        return
    import torch  # only when a gpu test was collected

    if torch.cuda.is_available():
        return
    for item in gpu:
        item.add_marker(pytest.mark.skip(reason="needs CUDA: torch sees no GPU here"))
