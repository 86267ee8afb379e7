"""Exports say which completions the length limit cut: per side in dpo, per completion in grpo and judgements."""

import json

import pyarrow.parquet as pq
import pytest
from django.core.management import call_command

from tests.factories import CompletionFactory, ProjectFactory, PromptFactory, UserFactory
from tests.feedback.export_helpers import compare, fast_password_hashing, rank

pytestmark = pytest.mark.django_db

CUT = {"temperature": 0.8, "top_p": 0.95, "max_new_tokens": 192, "new_tokens": 192, "truncated": True}
ENDED = {**CUT, "new_tokens": 40, "truncated": False}


@pytest.fixture
def project(settings):
    fast_password_hashing(settings)
    project = ProjectFactory(slug="cuts")
    prompt = PromptFactory(project=project)
    long = CompletionFactory(prompt=prompt, text="A long answer", generation_params=CUT)
    short = CompletionFactory(prompt=prompt, text="Short.", generation_params=ENDED)
    imported = CompletionFactory(prompt=prompt, text="Imported.", generation_params={})  # no flag: not cut
    rank(UserFactory(), prompt, [[short], [long], [imported]])
    compare(UserFactory(), long, short, "a")
    return project, long, short, imported


def export(slug, tmp_path, fmt, ext):
    out = tmp_path / f"out.{ext}"
    call_command("export_preferences", slug, "--format", fmt, "--out", str(out))
    if ext == "jsonl":
        return [json.loads(line) for line in out.read_text().splitlines()]
    return pq.read_table(out).to_pylist()


@pytest.mark.parametrize("ext", ["jsonl", "parquet"])
def test_dpo_rows_flag_each_side(project, tmp_path, ext):
    _, long, short, imported = project
    flags = {
        (r["chosen_id"], r["rejected_id"]): (r["chosen_truncated"], r["rejected_truncated"])
        for r in export("cuts", tmp_path, "dpo", ext)
    }
    assert flags == {(short.pk, imported.pk): (False, False), (long.pk, imported.pk): (True, False)}


@pytest.mark.parametrize("ext", ["jsonl", "parquet"])
def test_grpo_and_judgement_rows_flag_each_completion(project, tmp_path, ext):
    _, long, short, imported = project
    cut = {long.pk: True, short.pk: False, imported.pk: False}
    [grpo] = export("cuts", tmp_path, "grpo", ext)
    assert grpo["truncated"] == [cut[cid] for cid in grpo["completion_ids"]]
    judgements = export("cuts", tmp_path, "judgements", ext)
    assert len(judgements) == 2
    for row in judgements:
        assert row["truncated"] == [cut[cid] for cid in row["completion_ids"]]
