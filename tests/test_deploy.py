"""deploy/: the systemd units are checked by systemd-analyze and their commands started here as systemd would
(there is no systemd to run them), with the environment the units give them: on PostgreSQL and Redis when the
suite runs with DATABASE_URL and REDIS_URL (`make test-services`), on SQLite and huey's SQLite queue otherwise."""

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.processes import consumer_ready

ROOT = Path(__file__).resolve().parents[1]
UNITS = ROOT / "deploy" / "systemd"
VENV_BIN = Path(sys.executable).parent


def unit_entries(name: str) -> list[tuple[str, str]]:
    """(key, value) pairs of a unit's [Service] section, in order; ExecStart may repeat (a oneshot)."""
    entries, section = [], ""
    for line in (UNITS / name).read_text().splitlines():
        line = line.strip()
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
        elif section == "Service" and "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            entries.append((key, value))
    return entries


def as_here(value: str) -> str:
    """The unit's paths as they are in this checkout (the units name /srv/rankwise)."""
    return value.replace("/srv/rankwise/.venv/bin/", f"{VENV_BIN}/").replace("/srv/rankwise", str(ROOT))


def unit_environment(name: str, overrides: dict[str, str]) -> dict[str, str]:
    """EnvironmentFile (the example stands in for /etc/rankwise/rankwise.env), then Environment=, then overrides.

    The example's REDIS_URL is dropped: the overrides give the suite's Redis, or none (huey's SQLite queue)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_URL", "REDIS_URL", "DJANGO_"))}
    for key, value in unit_entries(name):
        if key == "EnvironmentFile":
            assert value == "/etc/rankwise/rankwise.env"
            example = (ROOT / "deploy" / "rankwise.env.example").read_text().splitlines()
            env |= dict(line.split("=", 1) for line in example if line and not line.startswith("#"))
        elif key == "Environment":
            env |= dict(pair.split("=", 1) for pair in shlex.split(value))
    env.pop("REDIS_URL", None)
    return env | overrides


def commands(name: str) -> list[list[str]]:
    return [shlex.split(as_here(value)) for key, value in unit_entries(name) if key == "ExecStart"]


def working_directory(name: str) -> Path:
    return Path(as_here(dict(unit_entries(name))["WorkingDirectory"]))


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_the_units_pass_systemd_analyze_verify(tmp_path):
    here = tmp_path / "units"
    here.mkdir()
    for unit in UNITS.iterdir():
        text = as_here(unit.read_text()).replace("User=rankwise", "User=root").replace("Group=rankwise", "Group=root")
        (here / unit.name).write_text(text)
    done = subprocess.run(
        ["systemd-analyze", "verify", *sorted(str(p) for p in here.iterdir())], capture_output=True, text=True
    )
    assert (done.returncode, done.stderr) == (0, "")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get(url: str) -> tuple[int, str]:
    request = urllib.request.Request(url, headers={"Host": "rankwise.example.com"})
    opener = urllib.request.build_opener(NoRedirect)
    try:
        with opener.open(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers.get("Location") or error.read().decode()


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


@pytest.fixture
def deploy_database(tmp_path) -> Iterator[str]:
    """The units' DATABASE_URL: a new PostgreSQL database beside the suite's when it runs on PostgreSQL (dropped
    afterwards), else a SQLite file in the data dir."""
    server = os.environ.get("DATABASE_URL", "")
    if not server.startswith(("postgres://", "postgresql://")):
        yield f"sqlite:///{tmp_path / 'data' / 'rankwise.sqlite3'}"
        return
    import psycopg

    name = f"rankwise_deploy_{os.getpid()}"
    with psycopg.connect(server, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield server.rsplit("/", 1)[0] + "/" + name
    finally:
        with psycopg.connect(server, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_the_units_commands_migrate_then_serve_healthz_and_run_a_worker(
    tmp_path, tiny_model_dir, deploy_database, shared_queue
):
    from django.conf import settings

    port = free_port()
    services = {"REDIS_URL": settings.REDIS_URL} if settings.REDIS_URL else {}
    overrides = services | {
        "DATABASE_URL": deploy_database,
        "RANKWISE_DATA_DIR": str(tmp_path / "data"),
        "RANKWISE_BASE_MODEL": str(tiny_model_dir),
        "RANKWISE_BIND": f"127.0.0.1:{port}",
        "WEB_CONCURRENCY": "1",
        "SECRET_KEY": "k3Y-" * 16 + "x9!",
    }
    for command in commands("rankwise-migrate.service"):
        env = unit_environment("rankwise-migrate.service", overrides)
        done = subprocess.run(
            command, cwd=working_directory("rankwise-migrate.service"), env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, f"{command}: {done.stderr}"

    log = (tmp_path / "services.log").open("w")
    started = []
    for unit in ("rankwise-web.service", "rankwise-worker@.service"):
        (command,) = commands(unit)
        env = unit_environment(unit, overrides)
        started.append(
            subprocess.Popen(command, cwd=working_directory(unit), env=env, stdout=log, stderr=subprocess.STDOUT)
        )
    web, worker = started
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                status, body = get(f"http://127.0.0.1:{port}/healthz")
                break
            except OSError:
                assert web.poll() is None, (tmp_path / "services.log").read_text()
                assert time.monotonic() < deadline, "gunicorn did not start: " + (tmp_path / "services.log").read_text()
                time.sleep(0.3)
        assert (status, json.loads(body)) == (200, {"database": "ok", "queue": "ok", "data_dir": "ok", "model": "ok"})
        # Production settings: every other plain-HTTP request is sent to HTTPS.
        assert get(f"http://127.0.0.1:{port}/login/") == (301, "https://rankwise.example.com/login/")
        # Stop the worker only once it is up: a signal while it still starts ends it with a traceback.
        while not consumer_ready(worker.pid):
            assert worker.poll() is None, (tmp_path / "services.log").read_text()
            assert time.monotonic() < deadline, "the worker did not start: " + (tmp_path / "services.log").read_text()
            time.sleep(0.3)
    finally:
        for process, stop in ((web, signal.SIGTERM), (worker, signal.SIGINT)):  # each unit's KillSignal
            process.send_signal(stop)
        codes = [process.wait(timeout=60) for process in started]
        log.close()
    assert codes == [0, 0], (tmp_path / "services.log").read_text()
    # What answered was the database and queue named: no SQLite file stood in for either.
    made = sorted(path.name for path in (tmp_path / "data").glob("*.sqlite3"))
    assert made == ([] if services else ["huey.sqlite3", "rankwise.sqlite3"])
    if deploy_database.startswith("postgres"):
        import psycopg

        with psycopg.connect(deploy_database) as database:
            assert database.execute("SELECT count(*) FROM django_migrations").fetchone()[0] > 0
