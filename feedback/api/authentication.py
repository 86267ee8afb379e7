"""API token authentication that refuses to check tokens for an address that keeps sending wrong ones."""

from __future__ import annotations

from typing import Any

from rest_framework.authentication import TokenAuthentication, get_authorization_header
from rest_framework.exceptions import AuthenticationFailed, Throttled
from rest_framework.request import Request

from feedback.services.throttling import client_address, token_failure_record, token_failures_wait


class ThrottledTokenAuthentication(TokenAuthentication):
    """DRF's token authentication; after 20 failed tokens in a minute from one address, 429 until one expires.

    Refused attempts are not checked at all, so a guess sent while throttled learns nothing.
    """

    def authenticate(self, request: Request) -> tuple[Any, Any] | None:
        words = get_authorization_header(request).split()
        if not words or words[0].lower() != self.keyword.lower().encode():
            return None
        address = client_address(request)
        wait = token_failures_wait(address=address)
        if wait is not None:
            raise Throttled(wait=wait, detail="Too many failed token authentications from your address.")
        try:
            return super().authenticate(request)
        except AuthenticationFailed:
            token_failure_record(address=address)
            raise
