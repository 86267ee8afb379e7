"""Command-line values that more than one command reads: the rounds and writers that limit exports and runs."""

from __future__ import annotations

import argparse


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
