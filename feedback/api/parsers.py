"""The API's JSON parser: DRF's, with a bound on nesting, so a deeply nested body is a 400.

Unbounded, a body nested thousands deep makes the decoder (or any later recursive walk over the
data: validation, copying, rendering) raise RecursionError, which is a 500.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import IO, Any

from rest_framework.exceptions import ParseError
from rest_framework.parsers import JSONParser

MAX_DEPTH = 64
TOO_DEEP = f"JSON parse error - nested deeper than {MAX_DEPTH} levels."


def _depth(data: Any) -> int:
    """How deep lists and objects nest in decoded JSON (walked with a stack, not recursion)."""
    deepest, stack = 0, [(data, 1)]
    while stack:
        value, depth = stack.pop()
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in children)
    return deepest


class BoundedJSONParser(JSONParser):
    def parse(
        self, stream: IO[Any], media_type: str | None = None, parser_context: Mapping[str, Any] | None = None
    ) -> Any:
        try:
            data = super().parse(stream, media_type, parser_context)
        except RecursionError:
            raise ParseError(TOO_DEEP) from None
        if _depth(data) > MAX_DEPTH:
            raise ParseError(TOO_DEEP)
        return data
