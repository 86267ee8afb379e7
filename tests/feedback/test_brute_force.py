"""Failed logins lock an account for one address; failed API tokens from one address get 429; nobody else slows."""

import threading
import time
from types import SimpleNamespace

import pytest
from django.urls import reverse
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from tests.conftest import PASSWORD
from tests.factories import MembershipFactory, ProjectFactory, UserFactory

pytestmark = pytest.mark.django_db

LOCKED = "Too many failed logins for this account from your address. Try again in 15 minutes."
WRONG = "Please enter a correct username and password."


def log_in(client, username, password, address="203.0.113.7", **headers):
    return client.post(reverse("login"), {"username": username, "password": password}, REMOTE_ADDR=address, **headers)


def errors(response) -> list[str]:
    return list(response.context["form"].non_field_errors())


def test_five_failures_lock_the_account_for_that_address_even_with_the_right_password(client):
    UserFactory(username="alice")
    for _ in range(5):
        response = log_in(client, "alice", "wrong")
        assert response.status_code == 200 and WRONG in errors(response)[0]
    locked = log_in(client, "alice", PASSWORD)
    assert locked.status_code == 200 and errors(locked) == [LOCKED]
    assert "_auth_user_id" not in client.session
    assert LOCKED in locked.content.decode()


def test_the_lock_is_for_that_account_from_that_address_only(client):
    UserFactory(username="alice")
    UserFactory(username="bob")
    for _ in range(5):
        log_in(client, "alice", "wrong")
    assert log_in(client, "bob", PASSWORD).status_code == 302  # another account from the same address
    client.logout()
    assert log_in(client, "alice", PASSWORD, address="198.51.100.4").status_code == 302  # another address


def test_the_lock_ends_after_fifteen_minutes(client, monkeypatch):
    import feedback.services.throttling as throttling

    UserFactory(username="alice")
    now = 1_000_000.0
    monkeypatch.setattr(throttling, "time", SimpleNamespace(time=lambda: now))
    for _ in range(5):
        log_in(client, "alice", "wrong")
    now += 14 * 60
    assert errors(log_in(client, "alice", PASSWORD)) == [
        "Too many failed logins for this account from your address. Try again in 1 minute."
    ]
    now += 61
    assert log_in(client, "alice", PASSWORD).status_code == 302


def test_a_success_forgets_earlier_failures(client):
    UserFactory(username="alice")
    for _ in range(4):
        log_in(client, "alice", "wrong")
    assert log_in(client, "alice", PASSWORD).status_code == 302
    client.logout()
    for _ in range(4):
        log_in(client, "alice", "wrong")
    assert log_in(client, "alice", PASSWORD).status_code == 302


def test_the_admin_login_is_locked_the_same_way(client):
    UserFactory(username="root", is_staff=True, is_superuser=True)
    for _ in range(5):
        client.post("/admin/login/", {"username": "root", "password": "wrong"}, REMOTE_ADDR="203.0.113.7")
    response = client.post("/admin/login/", {"username": "root", "password": PASSWORD}, REMOTE_ADDR="203.0.113.7")
    assert response.status_code == 200 and LOCKED in response.content.decode()


def test_behind_a_proxy_the_address_is_the_one_the_proxy_appended(client, settings):
    settings.BEHIND_PROXY = True
    UserFactory(username="alice")
    for n in range(5):  # one client behind the proxy, claiming a new address each time
        log_in(client, "alice", "wrong", address="10.0.0.1", HTTP_X_FORWARDED_FOR=f"1.2.3.{n}, 203.0.113.7")
    assert errors(log_in(client, "alice", PASSWORD, address="10.0.0.1", HTTP_X_FORWARDED_FOR="203.0.113.7")) == [LOCKED]
    other = log_in(client, "alice", PASSWORD, address="10.0.0.1", HTTP_X_FORWARDED_FOR="198.51.100.4")
    assert other.status_code == 302


def test_without_the_proxy_setting_a_forwarded_address_is_ignored(client, settings):
    settings.BEHIND_PROXY = False
    UserFactory(username="alice")
    for n in range(5):
        log_in(client, "alice", "wrong", HTTP_X_FORWARDED_FOR=f"1.2.3.{n}")
    assert errors(log_in(client, "alice", PASSWORD, HTTP_X_FORWARDED_FOR="9.9.9.9")) == [LOCKED]


def api_get(token: str, address: str = "203.0.113.7"):
    return APIClient().get("/api/v1/projects/", HTTP_AUTHORIZATION=f"Token {token}", REMOTE_ADDR=address)


def test_more_than_twenty_failed_tokens_a_minute_get_429(monkeypatch):
    import feedback.services.throttling as throttling

    monkeypatch.setattr(throttling, "time", SimpleNamespace(time=lambda: 1_000_000.0))  # all in one instant
    good = Token.objects.create(user=UserFactory()).key
    for n in range(20):
        refused = api_get(f"wrong{n}")
        assert refused.status_code == 401 and refused.json() == {"detail": "Invalid token."}
    throttled = api_get("wrong-again")
    assert throttled.status_code == 429 and int(throttled["Retry-After"]) == 60
    assert throttled.json()["detail"].startswith("Too many failed token authentications from your address.")
    assert api_get(good).status_code == 429  # not even checked: a guess sent now would learn nothing
    assert api_get(good, address="198.51.100.4").status_code == 200


def test_failed_tokens_older_than_a_minute_no_longer_count(monkeypatch):
    import feedback.services.throttling as throttling

    now = 1_000_000.0
    monkeypatch.setattr(throttling, "time", SimpleNamespace(time=lambda: now))
    for n in range(20):
        api_get(f"wrong{n}")
    assert api_get("wrong").status_code == 429
    now += 61
    assert api_get("wrong").status_code == 401


def test_twenty_annotators_behind_one_address_working_normally_are_never_slowed(client):
    project = ProjectFactory(slug="alpha")
    annotators = [MembershipFactory(project=project).user for _ in range(20)]
    for user in annotators:
        assert log_in(client, user.username, "typo").status_code == 200  # one mistake each
        assert log_in(client, user.username, PASSWORD).status_code == 302
        client.logout()
    tokens = [Token.objects.create(user=user).key for user in annotators]
    for _ in range(3):
        for token in tokens:
            response = APIClient().get(
                "/api/v1/projects/alpha/", HTTP_AUTHORIZATION=f"Token {token}", REMOTE_ADDR="203.0.113.7"
            )
            assert response.status_code == 200


class SlowCache:
    """The cache, taking its time to read as a busy disk or network does: parallel read-modify-writes overlap."""

    def __init__(self, cache):
        self.cache = cache

    def get(self, *args, **kwargs):
        value = self.cache.get(*args, **kwargs)
        time.sleep(0.02)
        return value

    def __getattr__(self, name):
        return getattr(self.cache, name)


def in_parallel(count: int, action) -> None:
    start = threading.Barrier(count)

    def run() -> None:
        start.wait()
        action()

    threads = [threading.Thread(target=run) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def test_failed_logins_at_the_same_moment_are_all_counted(client, monkeypatch):
    import feedback.services.throttling as throttling

    monkeypatch.setattr(throttling, "cache", SlowCache(throttling.cache))
    UserFactory(username="alice")
    in_parallel(5, lambda: throttling.login_failure_record(username="alice", address="203.0.113.7"))
    assert errors(log_in(client, "alice", PASSWORD)) == [LOCKED]


def test_failed_tokens_at_the_same_moment_are_all_counted(monkeypatch):
    import feedback.services.throttling as throttling

    monkeypatch.setattr(throttling, "cache", SlowCache(throttling.cache))
    good = Token.objects.create(user=UserFactory()).key
    in_parallel(20, lambda: throttling.token_failure_record(address="203.0.113.7"))
    assert api_get("wrong").status_code == 429
    assert api_get(good, address="198.51.100.4").status_code == 200
