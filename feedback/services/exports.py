"""Writing preference exports: JSONL streamed (shared between processes when large), Parquet in record
batches, and background file jobs.

A background job (a Parquet or JSONL file built by the worker) lives in its own directory
under ``settings.EXPORTS_DIR`` named by a random id we generate; ``job.json`` holds its
project, options, owner and status, and the file appears next to it, written under a
temporary name and renamed when complete. No user input ever becomes part of a path.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import re
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator
from functools import lru_cache
from itertools import chain, islice
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from django.conf import settings
from django.db import connections
from django.utils import timezone

from feedback.db import use_own_connections
from feedback.models import Project, Prompt
from feedback.queue import enqueue
from feedback.selectors.preferences import (
    EXPORT_FORMATS,
    PreferenceExportOptions,
    export_columns,
    preference_rows,
    preference_weights,
)
from feedback.selectors.reliability import Reliability

FILE_TYPES = ("jsonl", "parquet")  # the kinds of file an export writes, by their extension
JSONL_LINES_PER_CHUNK = 1000
PARQUET_ROWS_PER_BATCH = 10_000
SLICE_PROMPTS = 2000  # prompts an export process reads at a time when several share the work
_EXPORTED, _FAILED = b"+", b"!"  # the first byte of a helper's message: a slice's JSONL, or an error
JOB_ID = re.compile(r"^[0-9a-f]{32}$")

# Read once at import (umask can only be read by setting it): export files get the usual
# permissions of a new file, not the owner-only ones of a temporary file.
_UMASK = os.umask(0o022)
os.umask(_UMASK)

_MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
_ARROW_TYPES = {
    "string": pa.string(),
    "bool": pa.bool_(),
    "int32": pa.int32(),
    "int64": pa.int64(),
    "float64": pa.float64(),
}


class ExportError(Exception):
    """An export that cannot be written; the message says why."""


def export_schema(*, options: PreferenceExportOptions) -> pa.Schema:
    """The Parquet schema of a format's columns: texts are strings, or list<struct<role, content>> if conversational."""
    text = _MESSAGES if options.conversational else pa.string()

    def arrow_type(kind: str) -> pa.DataType:
        if kind.startswith("list<"):
            return pa.list_(arrow_type(kind.removeprefix("list<").removesuffix(">")))
        return text if kind == "text" else _ARROW_TYPES[kind]

    return pa.schema([(name, arrow_type(kind)) for name, kind in export_columns(options=options)])


DPO_KEYS = tuple(name for name, _ in EXPORT_FORMATS["dpo"].columns)


_FLAG = {True: "true", False: "false"}  # json's spelling of a bool
# json writes a float as its repr, which is slow to work out; agreements take a few values over and over.
_number_text = lru_cache(maxsize=4096, typed=True)(repr)


def _dpo_lines(rows: Iterable[dict[str, Any]], encode: Callable[[Any], str]) -> Iterator[str]:
    """dpo rows formatted directly, the same text as `encode(row)` in a fraction of the time.

    Rows come prompt by prompt, and within a prompt a completion id always has the same text,
    so the prompt is encoded once per prompt and each completion once per prompt; the numbers
    are written as json writes them (str of an int, repr of a float).
    """
    prompt_id, head = None, ""
    encoded: dict[int, str] = {}  # completion id -> its encoded text, for the current prompt
    for row in rows:
        if row["prompt_id"] != prompt_id:
            prompt_id = row["prompt_id"]
            head = f'{{"prompt": {encode(row["prompt"])}, "chosen": '
            encoded = {}
        chosen_id, rejected_id = row["chosen_id"], row["rejected_id"]
        if chosen_id not in encoded:
            encoded[chosen_id] = encode(row["chosen"])
        if rejected_id not in encoded:
            encoded[rejected_id] = encode(row["rejected"])
        yield (
            f'{head}{encoded[chosen_id]}, "rejected": {encoded[rejected_id]}, "prompt_id": {prompt_id}, '
            f'"chosen_id": {chosen_id}, "rejected_id": {rejected_id}, '
            f'"chosen_truncated": {_FLAG[row["chosen_truncated"]]}, '
            f'"rejected_truncated": {_FLAG[row["rejected_truncated"]]}, "votes": {row["votes"]}, '
            f'"agreement": {_number_text(row["agreement"])}, "weight": {_number_text(row["weight"])}, '
            f'"adjudicated": {_FLAG[row["adjudicated"]]}, "round": {row["round"]}}}'
        )


def export_jsonl_chunks(*, rows: Iterable[dict[str, Any]]) -> Iterator[str]:
    """JSONL text in chunks of about a thousand lines, for a file or a streamed response."""
    encode = json.JSONEncoder(ensure_ascii=False, separators=(", ", ": ")).encode
    rows = iter(rows)
    first = next(rows, None)
    if first is None:
        return
    rows = chain([first], rows)
    lines = _dpo_lines(rows, encode) if tuple(first) == DPO_KEYS else map(encode, rows)
    while chunk := list(islice(lines, JSONL_LINES_PER_CHUNK)):
        chunk.append("")
        yield "\n".join(chunk)


def export_jsonl(
    *,
    project: Project,
    options: PreferenceExportOptions,
    on_prompt: Callable[[int], None] | None = None,
    workers: int | None = None,
    slice_prompts: int | None = None,
) -> Iterator[bytes]:
    """A project's export as UTF-8 JSONL in chunks, rows in prompt order, using several processes when it is large.

    The prompts are cut, in id order, into slices of ``slice_prompts`` (default ``SLICE_PROMPTS``),
    and slice i is exported by process i % ``workers`` (default ``settings.EXPORT_WORKERS``, one
    per core), this process being the first. The others are forked, open their own database
    connection and send each finished slice, encoded, through a pipe that this process reads
    in turn: the bytes are the same as from one process, and a helper holds at most one slice
    while it waits to be read. One process does it all when there are fewer than two slices,
    or inside a transaction (another process would not see its uncommitted rows).
    """
    workers = settings.EXPORT_WORKERS if workers is None else workers
    size = SLICE_PROMPTS if slice_prompts is None else slice_prompts
    slices = _prompt_slices(project=project, size=size) if workers > 1 and not _in_transaction() else []
    if len(slices) < 2:
        rows = preference_rows(project=project, options=options, on_prompt=on_prompt)
        yield from (chunk.encode() for chunk in export_jsonl_chunks(rows=rows))
        return
    workers = min(workers, len(slices))
    weights = preference_weights(project=project, options=options)  # one estimate for every slice
    context = multiprocessing.get_context("fork")
    helpers: list[tuple[BaseProcess, Connection]] = []
    try:
        for worker in range(1, workers):
            receiver, sender = context.Pipe(duplex=False)
            process = context.Process(
                target=_export_slices, args=(project, options, weights, slices[worker::workers], sender), daemon=True
            )
            process.start()
            sender.close()
            helpers.append((process, receiver))
        for index, (first, end, prompts) in enumerate(slices):
            if index % workers == 0:
                rows = preference_rows(
                    project=project, options=options, on_prompt=on_prompt, id_range=(first, end), reliability=weights
                )
                yield from (chunk.encode() for chunk in export_jsonl_chunks(rows=rows))
                continue
            try:
                message = helpers[index % workers - 1][1].recv_bytes()
            except EOFError:
                raise ExportError("an export process stopped before it had written its part") from None
            if message[:1] == _FAILED:
                raise ExportError(f"an export process failed: {message[1:].decode()}")
            if on_prompt is not None:
                on_prompt(prompts)
            if len(message) > 1:
                yield message[1:]
    finally:
        for helper, receiver in helpers:
            if helper.is_alive():
                helper.terminate()  # a reader that stopped early leaves helpers waiting to send
            helper.join()
            receiver.close()


def _in_transaction() -> bool:
    return any(connection.in_atomic_block for connection in connections.all(initialized_only=True))


def _prompt_slices(*, project: Project, size: int) -> list[tuple[int, int, int]]:
    """(first id, end id, prompts) for consecutive slices of ``size`` prompts of a project, in id order."""
    ids = Prompt.objects.filter(project=project).order_by("id").values_list("id", flat=True)
    starts: list[int] = []
    count, last = 0, 0
    for index, prompt_id in enumerate(ids.iterator(chunk_size=10_000)):
        if index % size == 0:
            starts.append(prompt_id)
        count, last = index + 1, prompt_id
    if not starts:
        return []
    ends = [*starts[1:], last + 1]
    return [(first, end, min(size, count - i * size)) for i, (first, end) in enumerate(zip(starts, ends, strict=True))]


def _export_slices(
    project: Project,
    options: PreferenceExportOptions,
    weights: Reliability | None,
    slices: list[tuple[int, int, int]],
    sender: Connection,
) -> None:
    """In a forked process: export each slice and send its JSONL, or the error that stopped it."""
    use_own_connections()  # never the parent's, whatever state it left them in
    try:
        for first, end, _ in slices:
            rows = preference_rows(project=project, options=options, id_range=(first, end), reliability=weights)
            sender.send_bytes(_EXPORTED + "".join(export_jsonl_chunks(rows=rows)).encode())
    except Exception as error:
        sender.send_bytes(_FAILED + f"{type(error).__name__}: {error}".encode())
    finally:
        sender.close()
        connections.close_all()


def export_write_parquet(*, rows: Iterable[dict[str, Any]], path: Path, options: PreferenceExportOptions) -> int:
    """Write rows as Parquet, one record batch per ten thousand rows; returns the row count."""
    schema = export_schema(options=options)
    count = 0
    with pq.ParquetWriter(str(path), schema) as writer:
        batch: list[dict[str, Any]] = []
        for row in rows:
            batch.append(row)
            if len(batch) >= PARQUET_ROWS_PER_BATCH:
                writer.write_batch(pa.RecordBatch.from_pylist(batch, schema=schema))
                count += len(batch)
                batch = []
        if batch or count == 0:
            writer.write_batch(pa.RecordBatch.from_pylist(batch, schema=schema))
            count += len(batch)
    return count


def export_file_type(*, path: Path) -> str:
    """jsonl or parquet from a file name; ExportError for any other extension."""
    suffix = path.suffix.lower().lstrip(".")
    if suffix not in FILE_TYPES:
        raise ExportError(f"{path.name}: the file name must end in {' or '.join('.' + t for t in FILE_TYPES)}")
    return suffix


def export_write_file(
    *,
    project: Project,
    options: PreferenceExportOptions,
    path: Path,
    on_prompt: Callable[[int], None] | None = None,
) -> int:
    """Export to a .jsonl or .parquet file, written to a temporary file beside it and renamed when complete."""
    file_type = export_file_type(path=path)
    directory = path.parent if str(path.parent) else Path(".")
    if directory.exists() and not directory.is_dir():
        raise ExportError(f"{directory}: is not a directory, so nothing can be written in it")
    if not directory.is_dir():
        raise ExportError(f"{directory}: no such directory")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ExportError(f"{directory}: the directory is not writable")
    if path.is_dir():
        raise ExportError(f"{path}: is a directory")
    handle, temporary = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".part")
    try:
        if file_type == "jsonl":
            count = 0
            with os.fdopen(handle, "wb") as stream:
                for chunk in export_jsonl(project=project, options=options, on_prompt=on_prompt):
                    stream.write(chunk)
                    count += chunk.count(b"\n")  # JSON escapes newlines, so one line is one row
        else:
            os.close(handle)
            rows = preference_rows(project=project, options=options, on_prompt=on_prompt)
            count = export_write_parquet(rows=rows, path=Path(temporary), options=options)
        os.chmod(temporary, 0o666 & ~_UMASK)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return count


@dataclasses.dataclass
class ExportJob:
    id: str
    project_id: int
    project_slug: str
    requested_by_id: int | None
    file_type: str
    options: dict[str, Any]
    status: str  # queued, running, succeeded, failed
    created_at: str
    finished_at: str | None = None
    rows: int | None = None
    error: str = ""

    @property
    def directory(self) -> Path:
        return Path(settings.EXPORTS_DIR) / self.id

    @property
    def file_path(self) -> Path:
        return self.directory / f"{self.project_slug}-{self.options['format']}.{self.file_type}"

    @property
    def file_name(self) -> str:
        return self.file_path.name


def _job_save(job: ExportJob) -> None:
    job.directory.mkdir(parents=True, exist_ok=True)
    temporary = job.directory / "job.json.part"
    temporary.write_text(json.dumps(dataclasses.asdict(job)), encoding="utf-8")
    os.replace(temporary, job.directory / "job.json")


def export_job_get(*, job_id: str) -> ExportJob | None:
    """The job with this id, or None; ids that are not ours (wrong shape) never reach the file system."""
    if not JOB_ID.match(job_id):
        return None
    path = Path(settings.EXPORTS_DIR) / job_id / "job.json"
    try:
        return ExportJob(**json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        return None


def export_job_start(
    *, project: Project, options: PreferenceExportOptions, file_type: str, requested_by_id: int | None
) -> ExportJob:
    """Record an export job and queue it for the worker once the surrounding transaction commits."""
    if file_type not in FILE_TYPES:
        raise ExportError(f"file type must be {' or '.join(FILE_TYPES)}, not {file_type!r}")
    job = ExportJob(
        id=uuid.uuid4().hex,
        project_id=project.pk,
        project_slug=project.slug,
        requested_by_id=requested_by_id,
        file_type=file_type,
        options=options.as_mapping(),
        status="queued",
        created_at=timezone.now().isoformat(),
    )
    _job_save(job)
    enqueue("export_file_task", job.id)
    return job


def export_job_run(*, job_id: str) -> ExportJob:
    """Build a job's file. Running a finished job again does nothing."""
    job = export_job_get(job_id=job_id)
    if job is None:
        raise ExportError(f"no export job {job_id}")
    if job.status == "succeeded":
        return job
    job.status = "running"
    _job_save(job)
    try:
        project = Project.objects.get(pk=job.project_id)
        job.rows = export_write_file(
            project=project, options=PreferenceExportOptions.from_mapping(job.options), path=job.file_path
        )
        job.status = "succeeded"
    except Exception as error:
        job.status = "failed"
        job.error = str(error) or type(error).__name__
        raise
    finally:
        job.finished_at = timezone.now().isoformat()
        _job_save(job)
    return job
