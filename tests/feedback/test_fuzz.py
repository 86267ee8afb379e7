"""Random input for the import parser and the judgement API: a clean refusal or a whole success, never a 500.

Every example counts the rows before and after: a refusal leaves the database as it was, a success adds
exactly what it reports.
"""

import csv
import io
import json
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from django.core.cache import cache
from django.db import transaction
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from rest_framework.test import APIClient

from feedback.api.parsers import TOO_DEEP
from feedback.models import Assignment, Completion, PairwiseJudgement, Prompt, RankedCompletion, RankingJudgement
from feedback.services.assignments import assignment_lease_next
from feedback.services.prompts import (
    PromptImportError,
    prompts_import_csv,
    prompts_import_jsonl,
    prompts_import_records,
)
from tests.factories import CompletionFactory, MembershipFactory, ProjectFactory, PromptFactory, UserFactory

pytestmark = pytest.mark.django_db

FUZZ = settings(
    max_examples=100,
    deadline=None,
    # The fixtures are shared by the examples of one test; each example runs in a rolled-back transaction.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# Any code point, lone surrogates and control characters included (st.text() leaves surrogates out).
any_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=30)
nasty_text = st.one_of(
    any_text,
    st.sampled_from(["\ud800", "a\udfffb", "\x00", "\x1b[31m", "\u202e", "<script>x</script>", " ", "\n"]),
    st.builds(lambda a, b: a + "\ud83d" + b, any_text, any_text),
)
huge_ints = st.sampled_from([63, 64, 200, 400, 4000]).flatmap(lambda e: st.sampled_from([2**e, -(2**e)]))
numbers = st.one_of(
    st.integers(), huge_ints, st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([1e308, -0.0])
)
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), numbers, nasty_text),
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(nasty_text, children, max_size=4)),
    max_leaves=12,
)


def _nested(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


deep = st.integers(1, 60).map(_nested)  # around the metadata's limit of 32 levels


# A good value most of the time and anything at all sometimes, so that whole records often pass
# and validation is reached in every field.
def mostly(good: st.SearchStrategy, bad: st.SearchStrategy) -> st.SearchStrategy:
    return st.integers(0, 5).flatmap(lambda n: bad if n == 0 else good)  # one_of() would weigh them alike


good_text = st.text(min_size=1, max_size=30).filter(str.strip)  # control characters included
clean_json = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False), st.text()),
    lambda children: st.one_of(st.lists(children, max_size=3), st.dictionaries(st.text(), children, max_size=3)),
    max_leaves=8,
)
role = mostly(st.sampled_from(["system", "user", "assistant"]), json_values)
message = st.fixed_dictionaries({"role": role, "content": mostly(good_text, st.one_of(nasty_text, json_values))})
conversation = st.builds(
    lambda turns, last: [*turns, {"role": "user", "content": last}], st.lists(message, max_size=2), good_text
)
completion = mostly(
    st.one_of(good_text, st.fixed_dictionaries({"text": good_text}, optional={"model": good_text})),
    st.one_of(
        nasty_text,
        st.fixed_dictionaries(
            {"text": st.one_of(nasty_text, json_values)}, optional={"model": st.one_of(nasty_text, numbers)}
        ),
        json_values,
    ),
)
records = mostly(
    st.fixed_dictionaries(
        {"prompt": mostly(st.one_of(good_text, conversation), st.one_of(nasty_text, st.lists(message), json_values))},
        optional={
            "completions": mostly(st.lists(completion, max_size=4), json_values),
            "id": mostly(st.uuids().map(str), st.one_of(nasty_text, st.integers(), huge_ints, json_values)),
            "metadata": mostly(
                st.dictionaries(st.text(), clean_json, max_size=3),
                st.one_of(st.dictionaries(nasty_text, st.one_of(json_values, deep), max_size=3), json_values),
            ),
        },
    ),
    st.one_of(st.fixed_dictionaries({"prompt": good_text, "extra": json_values}), json_values),
)
record_lists = st.lists(records, min_size=1, max_size=4)


@contextmanager
def rolled_back() -> Iterator[None]:
    """Each example starts from the same database: the examples of one test share its fixtures."""
    with transaction.atomic():
        yield
        transaction.set_rollback(True)


def counts() -> tuple[int, int]:
    return Prompt.objects.count(), Completion.objects.count()


def outcome(import_, **kwargs) -> None:
    """Run one import: it succeeds and adds what it says, or it refuses with problems and adds nothing."""
    with rolled_back():
        before = counts()
        try:
            result = import_(**kwargs)
        except PromptImportError as error:
            assert error.problems and all(isinstance(p.line, int) and p.message for p in error.problems)
            # A problem is shown on a page and sent as JSON: it never echoes text that cannot be encoded.
            str(error).encode("utf-8")
            assert counts() == before
            event("refused")
        else:
            assert counts() == (before[0] + result.prompts, before[1] + result.completions)
            assert result.prompts >= 1
            event("imported")


@pytest.fixture
def project():
    return ProjectFactory(slug="fuzz")


@FUZZ
@given(batch=record_lists)
def test_records_import_or_are_refused_whole(project, batch):
    outcome(prompts_import_records, project=project, records=batch)


def _jsonl_line(value) -> st.SearchStrategy:
    return st.sampled_from(
        [
            json.dumps(value),  # NaN and Infinity appear as the bare words Python writes for them
            json.dumps(value, ensure_ascii=False),  # lone surrogates as raw text, not escapes
        ]
    )


raw_lines = st.one_of(
    nasty_text,
    st.binary(max_size=40),
    st.sampled_from(
        ["[" * 5000 + "]" * 5000, '{"prompt": "q", "id": ' + "7" * 4400 + "}", '{"prompt": NaN}', "\ufeff{}"]
    ),
)
jsonl_lines = st.lists(mostly(records.flatmap(_jsonl_line), raw_lines), min_size=1, max_size=4)


@FUZZ
@given(lines=jsonl_lines)
def test_jsonl_imports_or_is_refused_whole(project, lines):
    outcome(prompts_import_jsonl, project=project, lines=lines)


def _csv_text(rows: list[list[str]]) -> list[str]:
    out = io.StringIO()
    csv.writer(out).writerows(rows)
    return out.getvalue().splitlines(keepends=True)


header = mostly(
    st.lists(st.sampled_from(["id", "completion_1", "completion_2", "topic"]), unique=True).map(
        lambda columns: ["prompt", *columns]
    ),
    st.lists(any_text, max_size=5),
)
cell = mostly(good_text, nasty_text)
csv_lines = mostly(
    header.flatmap(
        lambda columns: st.lists(st.lists(cell, min_size=len(columns), max_size=len(columns)), max_size=4).map(
            lambda rows: _csv_text([columns, *rows])
        )
    ),
    st.lists(nasty_text, max_size=5),
)


@FUZZ
@given(lines=csv_lines)
def test_csv_imports_or_is_refused_whole(project, lines):
    outcome(prompts_import_csv, project=project, lines=lines)


def _body(value) -> st.SearchStrategy:
    return st.sampled_from(
        [json.dumps(value).encode(), json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")]
    )


api_bodies = mostly(
    record_lists.map(lambda r: {"records": r}).flatmap(_body),
    st.one_of(json_values.flatmap(_body), st.binary(max_size=60)),
)


@pytest.fixture
def staff_client(staff_user) -> APIClient:
    client = APIClient()
    client.force_authenticate(staff_user)
    return client


@FUZZ
@given(body=api_bodies)
def test_the_import_api_answers_201_or_400_and_never_writes_half(project, staff_client, body):
    cache.clear()  # the import shares the "submit" throttle, which is not what is tested here
    with rolled_back():
        before = counts()
        response = staff_client.post(f"/api/v1/projects/{project.slug}/prompts/", body, content_type="application/json")
        if response.status_code == 201:
            created = response.json()
            assert counts() == (before[0] + created["prompts"], before[1] + created["completions"])
            # What was imported can be shown: the newest prompts and completions list as JSON.
            for listing in ("prompts", "completions"):
                shown = staff_client.get(f"/api/v1/projects/{project.slug}/{listing}/?ordering=-id")
                assert shown.status_code == 200
                shown.content.decode("utf-8")
            event("imported")
        else:
            assert response.status_code == 400, response.content[:500]
            assert response.json()["problems"]
            assert counts() == before


def _grouped(order: list[int], cuts: list[bool]) -> list[list[int]]:
    """The ids in this order, in groups of tied ones: a True cut starts a new group."""
    groups = [[order[0]]]
    for completion_id, cut in zip(order[1:], cuts, strict=True):
        if cut:
            groups.append([completion_id])
        else:
            groups[-1].append(completion_id)
    return groups


def rankings(ids: list[int]) -> st.SearchStrategy:
    return st.permutations(ids).flatmap(
        lambda order: st.lists(st.booleans(), min_size=len(ids) - 1, max_size=len(ids) - 1).map(
            lambda cuts: _grouped(list(order), cuts)
        )
    )


def judgement_bodies(*, task_id: int, kind: str, ids: list[int]) -> st.SearchStrategy:
    junk = st.one_of(nasty_text, numbers, json_values)
    ranked_ids = st.one_of(st.sampled_from(ids), st.integers(), huge_ints)
    fields = {
        "task_id": mostly(st.just(task_id), st.one_of(st.integers(), huge_ints, junk)),
        "client_uuid": mostly(st.uuids().map(str), junk),
        "kind": mostly(st.just(kind), st.one_of(st.sampled_from(["pairwise", "ranking"]), junk)),
    }
    optional = {
        "rationale": mostly(st.text(max_size=50), junk),
        "time_ms": mostly(st.integers(0, 10**6), junk),
    }
    if kind == "pairwise":
        fields["choice"] = mostly(st.sampled_from(["a", "b", "tie", "both_bad"]), junk)
        optional["strength"] = mostly(st.sampled_from(["slight", "clear", ""]), junk)
    else:
        fields["ranking"] = mostly(
            rankings(ids), st.one_of(st.lists(st.lists(ranked_ids, max_size=5), max_size=5), junk)
        )
    bodies = st.fixed_dictionaries(fields, optional=optional)
    return mostly(bodies.flatmap(_body), st.one_of(json_values.flatmap(_body), st.binary(max_size=60)))


def judgement_rows() -> tuple[int, ...]:
    return (
        PairwiseJudgement.objects.count(),
        RankingJudgement.objects.count(),
        RankedCompletion.objects.count(),
        Assignment.objects.filter(state=Assignment.State.DONE).count(),
    )


@pytest.fixture
def world(mode) -> dict:
    """A project of 3 completions a prompt and an annotator who may judge it."""
    project = ProjectFactory(slug=f"fuzz-{mode}", mode=mode, completions_per_prompt=3, overlap=1)
    for _ in range(3):
        CompletionFactory.create_batch(3, prompt=PromptFactory(project=project))
    annotator = MembershipFactory(project=project, user=UserFactory()).user
    client = APIClient()
    client.force_authenticate(annotator)
    return {"project": project, "annotator": annotator, "client": client}


@pytest.mark.parametrize("mode", ["pairwise", "ranking"])
@FUZZ
@given(data=st.data())
def test_the_judgement_api_answers_201_200_or_400_and_never_writes_half(mode, world, data):
    cache.clear()  # the submit throttle is not what is tested here
    url = f"/api/v1/projects/{world['project'].slug}/judgements/"
    with rolled_back():
        task = assignment_lease_next(project=world["project"], annotator=world["annotator"])
        assert task is not None
        assignment = task.assignment
        ids = sorted(assignment.display_order)  # sorted: the display order is random, a replayed example is not
        body = data.draw(judgement_bodies(task_id=assignment.pk, kind=mode, ids=ids))
        before = judgement_rows()
        response = world["client"].post(url, body, content_type="application/json")
        after = judgement_rows()
        if response.status_code == 201:
            pairwise, ranking, ranked, done = (a - b for a, b in zip(after, before, strict=True))
            assert (pairwise, ranking, done) == ((1, 0, 1) if mode == "pairwise" else (0, 1, 1))
            assert ranked == (0 if mode == "pairwise" else len(ids))
            event("judged")
            if data.draw(st.booleans(), label="sent again"):
                again = world["client"].post(url, body, content_type="application/json")
                assert again.status_code == 200
                # The same judgement; the order of ids inside a tied group is not part of it (the first
                # answer echoes the request's order, the repeat the stored one).
                first, repeat = response.json(), again.json()
                if mode == "ranking":
                    assert [set(g) for g in repeat.pop("ranking")] == [set(g) for g in first.pop("ranking")]
                assert repeat == first
                assert judgement_rows() == after
        else:
            assert response.status_code == 400, response.content[:500]
            assert after == before


def test_an_import_nested_5000_deep_is_a_400(staff_client, project):
    body = '{"records": ' + "[" * 5000 + "]" * 5000 + "}"
    response = staff_client.post(f"/api/v1/projects/{project.slug}/prompts/", body, content_type="application/json")
    assert response.status_code == 400
    assert response.json()["problems"] == [{"line": 0, "field": "body", "message": TOO_DEEP}]
    assert Prompt.objects.count() == 0


@pytest.mark.parametrize("mode", ["pairwise"])
def test_a_judgement_nested_5000_deep_is_a_400(world):
    body = '{"ranking": ' + "[" * 5000 + "]" * 5000 + "}"
    url = f"/api/v1/projects/{world['project'].slug}/judgements/"
    response = world["client"].post(url, body, content_type="application/json")
    assert response.status_code == 400
    assert response.json() == {"detail": TOO_DEEP}
    assert judgement_rows() == (0, 0, 0, 0)


@pytest.mark.parametrize("mode", ["pairwise"])
@pytest.mark.parametrize(
    ("field", "message"),
    [
        ("kind", "Not a valid choice; use one of pairwise, ranking."),
        ("choice", "Not a valid choice; use one of a, b, tie, both_bad."),
        ("strength", "Not a valid choice; use one of slight, clear."),
    ],
)
def test_a_choice_that_cannot_be_encoded_is_a_400_naming_the_valid_ones(world, field, message):
    # Found by the fuzz above: DRF's message echoed the lone surrogate, and rendering the 400 failed.
    body = {"task_id": 1, "client_uuid": "5bc8fbbc-bde5-4099-9164-d8399f767c45", "kind": "pairwise", "choice": "a"}
    raw = json.dumps({**body, field: "\ud800"})
    url = f"/api/v1/projects/{world['project'].slug}/judgements/"
    response = world["client"].post(url, raw, content_type="application/json")
    assert response.status_code == 400
    assert response.json()[field] == [message]
    assert judgement_rows() == (0, 0, 0, 0)
