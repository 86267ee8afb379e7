"""Importing prompts (and optional completions) into a project, all or nothing.

Every record is validated before anything is written; a file with any bad record imports
nothing and every problem names its line (or item) and field.
"""

from __future__ import annotations

import csv
import io
import json
import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from django.db import connection, transaction
from django.db.models import Field
from django.utils import timezone

from feedback.models import Completion, Project, Prompt
from feedback.rendering import markdown_to_safe_html

ROLES = ("system", "user", "assistant")
MAX_PROBLEMS = 50
BATCH_SIZE = 2000
PARALLEL_RENDER_FROM = 20_000  # completions; below this, starting worker processes costs more than it saves


@dataclass(frozen=True)
class ImportProblem:
    line: int
    field: str
    message: str

    def __str__(self) -> str:
        where = f"line {self.line}" + (f", field '{self.field}'" if self.field else "")
        return f"{where}: {self.message}"


class PromptImportError(Exception):
    def __init__(self, problems: list[ImportProblem], *, more: int = 0) -> None:
        self.problems = problems
        self.more = more
        summary = "; ".join(str(p) for p in problems[:5])
        extra = len(problems) - 5 + more
        super().__init__(summary + (f"; and {extra} more" if extra > 0 else ""))


@dataclass
class ImportResult:
    prompts: int = 0
    completions: int = 0


@dataclass
class _ValidRecord:
    messages: list[dict[str, str]]
    external_id: str
    metadata: dict[str, Any]
    completions: list[tuple[str, str]] = field(default_factory=list)  # (text, source model)


class _Invalid(Exception):
    def __init__(self, field_name: str, message: str) -> None:
        self.field = field_name
        self.message = message


def _validate_messages(value: Any) -> list[dict[str, str]]:
    if isinstance(value, str):
        if not value.strip():
            raise _Invalid("prompt", "is empty")
        return [{"role": "user", "content": value}]
    if not isinstance(value, list):
        raise _Invalid("prompt", "must be a string or a list of {role, content} messages")
    if not value:
        raise _Invalid("prompt", "has no messages")
    messages = []
    for i, message in enumerate(value):
        where = f"prompt[{i}]"
        if not isinstance(message, dict):
            raise _Invalid(where, "must be an object with 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise _Invalid(f"{where}.role", f"must be one of {', '.join(ROLES)}, not {role!r}")
        if not isinstance(content, str):
            raise _Invalid(f"{where}.content", "must be a string")
        if not content.strip():
            raise _Invalid(f"{where}.content", "is empty")
        messages.append({"role": role, "content": content})
    if messages[-1]["role"] != "user":
        raise _Invalid(f"prompt[{len(messages) - 1}].role", "the prompt must end with a user turn")
    return messages


def _validate_completion(value: Any, index: int) -> tuple[str, str]:
    where = f"completions[{index}]"
    if isinstance(value, dict):
        text, model = value.get("text"), value.get("model", "")
        if not isinstance(model, str):
            raise _Invalid(f"{where}.model", "must be a string")
        where = f"{where}.text"
    else:
        text, model = value, ""
    if not isinstance(text, str):
        raise _Invalid(where, "must be a string or an object with 'text'")
    if not text.strip():
        raise _Invalid(where, "is empty")
    return text, model


def _validate_record(record: Any) -> _ValidRecord:
    if not isinstance(record, dict):
        raise _Invalid("", "must be a JSON object")
    if "prompt" not in record:
        raise _Invalid("prompt", "is missing")
    unknown = set(record) - {"prompt", "completions", "id", "metadata"}
    if unknown:
        raise _Invalid(sorted(unknown)[0], "is not a known field (prompt, completions, id, metadata)")
    messages = _validate_messages(record["prompt"])
    completions = record.get("completions") or []
    if not isinstance(completions, list):
        raise _Invalid("completions", "must be a list")
    external_id = record.get("id", "")
    if isinstance(external_id, int) and not isinstance(external_id, bool):
        external_id = str(external_id)
    if not isinstance(external_id, str) or len(external_id) > 200:
        raise _Invalid("id", "must be a string of at most 200 characters")
    metadata = record.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise _Invalid("metadata", "must be an object")
    return _ValidRecord(
        messages=messages,
        external_id=external_id,
        metadata=metadata,
        completions=[_validate_completion(c, i) for i, c in enumerate(completions)],
    )


def _validated(project: Project, records: Iterable[tuple[int, Any]]) -> list[_ValidRecord]:
    problems: list[ImportProblem] = []
    more = 0
    valid: list[_ValidRecord] = []
    seen_ids: dict[str, int] = {}
    existing_ids = set(project.prompts.exclude(external_id="").values_list("external_id", flat=True))
    for line, record in records:
        try:
            if isinstance(record, _Invalid):
                raise record
            checked = _validate_record(record)
            if checked.external_id:
                if checked.external_id in existing_ids:
                    raise _Invalid("id", f"{checked.external_id!r} is already in project {project.slug}")
                if checked.external_id in seen_ids:
                    raise _Invalid("id", f"{checked.external_id!r} repeats line {seen_ids[checked.external_id]}")
                seen_ids[checked.external_id] = line
            valid.append(checked)
        except _Invalid as invalid:
            if len(problems) < MAX_PROBLEMS:
                problems.append(ImportProblem(line, invalid.field, invalid.message))
            else:
                more += 1
    if problems:
        raise PromptImportError(problems, more=more)
    if not valid:
        raise PromptImportError([ImportProblem(0, "", "the file holds no prompts")])
    return valid


@contextmanager
def _rendered(texts: list[str]) -> Iterator[Iterator[str]]:
    """The sanitized HTML of each text, in order; large imports render in one process per core.

    The workers render ahead while the caller writes to the database. They are spawned, not
    forked, so a threaded caller (a web worker) hands them no held locks.
    """
    workers = os.cpu_count() or 1
    if len(texts) < PARALLEL_RENDER_FROM or workers < 2:
        yield map(markdown_to_safe_html, texts)
        return
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        yield pool.map(markdown_to_safe_html, texts, chunksize=200)
    finally:
        pool.shutdown(cancel_futures=True)


def _insert_completions(rows: list[tuple[int, str, str, str]]) -> None:
    """Insert (prompt id, text, html, source model) rows without building model instances.

    On large imports the ORM's per-object work costs more than the database's; the
    constant columns are prepared by their fields so every backend gets its own format.
    """
    meta = Completion._meta
    created_at = meta.get_field("created_at").get_db_prep_save(timezone.now(), connection)
    params = meta.get_field("generation_params").get_db_prep_save({}, connection)
    quoted = []
    for name in ("prompt", "text", "html", "source_model", "generation_params", "created_at"):
        model_field = meta.get_field(name)
        assert isinstance(model_field, Field) and model_field.column is not None
        quoted.append(connection.ops.quote_name(model_field.column))
    columns = ", ".join(quoted)
    with connection.cursor() as cursor:
        cursor.executemany(
            f"INSERT INTO {connection.ops.quote_name(meta.db_table)} ({columns}) VALUES (%s, %s, %s, %s, %s, %s)",
            [(*row, params, created_at) for row in rows],
        )


def _write(project: Project, records: list[_ValidRecord], progress: Callable[[int], None] | None) -> ImportResult:
    result = ImportResult()
    texts = [text for record in records for text, _ in record.completions]
    with _rendered(texts) as htmls, transaction.atomic():
        for start in range(0, len(records), BATCH_SIZE):
            batch = records[start : start + BATCH_SIZE]
            prompts = Prompt.objects.bulk_create(
                [
                    Prompt(project=project, messages=r.messages, external_id=r.external_id, metadata=r.metadata)
                    for r in batch
                ]
            )
            rows = [
                (prompt.pk, text, next(htmls), model)
                for prompt, record in zip(prompts, batch, strict=True)
                for text, model in record.completions
            ]
            _insert_completions(rows)
            result.prompts += len(prompts)
            result.completions += len(rows)
            if progress:
                progress(len(batch))
    return result


def prompts_import_records(
    *, project: Project, records: Iterable[Any], progress: Callable[[int], None] | None = None
) -> ImportResult:
    """Import already-parsed records (e.g. a JSON array); problems name the 1-based item number."""
    return _write(project, _validated(project, enumerate(records, start=1)), progress)


def _jsonl_records(lines: Iterable[str | bytes]) -> Iterator[tuple[int, Any]]:
    for number, raw in enumerate(lines, start=1):
        try:
            text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        except UnicodeDecodeError:
            yield number, _Invalid("", "is not valid UTF-8")
            continue
        if not text.strip():
            continue
        try:
            yield number, json.loads(text)
        except json.JSONDecodeError as error:
            yield number, _Invalid("", f"is not valid JSON ({error.msg} at column {error.colno})")


def prompts_import_jsonl(
    *, project: Project, lines: Iterable[str | bytes], progress: Callable[[int], None] | None = None
) -> ImportResult:
    """Import a JSONL stream (one object per line, DESIGN.md "Import"); blank lines are ignored."""
    return _write(project, _validated(project, _jsonl_records(lines)), progress)


def _csv_records(lines: Iterable[str]) -> Iterator[tuple[int, Any]]:
    reader = csv.DictReader(lines)
    columns = reader.fieldnames or []
    if "prompt" not in columns:
        yield 1, _Invalid("prompt", "the header has no 'prompt' column")
        return
    completion_columns = [c for c in columns if c.startswith("completion")]
    others = [c for c in columns if c not in completion_columns and c not in ("prompt", "id")]
    for row in reader:
        line = reader.line_num
        if None in row:
            yield line, _Invalid("", "has more cells than the header has columns")
            continue
        record: dict[str, Any] = {"prompt": row["prompt"] or ""}
        if row.get("id"):
            record["id"] = row["id"]
        record["completions"] = [row[c] for c in completion_columns if row[c]]
        if others:
            record["metadata"] = {c: row[c] for c in others if row[c] is not None}
        yield line, record


def prompts_import_csv(
    *, project: Project, lines: Iterable[str], progress: Callable[[int], None] | None = None
) -> ImportResult:
    """Import CSV: a `prompt` column, optional `id`, `completion_*` columns; other columns become metadata."""
    return _write(project, _validated(project, _csv_records(lines)), progress)


def text_lines(binary: BinaryIO) -> io.TextIOWrapper:
    """Decode an uploaded or opened binary file as UTF-8 text lines (CSV needs universal newlines)."""
    return io.TextIOWrapper(binary, encoding="utf-8", newline="")
