"""Exports stream: the memory an export needs does not grow with the number of rows, but for the reliability
estimate's arrays (under 200 bytes per vote) when votes are weighted by it."""

import gc
import tracemalloc

import pytest

from feedback.selectors.preferences import PreferenceExportOptions
from feedback.services.exports import export_write_file
from tests.factories import ProjectFactory, UserFactory
from tests.feedback.export_helpers import bulk_rankings, fast_password_hashing

pytestmark = pytest.mark.django_db


def traced_export(project, path, file_format: str, weighting: str = "raw") -> tuple[int, int]:
    gc.collect()
    tracemalloc.start()
    try:
        options = PreferenceExportOptions(format=file_format, weighting=weighting)
        rows = export_write_file(project=project, options=options, path=path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return rows, peak


def test_export_memory_is_flat_in_the_number_of_rows(settings, tmp_path):
    fast_password_hashing(settings)
    project = ProjectFactory()
    annotator = UserFactory()
    # K = 4 ranked by one annotator: 6 dpo rows per prompt.
    bulk_rankings(project, prompts=3_400, annotators=[annotator])
    small = {suffix: traced_export(project, tmp_path / f"small.{suffix}", "dpo") for suffix in ("jsonl", "parquet")}
    bulk_rankings(project, prompts=10_200, annotators=[annotator], start=3_400)
    large = {suffix: traced_export(project, tmp_path / f"large.{suffix}", "dpo") for suffix in ("jsonl", "parquet")}
    weighted_rows, weighted_peak = traced_export(project, tmp_path / "weighted.jsonl", "dpo", "reliability")

    for suffix in ("jsonl", "parquet"):
        (small_rows, small_peak), (large_rows, large_peak) = small[suffix], large[suffix]
        assert (small_rows, large_rows) == (20_400, 81_600)
        # Four times the rows; an export that gathered its rows in memory would need about four times the memory.
        assert large_peak / small_peak < 1.3, (suffix, small_peak, large_peak)
    # The same rows, weighted: one vote per row here, and the estimate's arrays on top of the streaming export.
    assert weighted_rows == 81_600
    assert (weighted_peak - large["jsonl"][1]) / weighted_rows < 250, (weighted_peak, large["jsonl"][1])
