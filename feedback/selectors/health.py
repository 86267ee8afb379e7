"""What `GET /healthz` reports: whether each part a request or a job needs is there and answering."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

from django.conf import settings
from django.db import connection
from huey.contrib.djhuey import HUEY


def _database() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")


def _queue() -> None:
    HUEY.pending_count()  # one round trip to the queue's storage (Redis or the SQLite file)


def _data_dir() -> None:
    if not Path(settings.DATA_DIR).is_dir():
        raise FileNotFoundError(f"{settings.DATA_DIR} is not a directory")
    # The worker writes model versions, exports and caches here: creating a file is the honest test.
    with tempfile.NamedTemporaryFile(dir=settings.DATA_DIR, prefix=".healthz-"):
        pass


def _model() -> None:
    """The base model must load without the network: a model directory, or a hub id already in the local cache."""
    name = str(settings.BASE_MODEL)
    path = Path(name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} has no config.json")
        if not any(path.glob("*.safetensors")):
            raise FileNotFoundError(f"{path} has no .safetensors weights")
        return
    if path.is_absolute() or name.startswith("."):
        raise FileNotFoundError(f"{path} does not exist (run `python manage.py fetch_default_model`)")
    from huggingface_hub import try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(name, "config.json"), str):
        raise FileNotFoundError(f"{name} is neither a model directory nor in the local Hugging Face cache")


CHECKS: dict[str, Callable[[], None]] = {"database": _database, "queue": _queue, "data_dir": _data_dir, "model": _model}


def health_report() -> dict[str, str]:
    """Each part -> "ok", or "failed: " and the reason in one line."""
    report = {}
    for part, check in CHECKS.items():
        try:
            check()
        except Exception as error:  # any failure of a part is the answer, not a crash of the health check
            reason = (str(error).strip().splitlines() or [""])[0] or type(error).__name__
            report[part] = f"failed: {reason}"
        else:
            report[part] = "ok"
    return report
