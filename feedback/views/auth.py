"""Logging in, for the site and the Django admin, with failed attempts counted per account and address."""

from __future__ import annotations

from typing import Any

from django.contrib.admin.forms import AdminAuthenticationForm
from django.contrib.auth import views as auth_views
from django.contrib.auth.forms import AuthenticationForm
from django.core.exceptions import ValidationError

from feedback.services.throttling import client_address, login_failure_record, login_failures_clear, login_lock_check


class LockoutMixin:
    """After five failed logins for an account from one address, that address waits 15 minutes for it."""

    request: Any
    cleaned_data: dict[str, Any]

    def clean(self) -> dict[str, Any]:
        username = self.cleaned_data.get("username")
        if not username:
            return super().clean()  # type: ignore[misc]
        address = client_address(self.request)
        login_lock_check(username=username, address=address)
        try:
            cleaned = super().clean()  # type: ignore[misc]
        except ValidationError as error:
            if error.code == "invalid_login":
                login_failure_record(username=username, address=address)
            raise
        login_failures_clear(username=username, address=address)
        return cleaned


class LoginForm(LockoutMixin, AuthenticationForm):
    pass


class AdminLoginForm(LockoutMixin, AdminAuthenticationForm):
    pass


login = auth_views.LoginView.as_view(authentication_form=LoginForm)
