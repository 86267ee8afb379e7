"""Importing prompts (and optional completions) into a project, all or nothing.

Every record is validated before anything is written; a file with any bad record imports
nothing and every problem names its line (or item) and field.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import multiprocessing
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import connection, transaction
from django.db.models import CharField, Field, QuerySet
from django.utils import timezone

from feedback.models import Completion, Project, Prompt, RoundPrompt
from feedback.rendering import markdown_to_safe_html
from feedback.selectors.gold import GoldError, gold_check, imported_completion_ids
from feedback.services.rounds import round_of_imported_completions

ROLES = ("system", "user", "assistant")
MAX_PROBLEMS = 50
BATCH_SIZE = 2000
PARALLEL_RENDER_FROM = 20_000  # completions; below this, starting worker processes costs more than it saves


def _column_length(field: Any) -> int:
    assert isinstance(field, CharField) and field.max_length is not None
    return field.max_length


MAX_ID_CHARS = _column_length(Prompt._meta.get_field("external_id"))
# Metadata is labels, not documents; the database's JSON check (SQLite's json_valid) refuses
# nesting beyond 1,000 levels, and a walk that deep costs more than labels ever need.
MAX_METADATA_DEPTH = 32


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
    split: str | None = None  # "train" or "eval"; None when the record does not say
    gold: dict[str, Any] | None = None  # the known answer over the record's completions (selectors/gold.py)


class _Invalid(Exception):
    def __init__(self, field_name: str, message: str) -> None:
        self.field = field_name
        self.message = message


def _check_text(value: str, where: str, *, limit: int | None = None, setting: str = "") -> None:
    """Refuse text the pages could not show or the database could not store, and text over its limit."""
    if limit is not None and len(value) > limit:
        raise _Invalid(where, f"is {len(value):,} characters long; at most {limit:,} are allowed ({setting})")
    if "\x00" in value:
        raise _Invalid(where, f"holds a NUL character (\\u0000) at character {value.index(chr(0)) + 1}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise _Invalid(
            where,
            f"holds a lone surrogate (\\u{ord(value[error.start]):04x}) at character {error.start + 1}, "
            "which is not valid Unicode text",
        ) from None


def _validate_messages(value: Any) -> list[dict[str, str]]:
    limit = settings.RANKWISE_MAX_PROMPT_CHARS
    if isinstance(value, str):
        _check_text(value, "prompt", limit=limit, setting="RANKWISE_MAX_PROMPT_CHARS")
        if not value.strip():
            raise _Invalid("prompt", "is empty")
        return [{"role": "user", "content": value}]
    if not isinstance(value, list):
        raise _Invalid("prompt", "must be a string or a list of {role, content} messages")
    if not value:
        raise _Invalid("prompt", "has no messages")
    messages = []
    total = 0
    for i, message in enumerate(value):
        where = f"prompt[{i}]"
        if not isinstance(message, dict):
            raise _Invalid(where, "must be an object with 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or role not in ROLES:
            # repr() escapes what a page cannot show; only a short piece of a string is echoed
            got = (
                repr(role[:40]) if isinstance(role, str) else "missing" if role is None else f"a {type(role).__name__}"
            )
            raise _Invalid(f"{where}.role", f"must be one of {', '.join(ROLES)}; it is {got}")
        if not isinstance(content, str):
            raise _Invalid(f"{where}.content", "must be a string")
        total += len(content)
        if total > limit:
            raise _Invalid(
                "prompt",
                f"has more than {limit:,} characters in its messages (RANKWISE_MAX_PROMPT_CHARS)",
            )
        _check_text(content, f"{where}.content")
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
        _check_text(
            model,
            f"{where}.model",
            limit=settings.RANKWISE_MAX_MODEL_NAME_CHARS,
            setting="RANKWISE_MAX_MODEL_NAME_CHARS",
        )
        where = f"{where}.text"
    else:
        text, model = value, ""
    if not isinstance(text, str):
        raise _Invalid(where, "must be a string or an object with 'text'")
    _check_text(text, where, limit=settings.RANKWISE_MAX_COMPLETION_CHARS, setting="RANKWISE_MAX_COMPLETION_CHARS")
    if not text.strip():
        raise _Invalid(where, "is empty")
    return text, model


def _validate_external_id(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        # Checked before str(): Python refuses to convert an integer of more than 4,300 digits.
        if not -(10**MAX_ID_CHARS) < value < 10**MAX_ID_CHARS:
            raise _Invalid("id", f"is a number too long for an id; ids have at most {MAX_ID_CHARS} characters")
        value = str(value)
    if not isinstance(value, str) or len(value) > MAX_ID_CHARS:
        raise _Invalid("id", f"must be a string of at most {MAX_ID_CHARS} characters")
    _check_text(value, "id")
    return value


def _validate_metadata(metadata: dict[str, Any]) -> None:
    """Every key and value a JSON column holds and every page can show, walked without recursion."""
    pending: list[tuple[str, Any, int]] = [("metadata", metadata, 1)]
    while pending:
        where, value, depth = pending.pop()
        if isinstance(value, str):
            _check_text(value, where)
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise _Invalid(where, f"must be a finite number, not {value}")
        elif isinstance(value, int) and not isinstance(value, bool):
            # Three bits a digit undercounts (log2(10) = 3.32), so whatever passes converts to text when stored.
            if value.bit_length() > sys.get_int_max_str_digits() * 3:
                raise _Invalid(where, "is a number too large to store")
        elif isinstance(value, dict | list):
            if depth > MAX_METADATA_DEPTH:
                raise _Invalid(where, f"is nested more than {MAX_METADATA_DEPTH} levels deep")
            if isinstance(value, dict):
                for key, item in value.items():
                    if not isinstance(key, str):
                        raise _Invalid(where, f"has a key that is not a string (a {type(key).__name__})")
                    _check_text(key, f"{where} key {key[:40]!r}")
                    pending.append((f"{where}.{key}", item, depth + 1))
            else:
                pending.extend((f"{where}[{i}]", item, depth + 1) for i, item in enumerate(value))
        elif value is not None and not isinstance(value, bool):
            raise _Invalid(
                where, f"must be JSON (a string, number, true/false, null, list or object), not {type(value).__name__}"
            )


def _validate_split(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or value not in Prompt.Split.values:
        got = repr(value[:40]) if isinstance(value, str) else f"a {type(value).__name__}"
        raise _Invalid("split", f"must be 'train' or 'eval'; it is {got}")
    return value


def _validate_record(record: Any) -> _ValidRecord:
    if not isinstance(record, dict):
        raise _Invalid("", "must be a JSON object")
    if "prompt" not in record:
        raise _Invalid("prompt", "is missing")
    unknown = set(record) - {"prompt", "completions", "id", "metadata", "split", "gold"}
    if unknown:
        name = sorted(str(key) for key in unknown)[0]
        _check_text(name, "field name")
        raise _Invalid(name[:100], "is not a known field (prompt, completions, id, metadata, split, gold)")
    messages = _validate_messages(record["prompt"])
    completions = record.get("completions") or []
    if not isinstance(completions, list):
        raise _Invalid("completions", "must be a list")
    most = settings.RANKWISE_MAX_COMPLETIONS
    if len(completions) > most:
        raise _Invalid(
            "completions",
            f"has {len(completions):,} completions; at most {most:,} are allowed (RANKWISE_MAX_COMPLETIONS)",
        )
    external_id = _validate_external_id(record.get("id", ""))
    metadata = record.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise _Invalid("metadata", "must be an object")
    _validate_metadata(metadata)
    split = _validate_split(record.get("split"))
    try:
        gold = gold_check(record.get("gold"), completions=len(completions))
    except GoldError as error:
        raise _Invalid("gold", str(error)) from None
    if gold is not None and split == Prompt.Split.EVAL:
        raise _Invalid("gold", "an evaluation prompt gets no ordinary tasks, so a gold answer on it is never asked")
    return _ValidRecord(
        messages=messages,
        external_id=external_id,
        metadata=metadata,
        completions=[_validate_completion(c, i) for i, c in enumerate(completions)],
        split=split,
        gold=gold,
    )


def prompt_split_drawn(*, messages: list[dict[str, str]], eval_share: float) -> str:
    """The split of a prompt whose record did not say: ``eval`` for a share ``eval_share`` of prompts.

    Drawn from a hash of the prompt's messages, not at random: the same prompt falls on the same side
    in every import (a prompt imported twice cannot be trained on and evaluated on), and an import
    run again gives the same splits.
    """
    if eval_share <= 0:
        return Prompt.Split.TRAIN
    digest = hashlib.sha256(json.dumps(messages, sort_keys=True, ensure_ascii=False).encode("utf-8")).digest()
    draw = int.from_bytes(digest[:8], "big") / 2**64  # uniform in [0, 1)
    return Prompt.Split.EVAL if draw < eval_share else Prompt.Split.TRAIN


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


def prompt_check(*, messages: Any, external_id: str, metadata: Any) -> list[dict[str, str]]:
    """The import's checks on a prompt written another way (the Django admin); its messages as stored.

    Raises a ValidationError that names each field at fault, in the import's words.
    """
    errors: dict[str, str] = {}
    checked: list[dict[str, str]] = []
    try:
        checked = _validate_messages(messages)
    except _Invalid as invalid:  # what a record calls "prompt" is the model's "messages"
        errors["messages"] = f"messages{invalid.field.removeprefix('prompt')} {invalid.message}"
    try:
        _validate_external_id(external_id)
    except _Invalid as invalid:
        errors["external_id"] = f"external_id {invalid.message}"
    try:
        if not isinstance(metadata or {}, dict):
            raise _Invalid("metadata", "must be an object")
        _validate_metadata(metadata or {})
    except _Invalid as invalid:
        errors["metadata"] = f"{invalid.field} {invalid.message}"
    if errors:
        raise ValidationError(errors)
    return checked


def prompts_split_set(*, prompts: QuerySet[Prompt], split: str) -> int:
    """Mark prompts as evaluation or training prompts; returns how many changed.

    A prompt marked for evaluation leaves training data at once: snapshots and training exports
    read the split when they run, so its earlier judgements are no longer trained on.
    """
    if split not in Prompt.Split.values:
        raise ValidationError({"split": f"must be 'train' or 'eval'; it is {split!r}"})
    return prompts.exclude(split=split).update(split=split)


def prompt_gold_set(*, prompt: Prompt, gold: Any) -> Prompt:
    """Give a training prompt its known answer over the completions it was imported with; None takes it away.

    A mistake is a ValidationError keyed ``gold`` and changes nothing."""
    if gold is not None and prompt.split == Prompt.Split.EVAL:
        raise ValidationError(
            {"gold": "an evaluation prompt gets no ordinary tasks, so a gold answer on it is never asked"}
        )
    _, imported = imported_completion_ids(prompt_ids=[prompt.pk]).get(prompt.pk, (0, []))
    try:
        stored = gold_check(gold, completions=len(imported))
    except GoldError as error:
        raise ValidationError({"gold": str(error)}) from None
    Prompt.objects.filter(pk=prompt.pk).update(gold=stored)
    prompt.gold = stored
    return prompt


def completion_check(*, text: str, source_model: str) -> None:
    """The import's checks on a completion written another way (the Django admin), before completion_save.

    Raises a ValidationError that names each field at fault, in the import's words.
    """
    errors: dict[str, str] = {}
    limits = {
        "text": (text, settings.RANKWISE_MAX_COMPLETION_CHARS, "RANKWISE_MAX_COMPLETION_CHARS"),
        "source_model": (source_model, settings.RANKWISE_MAX_MODEL_NAME_CHARS, "RANKWISE_MAX_MODEL_NAME_CHARS"),
    }
    for name, (value, limit, setting) in limits.items():
        try:
            _check_text(value, name, limit=limit, setting=setting)
        except _Invalid as invalid:
            errors[name] = f"{name} {invalid.message}"
    if errors:
        raise ValidationError(errors)


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


def _insert_completions(round_id: int, rows: list[tuple[int, str, str, str]]) -> None:
    """Insert (prompt id, text, html, source model) rows of one round without building model instances.

    On large imports the ORM's per-object work costs more than the database's; the
    constant columns are prepared by their fields so every backend gets its own format.
    """
    meta = Completion._meta
    created_at = meta.get_field("created_at").get_db_prep_save(timezone.now(), connection)
    params = meta.get_field("generation_params").get_db_prep_save({}, connection)
    quoted = []
    for name in ("prompt", "text", "html", "source_model", "round", "generation_params", "created_at"):
        model_field = meta.get_field(name)
        assert isinstance(model_field, Field) and model_field.column is not None
        quoted.append(connection.ops.quote_name(model_field.column))
    columns = ", ".join(quoted)
    with connection.cursor() as cursor:
        cursor.executemany(
            f"INSERT INTO {connection.ops.quote_name(meta.db_table)} ({columns}) VALUES (%s, %s, %s, %s, %s, %s, %s)",
            [(*row, round_id, params, created_at) for row in rows],
        )


def _write(project: Project, records: list[_ValidRecord], progress: Callable[[int], None] | None) -> ImportResult:
    """Write the prompts; the completions that came with them make a round of their own, the project's newest.

    An evaluation prompt's completions are stored but not put in that round's queue: evaluation prompts
    get no ordinary tasks."""
    result = ImportResult()
    share = project.eval_prompt_share
    for record in records:
        record.split = record.split or prompt_split_drawn(messages=record.messages, eval_share=share)
    texts = [text for record in records for text, _ in record.completions]
    with _rendered(texts) as htmls, transaction.atomic():
        answered = [record for record in records if record.completions and record.split == Prompt.Split.TRAIN]
        writers = sorted({model for record in records for _, model in record.completions} - {""})
        imported = (
            round_of_imported_completions(project=project, writers=writers, prompts=len(answered)) if texts else None
        )
        for start in range(0, len(records), BATCH_SIZE):
            batch = records[start : start + BATCH_SIZE]
            prompts = Prompt.objects.bulk_create(
                [
                    Prompt(
                        project=project,
                        messages=r.messages,
                        external_id=r.external_id,
                        metadata=r.metadata,
                        split=r.split or Prompt.Split.TRAIN,  # drawn above; the default never applies
                        gold=r.gold,
                    )
                    for r in batch
                ]
            )
            rows = [
                (prompt.pk, text, next(htmls), model)
                for prompt, record in zip(prompts, batch, strict=True)
                for text, model in record.completions
            ]
            if imported is not None:
                _insert_completions(imported.pk, rows)
                RoundPrompt.objects.bulk_create(
                    RoundPrompt(round=imported, prompt=prompt)
                    for prompt, record in zip(prompts, batch, strict=True)
                    if record.completions and record.split == Prompt.Split.TRAIN
                )
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


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _parse_int(digits: str) -> int:
    # Python converts at most this many digits to an int; its own error names a setting of Python's.
    if len(digits.lstrip("-")) > sys.get_int_max_str_digits():
        most = sys.get_int_max_str_digits()
        raise ValueError(f"a number has {len(digits.lstrip('-')):,} digits; at most {most:,} are read")
    return int(digits)


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
            yield number, json.loads(text, parse_constant=_refuse_constant, parse_int=_parse_int)
        except json.JSONDecodeError as error:
            yield number, _Invalid("", f"is not valid JSON ({error.msg} at column {error.colno})")
        except ValueError as error:  # from the two hooks above
            yield number, _Invalid("", f"is not valid JSON ({error})")
        except RecursionError:
            yield number, _Invalid("", "is nested too deeply to read")


def prompts_import_jsonl(
    *, project: Project, lines: Iterable[str | bytes], progress: Callable[[int], None] | None = None
) -> ImportResult:
    """Import a JSONL stream (one object per line, DESIGN.md "Import"); blank lines are ignored."""
    return _write(project, _validated(project, _jsonl_records(lines)), progress)


def _csv_records(lines: Iterable[str]) -> Iterator[tuple[int, Any]]:
    reader = csv.DictReader(lines)
    try:
        columns = reader.fieldnames or []
    except csv.Error as error:
        yield 1, _Invalid("", f"is not valid CSV ({error})")
        return
    if "prompt" not in columns:
        yield 1, _Invalid("prompt", "the header has no 'prompt' column")
        return
    completion_columns = [c for c in columns if c.startswith("completion")]
    others = [c for c in columns if c not in completion_columns and c not in ("prompt", "id", "split", "gold")]
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as error:  # e.g. a cell over the csv module's field size limit; the next row still reads
            # The DictReader counts only the rows it returned; its csv.reader has counted the bad one too.
            yield reader.reader.line_num, _Invalid("", f"is not valid CSV ({error})")
            continue
        line = reader.line_num
        if None in row:
            yield line, _Invalid("", "has more cells than the header has columns")
            continue
        record: dict[str, Any] = {"prompt": row["prompt"] or ""}
        if row.get("id"):
            record["id"] = row["id"]
        record["completions"] = [row[c] for c in completion_columns if row[c]]
        if row.get("split"):  # an empty cell: the project's share decides
            record["split"] = row["split"]
        if row.get("gold"):  # JSON, as in a JSONL record
            try:
                record["gold"] = json.loads(row["gold"])
            except ValueError:
                yield line, _Invalid("gold", 'must be JSON, like {"choice": "a"} or {"ranking": [[0], [1]]}')
                continue
        if others:
            record["metadata"] = {c: row[c] for c in others if row[c] is not None}
        yield line, record


def prompts_import_csv(
    *, project: Project, lines: Iterable[str], progress: Callable[[int], None] | None = None
) -> ImportResult:
    """Import CSV: a `prompt` column, optional `id`, `split` (train or eval), `gold` (JSON) and `completion_*` columns;
    other columns become metadata."""
    return _write(project, _validated(project, _csv_records(lines)), progress)
