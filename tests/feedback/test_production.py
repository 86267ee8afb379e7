"""The app started as the README's production section says: DEBUG off, static files collected, gunicorn."""

import http.client
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_until_listening(port: int, server: subprocess.Popen, *, patience: float = 60.0) -> None:
    """Wait for gunicorn to accept connections (or to die, which fails the test with its output)."""
    give_up = time.monotonic() + patience
    while time.monotonic() < give_up:
        if server.poll() is not None:
            pytest.fail(f"gunicorn exited with {server.returncode}: {server.stderr.read() if server.stderr else ''}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    pytest.fail("gunicorn did not start listening")


def _get(port: int, path: str, **headers: str) -> http.client.HTTPResponse:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request("GET", path, headers={"Host": "127.0.0.1", **headers})
    response = connection.getresponse()
    response.body = response.read()  # type: ignore[attr-defined]
    connection.close()
    return response


@pytest.fixture
def production(tmp_path):
    """What `make serve` does, with a data dir (database, static files) of the test's own."""
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL", "DJANGO_ALLOW_ASYNC_UNSAFE")},
        "DEBUG": "0",
        "RANKWISE_ENV_FILE": os.devnull,
        "SECRET_KEY": "production-" + "s3cr3t-" * 8,
        "ALLOWED_HOSTS": "127.0.0.1",
        "RANKWISE_DATA_DIR": str(tmp_path),
        "RANKWISE_BEHIND_PROXY": "1",
    }
    for step in (
        ["migrate", "--noinput"],
        ["collectstatic", "--noinput"],
        ["check", "--deploy", "--fail-level", "ERROR"],
    ):
        done = subprocess.run([sys.executable, "manage.py", *step], cwd=ROOT, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    port = _free_port()
    server = subprocess.Popen(
        [str(BIN / "gunicorn"), "config.wsgi", "--bind", f"127.0.0.1:{port}", "--workers", "1"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_until_listening(port, server)
        yield port
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)


def test_the_login_page_and_its_css_are_served_by_gunicorn_with_debug_off(production):
    proxied = {"X-Forwarded-Proto": "https"}  # as the TLS proxy in front of gunicorn sends it
    page = _get(production, "/login/", **proxied)
    assert page.status == 200
    html = page.body.decode()  # type: ignore[attr-defined]
    assert "<h1>Log in</h1>" in html
    css = re.search(r'<link rel="stylesheet" href="(/static/css/rankwise\.[0-9a-f]{12}\.css)">', html)
    assert css is not None, "the page names its CSS by collectstatic's hashed name"
    sheet = _get(production, css.group(1), **proxied)
    assert sheet.status == 200 and sheet.getheader("Content-Type").startswith("text/css")
    assert b"body" in sheet.body  # type: ignore[attr-defined]
    assert page.getheader("Strict-Transport-Security") == "max-age=31536000"


def test_plain_http_is_sent_to_https(production):
    response = _get(production, "/login/")
    assert response.status == 301 and response.getheader("Location") == "https://127.0.0.1/login/"
