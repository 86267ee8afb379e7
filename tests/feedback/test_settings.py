import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from django.conf import settings
from django.db import connection

ROOT = Path(__file__).resolve().parents[2]
LONG_SECRET = "k3Y-" * 16


def run_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL", "DEBUG", "SECRET_KEY")}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env={**base, **env}, check=False
    )


@pytest.mark.sqlite_only("the WAL, transaction and busy-timeout settings are SQLite's")
def test_sqlite_runs_in_wal_mode_with_immediate_transactions(db):
    assert settings.DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3"
    assert settings.DATABASES["default"]["OPTIONS"]["transaction_mode"] == "IMMEDIATE"
    with connection.cursor() as cursor:
        cursor.execute("PRAGMA journal_mode")
        assert cursor.fetchone()[0] == "wal"
        cursor.execute("PRAGMA busy_timeout")
        assert cursor.fetchone()[0] >= 5000


SHOW = (
    "import django, os; os.environ['DJANGO_SETTINGS_MODULE']='config.settings'; from django.conf import settings; "
    "d = settings.DATABASES['default']; print(d['ENGINE'], d['NAME'], d.get('HOST') or '-', "
    "settings.HUEY['huey_class'], settings.HUEY.get('filename', settings.HUEY.get('url')))"
)


def test_defaults_are_sqlite_files_in_the_data_dir(tmp_path):
    done = run_python(SHOW, SECRET_KEY=LONG_SECRET, RANKWISE_DATA_DIR=str(tmp_path))
    engine, name, host, huey_class, huey_file = done.stdout.split()
    assert (engine, name, host) == ("django.db.backends.sqlite3", str(tmp_path / "rankwise.sqlite3"), "-")
    assert huey_class == "huey.SqliteHuey" and huey_file == str(tmp_path / "huey.sqlite3")


def test_database_url_and_redis_url_are_honoured(tmp_path):
    done = run_python(
        SHOW,
        SECRET_KEY=LONG_SECRET,
        RANKWISE_DATA_DIR=str(tmp_path),
        DATABASE_URL="postgres://rw:secret@db.internal:5432/rankwise",
        REDIS_URL="redis://cache.internal:6379/0",
    )
    assert done.stdout.split() == [
        "django.db.backends.postgresql",
        "rankwise",
        "db.internal",
        "huey.RedisHuey",
        "redis://cache.internal:6379/0",
    ]


def test_a_missing_secret_key_is_a_clear_error(tmp_path):
    done = run_python(SHOW, RANKWISE_DATA_DIR=str(tmp_path), RANKWISE_ENV_FILE=str(tmp_path / "none.env"))
    assert done.returncode != 0 and "SECRET_KEY is not set" in done.stderr


def manage(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """manage.py as `make serve` runs it: production settings from the environment only."""
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        env={
            # the browser tests allow sync database calls in async contexts, which deploy checks refuse
            **{
                k: v
                for k, v in os.environ.items()
                if k not in ("DATABASE_URL", "REDIS_URL", "DJANGO_ALLOW_ASYNC_UNSAFE", "DEBUG", "SECRET_KEY")
            },
            "DEBUG": "0",
            "SECRET_KEY": LONG_SECRET + "x9!",
            "ALLOWED_HOSTS": "rankwise.example.com",
            "RANKWISE_DATA_DIR": str(tmp_path),
            "RANKWISE_ENV_FILE": os.devnull,
            **env,
        },
    )


def test_deploy_checks_pass_for_production_settings_once_static_files_are_collected(tmp_path):
    assert manage(tmp_path, "collectstatic", "--noinput").returncode == 0
    done = manage(tmp_path, "check", "--deploy", "--fail-level", "WARNING")
    assert done.returncode == 0, done.stderr


def test_deploy_checks_fail_while_static_files_are_not_collected(tmp_path):
    done = manage(tmp_path, "check", "--deploy")
    assert done.returncode == 1
    assert "(rankwise.E001) Static files are not collected" in done.stderr
    assert "collectstatic --noinput" in done.stderr


SECURITY = (
    "import django, os; os.environ['DJANGO_SETTINGS_MODULE']='config.settings'; from django.conf import settings; "
    "print(getattr(settings, 'SECURE_PROXY_SSL_HEADER', None), settings.SECURE_HSTS_SECONDS, "
    "settings.SECURE_HSTS_INCLUDE_SUBDOMAINS, settings.SECURE_HSTS_PRELOAD, settings.DEBUG)"
)
PRODUCTION = {"SECRET_KEY": LONG_SECRET, "DEBUG": "0", "RANKWISE_ENV_FILE": os.devnull}


def test_by_default_the_proxy_header_is_not_trusted_and_hsts_is_for_this_host_only(tmp_path):
    done = run_python(SECURITY, **PRODUCTION, RANKWISE_DATA_DIR=str(tmp_path))
    assert done.stdout.split() == ["None", "31536000", "False", "False", "False"]


def test_the_proxy_header_and_hsts_are_environment_choices(tmp_path):
    done = run_python(
        SECURITY,
        **PRODUCTION,
        RANKWISE_DATA_DIR=str(tmp_path),
        RANKWISE_BEHIND_PROXY="1",
        RANKWISE_HSTS_SECONDS="3600",
        RANKWISE_HSTS_PRELOAD="1",
    )
    assert done.stdout.split() == ["('HTTP_X_FORWARDED_PROTO',", "'https')", "3600", "True", "True", "False"]


def test_deploy_checks_pass_with_preload_chosen(tmp_path):
    assert manage(tmp_path, "collectstatic", "--noinput").returncode == 0
    done = manage(tmp_path, "check", "--deploy", "--fail-level", "WARNING", RANKWISE_HSTS_PRELOAD="1")
    assert done.returncode == 0, done.stderr


def test_a_debug_env_file_is_only_written_by_make_run(tmp_path):
    """make test takes its settings from its own environment; a .env left behind would make later runs debug."""
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    (tmp_path / "pyproject.toml").touch()
    (tmp_path / ".venv").mkdir()
    installed = tmp_path / ".venv" / ".installed"
    installed.touch()
    os.utime(installed, (time.time() + 60, time.time() + 60))  # set up already
    plans = {
        target: subprocess.run(
            ["make", "-n", target], cwd=tmp_path, capture_output=True, text=True, check=True, env=os.environ
        ).stdout
        for target in ("test", "run", "serve")
    }
    writes_env = "> .env"
    assert writes_env in plans["run"]
    assert writes_env not in plans["test"] and writes_env not in plans["serve"]


def test_export_workers_default_to_the_cores_and_a_wrong_value_is_named(tmp_path):
    show = (
        "import django, os; os.environ['DJANGO_SETTINGS_MODULE']='config.settings'; "
        "from django.conf import settings; print(settings.EXPORT_WORKERS)"
    )
    base = {"SECRET_KEY": LONG_SECRET, "RANKWISE_DATA_DIR": str(tmp_path)}
    default = run_python(show, **base)
    assert default.stdout.strip() == str(min(4, len(os.sched_getaffinity(0))))
    assert run_python(show, **base, RANKWISE_EXPORT_WORKERS="3").stdout.strip() == "3"
    for wrong in ("0", "two", "-1", "²"):
        done = run_python(show, **base, RANKWISE_EXPORT_WORKERS=wrong)
        assert done.returncode != 0
        assert f"RANKWISE_EXPORT_WORKERS must be a whole number of at least 1, not {wrong!r}" in done.stderr
