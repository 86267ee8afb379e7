"""Brute-force protection: failed logins and failed API tokens, counted per client address in the cache.

Only failures are counted, so any number of people working normally behind one address are never
slowed. The counts live in Django's default cache, which settings make shared between processes.
"""

from __future__ import annotations

import hashlib
import time

from django.conf import settings
from django.core.cache import cache
from django.core.exceptions import ValidationError
from django.http import HttpRequest

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
    now = time.time()
    key = _login_key("failures", username=username, address=address)
    failures = _recent(key, window=LOGIN_WINDOW_SECONDS, now=now) + [now]
    if len(failures) >= LOGIN_FAILURES_ALLOWED:
        cache.set(_login_key("lock", username=username, address=address), now + LOGIN_LOCK_SECONDS, LOGIN_LOCK_SECONDS)
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
    now = time.time()
    failures = _recent(_token_key(address), window=TOKEN_WINDOW_SECONDS, now=now) + [now]
    cache.set(_token_key(address), failures[-TOKEN_FAILURES_ALLOWED:], TOKEN_WINDOW_SECONDS)
