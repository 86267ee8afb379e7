"""Helpers for tests that start workers and commands in processes of their own."""

import signal
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

ROOT = Path(__file__).resolve().parents[1]


def database_url_for_subprocesses() -> str:
    """DATABASE_URL for a worker or command started by a test: the test database, on SQLite or PostgreSQL."""
    from django.db import connection

    db = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{db['NAME']}"
    credentials = f"{quote(db['USER'], safe='')}:{quote(db['PASSWORD'], safe='')}@" if db["USER"] else ""
    return f"postgres://{credentials}{db['HOST'] or 'localhost'}:{db['PORT'] or 5432}/{db['NAME']}"


def consumer_ready(pid: int) -> bool:
    """Whether the huey consumer in process ``pid`` has finished starting and will stop cleanly on a signal.

    Huey sets its signal handlers (SIGHUP among them, which Python leaves alone) last in its start,
    after its "consumer started" line; a SIGINT before that interrupts the start with a traceback.
    """
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    caught = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
    return bool(caught & (1 << (signal.SIGHUP - 1)))


class Consumer:
    """A huey consumer (`manage.py run_huey`) in a process of its own, logging to <data_dir>/<name>.log."""

    def __init__(self, name: str, env: dict[str, str], data_dir: Path):
        self.log_path = data_dir / f"{name}.log"
        self.name = name
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "manage.py", "run_huey", "--flush-locks"], cwd=ROOT, env=env, stdout=log, stderr=log
            )

    def ready(self) -> bool:
        return consumer_ready(self.process.pid)

    def log(self) -> str:
        return self.log_path.read_text()

    def ran(self, task_name: str) -> int:
        return self.log().count(f"Executing feedback.tasks.{task_name}:")
