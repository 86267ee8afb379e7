"""Serializers shared by the API views: error bodies and the paginated list envelope, for the schema."""

from __future__ import annotations

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, inline_serializer
from rest_framework import serializers

PAGE_PARAMETER = OpenApiParameter(
    "page", int, OpenApiParameter.QUERY, description="1-based page number (50 items a page)."
)


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
NOT_AUTHENTICATED = OpenApiResponse(ErrorSerializer, description="Not authenticated.")
FORBIDDEN = OpenApiResponse(ErrorSerializer, description="Not logged in, or the role in this project is too low.")
NOT_FOUND = OpenApiResponse(ErrorSerializer, description="No such project (or not one of yours), or no such page.")
THROTTLED = OpenApiResponse(ErrorSerializer, description="Too many requests; retry after the Retry-After header.")

READ_ERRORS = {401: NOT_AUTHENTICATED, 403: FORBIDDEN, 404: NOT_FOUND}
