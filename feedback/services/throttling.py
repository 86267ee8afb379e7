"""Brute-force protection: failed logins and failed API tokens, counted per client address in the cache.

Only failures are counted, so any number of people working normally behind one address are never
slowed. The counts live in Django's default cache, which settings make shared between processes; each
count is read, extended and written back under a lock, so failures sent in parallel are all counted.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from django.conf import settings
from django.core.cache import cache
from django.core.exceptions import ValidationError
from django.http import HttpRequest

if TYPE_CHECKING:
    from redis import Redis

LOGIN_FAILURES_ALLOWED = 5
LOGIN_WINDOW_SECONDS = 15 * 60
LOGIN_LOCK_SECONDS = 15 * 60
TOKEN_FAILURES_ALLOWED = 20
TOKEN_WINDOW_SECONDS = 60


def client_address(request: HttpRequest) -> str:
    """The caller's address: REMOTE_ADDR, or the one the proxy appended to X-Forwarded-For behind a proxy."""
    if settings.BEHIND_PROXY:
        forwarded = [part.strip() for part in request.META.get("HTTP_X_FORWARDED_FOR", "").split(",")]
        if forwarded[-1]:
            return forwarded[-1]  # earlier entries come from the client and can be anything
    return request.META.get("REMOTE_ADDR", "")


def _login_key(kind: str, *, username: str, address: str) -> str:
    account = hashlib.sha256(username.casefold().encode()).hexdigest()[:32]
    return f"rankwise:login-{kind}:{account}:{address}"


@functools.cache
def _redis(url: str) -> Redis:
    from redis import Redis  # the `redis` extra, installed where REDIS_URL is used

    return Redis.from_url(url)


@contextmanager
def _counting(key: str) -> Iterator[None]:
    """Hold `key` while its count is read and written back, in every process that shares the cache.

    The cache has no atomic read-modify-write that both its backends keep. With Redis (shared by several
    machines) a Redis lock, which expires should its holder die; with the file cache (one machine) a file
    lock, which the operating system frees when its process ends.
    """
    if settings.REDIS_URL:
        with _redis(settings.REDIS_URL).lock(f"{key}:lock", timeout=10, blocking_timeout=10):
            yield
        return
    with (settings.DATA_DIR / "throttling.lock").open("a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)  # freed when the file closes
        yield


def _recent(key: str, *, window: int, now: float) -> list[float]:
    return [moment for moment in cache.get(key, []) if moment > now - window]


def login_lock_check(*, username: str, address: str) -> None:
    """Refuse an attempt (right password or not) while the account is locked for this address."""
    until = cache.get(_login_key("lock", username=username, address=address))
    if until is not None and until > time.time():
        minutes = max(1, round((until - time.time()) / 60))
        raise ValidationError(
            f"Too many failed logins for this account from your address. Try again in {minutes} "
            f"minute{'' if minutes == 1 else 's'}.",
            code="locked",
        )


def login_failure_record(*, username: str, address: str) -> None:
    """Count a failed login; the fifth within the window locks the account for this address."""
    key = _login_key("failures", username=username, address=address)
    with _counting(key):
        now = time.time()
        failures = _recent(key, window=LOGIN_WINDOW_SECONDS, now=now) + [now]
        if len(failures) >= LOGIN_FAILURES_ALLOWED:
            lock_key = _login_key("lock", username=username, address=address)
            cache.set(lock_key, now + LOGIN_LOCK_SECONDS, LOGIN_LOCK_SECONDS)
            cache.delete(key)
        else:
            cache.set(key, failures, LOGIN_WINDOW_SECONDS)


def login_failures_clear(*, username: str, address: str) -> None:
    """A successful login forgets the account's earlier failures from this address."""
    cache.delete(_login_key("failures", username=username, address=address))


def _token_key(address: str) -> str:
    return f"rankwise:token-failures:{address}"


def token_failures_wait(*, address: str) -> float | None:
    """Seconds until this address may try a token again, or None when it may now."""
    now = time.time()
    failures = _recent(_token_key(address), window=TOKEN_WINDOW_SECONDS, now=now)
    if len(failures) < TOKEN_FAILURES_ALLOWED:
        return None
    return failures[-TOKEN_FAILURES_ALLOWED] + TOKEN_WINDOW_SECONDS - now


def token_failure_record(*, address: str) -> None:
    key = _token_key(address)
    with _counting(key):
        now = time.time()
        failures = _recent(key, window=TOKEN_WINDOW_SECONDS, now=now) + [now]
        cache.set(key, failures[-TOKEN_FAILURES_ALLOWED:], TOKEN_WINDOW_SECONDS)
