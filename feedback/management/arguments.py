"""What more than one command shares: the rounds and writers that limit exports and runs, and how errors are named."""

from __future__ import annotations

import argparse

from django.core.exceptions import ValidationError


def round_numbers(value: str) -> list[int]:
    """``2,3`` -> [2, 3]; PreferenceExportOptions checks that they are round numbers."""
    try:
        return [int(part) for part in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected round numbers separated by commas, like 2,3; not {value!r}"
        ) from None


def writer_names(value: str) -> list[str]:
    """``v3, base`` -> ["v3", "base"]: version names, or base."""
    return [name.strip() for name in value.split(",") if name.strip()]


def named_errors(error: ValidationError, options: dict[str, str]) -> str:
    """A service's field errors in one line, each named by the command-line option that carries the field."""
    return "; ".join(
        f"{options.get(field, field)}: {' '.join(messages)}" for field, messages in error.message_dict.items()
    )
