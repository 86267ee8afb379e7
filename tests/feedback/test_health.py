import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.test import Client
from huey import RedisHuey

ROOT = Path(__file__).resolve().parents[2]
ALL_OK = {"database": "ok", "queue": "ok", "data_dir": "ok", "model": "ok"}

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _base_model(settings, tiny_model_dir):
    settings.BASE_MODEL = str(tiny_model_dir)


def test_everything_ok_is_200_without_signing_in():
    response = Client().get("/healthz")
    assert response.status_code == 200
    assert response.json() == ALL_OK
    assert "no-store" in response["Cache-Control"]


def test_plain_http_is_answered_while_every_other_page_is_redirected_to_https(settings):
    settings.SECURE_SSL_REDIRECT = True
    client = Client()
    assert client.get("/healthz").status_code == 200
    login = client.get("/login/")
    assert (login.status_code, login["Location"]) == (301, "https://testserver/login/")


def test_only_get_is_allowed():
    assert Client().post("/healthz").status_code == 405


def test_a_missing_data_dir_is_503_naming_it(settings, tmp_path):
    settings.DATA_DIR = tmp_path / "gone"
    response = Client().get("/healthz")
    assert response.status_code == 503
    assert response.json() == ALL_OK | {"data_dir": f"failed: {tmp_path / 'gone'} is not a directory"}


def test_a_missing_base_model_is_503_naming_it(settings, tmp_path):
    settings.BASE_MODEL = str(tmp_path / "no-model")
    response = Client().get("/healthz")
    assert response.status_code == 503
    expected = f"failed: {tmp_path / 'no-model'} does not exist (run `python manage.py fetch_default_model`)"
    assert response.json() == ALL_OK | {"model": expected}


def test_a_model_directory_without_weights_is_503(settings, tmp_path):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    settings.BASE_MODEL = str(tmp_path / "half")
    response = Client().get("/healthz")
    assert (response.status_code, response.json()["model"]) == (
        503,
        f"failed: {tmp_path / 'half'} has no .safetensors weights",
    )


def test_a_hub_id_that_is_not_in_the_local_cache_is_503(settings, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    settings.BASE_MODEL = "someone/not-downloaded"
    response = Client().get("/healthz")
    assert response.status_code == 503
    assert response.json()["model"] == (
        "failed: someone/not-downloaded is neither a model directory nor in the local Hugging Face cache"
    )


def test_an_unreachable_redis_queue_is_503_naming_the_queue(monkeypatch):
    monkeypatch.setattr("feedback.selectors.health.HUEY", RedisHuey("rankwise", url="redis://127.0.0.1:1/0"))
    response = Client().get("/healthz")
    assert response.status_code == 503
    report = response.json()
    assert report == ALL_OK | {"queue": report["queue"]}
    assert report["queue"].startswith("failed: ") and "Connection refused" in report["queue"]


def test_an_unreachable_database_is_503_naming_the_database(tmp_path, tiny_model_dir):
    code = (
        "import django, json; django.setup(); from django.test import Client; "
        "r = Client().get('/healthz'); print(r.status_code, json.dumps(r.json()))"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        env=env
        | {
            "DJANGO_SETTINGS_MODULE": "config.settings",
            "SECRET_KEY": "k3Y-" * 16,
            "DEBUG": "1",
            "ALLOWED_HOSTS": "testserver",
            "RANKWISE_ENV_FILE": os.devnull,
            "RANKWISE_DATA_DIR": str(tmp_path),
            "RANKWISE_BASE_MODEL": str(tiny_model_dir),
            "DATABASE_URL": "postgres://nobody:secret@127.0.0.1:1/rankwise",
        },
    )
    status, _, body = done.stdout.partition(" ")
    assert status == "503", done.stderr
    report = json.loads(body)
    assert report == ALL_OK | {"database": report["database"]}
    assert report["database"].startswith("failed: ") and "127.0.0.1" in report["database"]
