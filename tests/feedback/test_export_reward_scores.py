"""The newest reward model's score beside each completion: in the admin's list and, when asked, in exports."""

import json

import pyarrow.parquet as pq
import pytest
from django.core.management import call_command
from rest_framework.test import APIClient

from feedback.models import CompletionScore, ModelVersion
from feedback.selectors.preferences import PreferenceExportOptions, preference_rows
from feedback.services.exports import export_schema
from tests.factories import CompletionFactory, ProjectFactory, PromptFactory, UserFactory
from tests.feedback.export_helpers import compare, fast_password_hashing, make_prompt, rank

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _fast_hashing(settings):
    fast_password_hashing(settings)


@pytest.fixture
def project():
    """Two rankings and a pairwise judgement; an older and a newer reward model, the newer one not done scoring."""
    project = ProjectFactory(slug="scored")
    one, two = UserFactory(username="one"), UserFactory(username="two")
    prompt, (a, b, c) = make_prompt(project, k=3)
    rank(one, prompt, [[a], [b], [c]])
    rank(two, prompt, [[b], [a, c]])
    other = PromptFactory(project=project)
    x, y = CompletionFactory(prompt=other, text="x"), CompletionFactory(prompt=other, text="y")
    compare(one, x, y, "a")
    older = ModelVersion.objects.create(project=project, name="reward-1", weights_path="scored/r1", kind="reward")
    newer = ModelVersion.objects.create(project=project, name="reward-2", weights_path="scored/r2", kind="reward")
    for completion in (a, b, c, x, y):
        CompletionScore.objects.create(completion=completion, reward_model=older, score=-9.0)
    for completion, score in ((a, 1.5), (b, -0.25), (x, 2.0)):  # c and y not scored yet
        CompletionScore.objects.create(completion=completion, reward_model=newer, score=score)
    project.scores = {a.pk: 1.5, b.pk: -0.25, c.pk: None, x.pk: 2.0, y.pk: None}
    return project


def export(project, **options):
    return list(preference_rows(project=project, options=PreferenceExportOptions(**options)))


def test_dpo_rows_carry_the_newest_reward_models_score_of_both_sides(project):
    rows = export(project, format="dpo", reward_scores=True)
    assert rows
    for row in rows:
        assert list(row)[-2:] == ["chosen_reward", "rejected_reward"]
        assert row["chosen_reward"] == project.scores[row["chosen_id"]]
        assert row["rejected_reward"] == project.scores[row["rejected_id"]]
    assert [{k: v for k, v in row.items() if not k.endswith("_reward")} for row in rows] == export(project)


@pytest.mark.parametrize("export_format", ["grpo", "judgements"])
def test_group_and_judgement_rows_carry_a_score_beside_each_completion_id(project, export_format):
    rows = export(project, format=export_format, reward_scores=True)
    assert rows
    for row in rows:
        assert row["reward_scores"] == [project.scores[cid] for cid in row["completion_ids"]]
    assert [{k: v for k, v in row.items() if k != "reward_scores"} for row in rows] == export(
        project, format=export_format
    )


@pytest.mark.parametrize("export_format", ["dpo", "grpo", "judgements"])
def test_the_command_the_api_and_parquet_give_the_same_scored_rows(project, export_format, tmp_path, staff_user):
    options = PreferenceExportOptions(format=export_format, reward_scores=True)
    expected = list(preference_rows(project=project, options=options))
    jsonl, parquet = tmp_path / "out.jsonl", tmp_path / "out.parquet"
    for out in (jsonl, parquet):
        call_command("export_preferences", "scored", "--format", export_format, "--reward-scores", "--out", str(out))
    assert [json.loads(line) for line in jsonl.read_text().splitlines()] == expected
    table = pq.read_table(parquet)
    assert table.schema.equals(export_schema(options=options))
    assert table.to_pylist() == expected

    client = APIClient()
    client.force_login(staff_user)
    response = client.get("/api/v1/projects/scored/export/", {"format": export_format, "reward_scores": "true"})
    assert response.status_code == 200
    assert [json.loads(line) for line in b"".join(response.streaming_content).splitlines()] == expected


def test_without_a_reward_model_the_scores_are_null(project):
    ModelVersion.objects.filter(kind="reward").delete()
    rows = export(project, format="grpo", reward_scores=True)
    assert rows and all(set(row["reward_scores"]) == {None} for row in rows)


def test_the_admin_lists_each_completions_score_by_its_projects_newest_reward_model(project, client, staff_user):
    elsewhere = ProjectFactory(slug="unscored")
    CompletionFactory(prompt=PromptFactory(project=elsewhere), text="no reward model here")
    client.force_login(staff_user)

    page = client.get("/admin/feedback/completion/", {"o": "6"}).content.decode()  # by the reward column

    assert '<th scope="col" class="sortable column-reward' in page
    assert "1.500" in page and "-0.250" in page and "2.000" in page
    assert "-9.000" not in page  # the older reward model's scores are not shown
