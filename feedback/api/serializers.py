"""Serializers shared by the API views: error bodies and the paginated list envelope, for the schema."""

from __future__ import annotations

from typing import Any

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, inline_serializer
from rest_framework import serializers
from rest_framework.exceptions import NotFound
from rest_framework.pagination import PageNumberPagination
from rest_framework.request import Request

from feedback.ids import whole_number

PAGE_PARAMETER = OpenApiParameter(
    "page", {"type": "integer", "minimum": 1}, OpenApiParameter.QUERY, description="1-based page number (50 a page)."
)


class StrictPageNumberPagination(PageNumberPagination):
    """DRF's page numbers, except that a page that is not a positive whole number is a 404, not page 1."""

    def get_page_number(self, request: Request, paginator: Any) -> Any:
        value = request.query_params.get(self.page_query_param)
        if value is None:
            return 1
        number = whole_number(value)
        if number is None or number < 1:
            raise NotFound("Invalid page.")
        return value


class StrictCharField(serializers.CharField):
    """A JSON body's string; DRF's CharField also takes numbers, which the schema does not."""

    def to_internal_value(self, data: Any) -> str:
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(data)


class StrictBooleanField(serializers.BooleanField):
    """A JSON body's true or false; DRF's BooleanField also takes 0, 1, "yes" and "off", which the schema does not."""

    def to_internal_value(self, data: Any) -> bool:
        if isinstance(data, bool):
            return data
        self.fail("invalid", input=data)


class ErrorSerializer(serializers.Serializer):
    detail = serializers.CharField()


def paginated(item: serializers.Serializer, *, name: str) -> serializers.Serializer:
    """The schema of a PageNumberPagination page of items."""
    return inline_serializer(
        name=name,
        fields={
            "count": serializers.IntegerField(),
            "next": serializers.URLField(allow_null=True),
            "previous": serializers.URLField(allow_null=True),
            "results": item,
        },
    )


VALIDATION_ERROR = OpenApiResponse(
    OpenApiTypes.OBJECT, description="Invalid input: each field names its problems ({field: [message, ...]})."
)
NOT_AUTHENTICATED = OpenApiResponse(
    ErrorSerializer,
    description="No credentials, or a wrong token (the answer carries `WWW-Authenticate: Token`); send "
    "`Authorization: Token <key>` or sign in.",
)
FORBIDDEN = OpenApiResponse(
    ErrorSerializer,
    description="Your role in this project is too low (managers only), or a signed-in session sent a write "
    "without its CSRF token.",
)
CSRF_FAILED = OpenApiResponse(
    ErrorSerializer, description="A signed-in session sent this write without its CSRF token (token callers never)."
)
NOT_FOUND = OpenApiResponse(ErrorSerializer, description="No such project (or not one of yours), or no such page.")
THROTTLED = OpenApiResponse(
    ErrorSerializer,
    description="Too many requests, or too many failed token authentications from your address (more than 20 a "
    "minute); retry after the Retry-After header.",
)

# What any member may read: only callers who are not signed in (401) and non-members (404) are refused.
READ_ERRORS = {401: NOT_AUTHENTICATED, 404: NOT_FOUND}


def query_data(request: Request, *, lists: tuple[str, ...] = ()) -> dict[str, Any]:
    """Query parameters as plain data: the last value of each, all values of the `lists` ones.

    Serializers read a QueryDict like an HTML form, where an empty value means "not given";
    plain data makes `?ordering=` an error like any other value outside the allow-list.
    """
    return {key: values if key in lists else values[-1] for key, values in request.query_params.lists()}
