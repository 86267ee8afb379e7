"""The API's OpenAPI schema: drf-spectacular's, with the refusal that every operation can give."""

from __future__ import annotations

from typing import Any

TOKENS_THROTTLED = {
    "description": "Too many failed token authentications from your address (more than 20 a minute); retry after "
    "the Retry-After header.",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},  # ErrorSerializer
}


def token_throttling_documented(result: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    """A drf-spectacular postprocessing hook: every operation documents the 429 of token throttling.

    Tokens are checked before anything else (feedback.api.authentication), so any operation answers 429
    to an address that keeps sending wrong ones; operations with rate limits of their own already say so.
    """
    for operations in result["paths"].values():
        for operation in operations.values():
            operation["responses"].setdefault("429", TOKENS_THROTTLED)
    return result
