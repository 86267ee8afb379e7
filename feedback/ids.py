"""Ids as they arrive in URLs and query strings."""

from __future__ import annotations

# Ids are 64-bit database integers; a larger number must be refused, not overflow in the database driver.
MAX_ID = 2**63 - 1
MAX_ID_DIGITS = len(str(MAX_ID))


def whole_number(value: str) -> int | None:
    """The number written in ASCII digits, or None.

    str.isdigit alone also accepts '²', which int() refuses; and no id, page or count needs more digits than
    the largest id, while int() refuses more than 4,300 (and takes time to read fewer).
    """
    if not (value.isascii() and value.isdigit()) or len(value.lstrip("0")) > MAX_ID_DIGITS:
        return None
    return int(value)


def id_from(value: str) -> int | None:
    """A database id (1 to MAX_ID) written in ASCII digits, or None."""
    number = whole_number(value)
    return number if number is not None and 1 <= number <= MAX_ID else None
