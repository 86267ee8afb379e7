import os
import subprocess
import sys
from pathlib import Path

from django.conf import settings
from django.db import connection

ROOT = Path(__file__).resolve().parents[2]
LONG_SECRET = "k3Y-" * 16


def run_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL", "DEBUG", "SECRET_KEY")}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env={**base, **env}, check=False
    )


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


def test_deploy_checks_pass_for_production_settings(tmp_path):
    done = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={
            # the browser tests allow sync database calls in async contexts, which deploy checks refuse
            **{
                k: v
                for k, v in os.environ.items()
                if k not in ("DATABASE_URL", "REDIS_URL", "DJANGO_ALLOW_ASYNC_UNSAFE")
            },
            "DEBUG": "0",
            "SECRET_KEY": LONG_SECRET + "x9!",
            "ALLOWED_HOSTS": "rankwise.example.com",
            "RANKWISE_DATA_DIR": str(tmp_path),
        },
    )
    assert done.returncode == 0, done.stderr


def test_export_workers_default_to_the_cores_and_a_wrong_value_is_named(tmp_path):
    show = (
        "import django, os; os.environ['DJANGO_SETTINGS_MODULE']='config.settings'; "
        "from django.conf import settings; print(settings.EXPORT_WORKERS)"
    )
    base = {"SECRET_KEY": LONG_SECRET, "RANKWISE_DATA_DIR": str(tmp_path)}
    default = run_python(show, **base)
    assert default.stdout.strip() == str(min(4, len(os.sched_getaffinity(0))))
    assert run_python(show, **base, RANKWISE_EXPORT_WORKERS="3").stdout.strip() == "3"
    for wrong in ("0", "two", "-1"):
        done = run_python(show, **base, RANKWISE_EXPORT_WORKERS=wrong)
        assert done.returncode != 0
        assert f"RANKWISE_EXPORT_WORKERS must be a whole number of at least 1, not {wrong!r}" in done.stderr
