"""Evaluation prompts: chosen at import (a record's split, a CSV column, the project's share) or by staff,
and kept out of training snapshots, training exports and ordinary rounds."""

import io
import json
import uuid
from collections import Counter

import pytest
from django.contrib.messages import get_messages
from django.core.management import call_command
from rest_framework.test import APIClient

from feedback.models import Membership, Project, Round, RoundPrompt
from feedback.selectors.preferences import PreferenceExportOptions, preference_rows
from feedback.selectors.tasks import judgements_left
from feedback.services.assignments import assignment_lease_next
from feedback.services.generation import (
    completions_generate,
    prompts_by_uncertainty,
    prompts_lacking_completions,
    round_write,
)
from feedback.services.judgements import JudgementSubmission, judgement_submit
from feedback.services.prompts import (
    PromptImportError,
    prompt_split_drawn,
    prompts_import_csv,
    prompts_import_jsonl,
    prompts_import_records,
)
from feedback.services.rounds import round_request
from feedback.services.training_runs import run_dir, training_run_start
from tests.factories import CompletionFactory, MembershipFactory, ProjectFactory, PromptFactory
from tests.feedback.export_helpers import rank

pytestmark = pytest.mark.django_db


def jsonl(*records) -> list[str]:
    return [json.dumps(record) for record in records]


def splits(project) -> dict[str, str]:
    return dict(project.prompts.values_list("external_id", "split"))


def test_a_record_says_its_split_and_one_that_does_not_is_a_training_prompt():
    project = ProjectFactory()
    prompts_import_jsonl(
        project=project,
        lines=jsonl(
            {"prompt": "Held back?", "id": "e", "split": "eval"},
            {"prompt": "Trained on?", "id": "t", "split": "train"},
            {"prompt": "Not said?", "id": "n"},
        ),
    )
    assert splits(project) == {"e": "eval", "t": "train", "n": "train"}


@pytest.mark.parametrize("value", ["test", "EVAL", "", 1, None])
def test_a_wrong_split_names_its_line_and_field_and_imports_nothing(value):
    project = ProjectFactory()
    record = {"prompt": "Bad split?", "split": value}
    if value is None:  # JSON null is no split at all: the project's share decides
        prompts_import_jsonl(project=project, lines=jsonl(record))
        assert project.prompts.get().split == "train"
        return
    with pytest.raises(PromptImportError) as error:
        prompts_import_jsonl(project=project, lines=jsonl({"prompt": "Fine?"}, record))
    [problem] = error.value.problems
    assert (problem.line, problem.field) == (2, "split")
    assert "must be 'train' or 'eval'" in problem.message
    assert not project.prompts.exists()


def test_a_csv_split_column_is_read_and_checked():
    project = ProjectFactory()
    rows = "prompt,id,split,topic\nFirst?,a,eval,x\nSecond?,b,train,y\nThird?,c,,z\n"
    prompts_import_csv(project=project, lines=io.StringIO(rows))
    assert splits(project) == {"a": "eval", "b": "train", "c": "train"}
    assert project.prompts.get(external_id="a").metadata == {"topic": "x"}  # split is not metadata

    other = ProjectFactory()
    with pytest.raises(PromptImportError) as error:
        prompts_import_csv(project=other, lines=io.StringIO("prompt,split\nFine?,train\nBad?,evaluation\n"))
    assert [(p.line, p.field) for p in error.value.problems] == [(3, "split")]
    assert "'evaluation'" in error.value.problems[0].message
    assert not other.prompts.exists()


def test_the_import_api_takes_split_and_refuses_a_wrong_one(staff_user):
    project = ProjectFactory(slug="alpha")
    client = APIClient()
    client.force_authenticate(staff_user)
    url = "/api/v1/projects/alpha/prompts/"

    bad = client.post(url, {"records": [{"prompt": "A?"}, {"prompt": "B?", "split": "holdout"}]}, format="json")
    assert bad.status_code == 400
    assert [(p["line"], p["field"]) for p in bad.json()["problems"]] == [(2, "split")]
    assert not project.prompts.exists()

    good = client.post(url, {"records": [{"prompt": "A?", "split": "eval"}, {"prompt": "B?"}]}, format="json")
    assert good.status_code == 201
    listed = client.get(url).json()["results"]
    assert [row["split"] for row in listed] == ["eval", "train"]


def test_the_project_share_draws_from_a_hash_of_the_messages():
    project = ProjectFactory(eval_prompt_share=0.3)
    records = [{"prompt": f"Question {i}?", "id": str(i)} for i in range(400)]
    records[0]["split"] = "train"  # a record that says its split is never drawn
    records[1]["split"] = "eval"
    prompts_import_records(project=project, records=records)

    drawn = splits(project)
    assert (drawn["0"], drawn["1"]) == ("train", "eval")
    assert 0.22 < Counter(drawn.values())["eval"] / len(drawn) < 0.38
    # The same prompt falls on the same side in another project with the same share, and 0 draws none.
    again = ProjectFactory(eval_prompt_share=0.3)
    prompts_import_records(project=again, records=[{"prompt": f"Question {i}?", "id": str(i)} for i in range(2, 400)])
    assert {k: v for k, v in splits(again).items()} == {k: v for k, v in drawn.items() if k not in ("0", "1")}
    messages = [{"role": "user", "content": "Question 7?"}]
    assert prompt_split_drawn(messages=messages, eval_share=0.0) == "train"
    assert prompt_split_drawn(messages=messages, eval_share=1.0) == "eval"


def test_staff_mark_prompts_as_evaluation_or_training_in_the_admin(client, staff_user):
    project = ProjectFactory()
    first, second, third = PromptFactory.create_batch(3, project=project)
    client.force_login(staff_user)

    def act(action, prompts):
        response = client.post(
            "/admin/feedback/prompt/", {"action": action, "_selected_action": [p.pk for p in prompts]}, follow=True
        )
        assert response.status_code == 200
        return [str(m) for m in get_messages(response.wsgi_request)]

    assert act("mark_as_evaluation", [first, second]) == ["2 prompt(s) marked as evaluation prompts."]
    assert list(project.prompts.order_by("pk").values_list("split", flat=True)) == ["eval", "eval", "train"]
    assert act("mark_as_training", [second, third]) == ["1 prompt(s) marked as training prompts."]
    assert list(project.prompts.order_by("pk").values_list("split", flat=True)) == ["eval", "train", "train"]


@pytest.fixture
def judged():
    """A ranking project: six prompts ranked once each, the first two of them evaluation prompts."""
    project = ProjectFactory(slug="judged", mode=Project.Mode.RANKING, completions_per_prompt=2)
    annotator = MembershipFactory(project=project).user
    prompts = []
    for i in range(6):
        prompt = PromptFactory(project=project, split="eval" if i < 2 else "train")
        good, bad = CompletionFactory(prompt=prompt, text=f"good {i}"), CompletionFactory(prompt=prompt, text="bad")
        rank(annotator, prompt, [[good], [bad]])
        prompts.append(prompt)
    return project, prompts


def test_training_snapshots_leave_evaluation_prompts_out(judged):
    project, prompts = judged
    run = training_run_start(project=project, algorithm="dpo", enqueue=False)

    rows = []
    for name in ("train.jsonl", "held_out.jsonl"):
        rows += [json.loads(line) for line in (run_dir(run) / name).read_text().splitlines()]
    assert sorted(row["prompt_id"] for row in rows) == [p.pk for p in prompts[2:]]
    assert run.data_counts["train"] + run.data_counts["held_out"] == 4


@pytest.mark.parametrize("export_format", ["dpo", "grpo", "judgements"])
def test_exports_leave_evaluation_prompts_out_unless_asked_for_them_alone(judged, export_format):
    project, prompts = judged
    every = PreferenceExportOptions(format=export_format)
    assert {row["prompt_id"] for row in preference_rows(project=project, options=every)} == {p.pk for p in prompts[2:]}
    parts = [PreferenceExportOptions(format=export_format, split=part) for part in ("train", "test")]
    assert {row["prompt_id"] for o in parts for row in preference_rows(project=project, options=o)} == {
        p.pk for p in prompts[2:]
    }
    only_eval = PreferenceExportOptions(format=export_format, split="eval")
    assert {row["prompt_id"] for row in preference_rows(project=project, options=only_eval)} == {
        p.pk for p in prompts[:2]
    }


def test_the_export_command_writes_evaluation_prompts_only_with_split_eval(judged, tmp_path):
    project, prompts = judged
    for split, expected in ((None, prompts[2:]), ("eval", prompts[:2])):
        out = tmp_path / f"{split}.jsonl"
        options = ["--format", "dpo", "--out", str(out), *(["--split", split] if split else [])]
        call_command("export_preferences", "judged", *options)
        assert {json.loads(line)["prompt_id"] for line in out.read_text().splitlines()} == {p.pk for p in expected}


def test_ordinary_rounds_never_choose_evaluation_prompts(judged, tiny_model_dir):
    project, prompts = judged
    project.base_model, project.max_new_tokens = str(tiny_model_dir), 2
    project.save()
    fresh_eval = PromptFactory(project=project, split="eval")
    fresh_train = PromptFactory(project=project)
    assert prompts_lacking_completions(project=project) == [fresh_train]

    result = completions_generate(project=project)  # a round over the prompts no round has answered
    assert result.prompts == 1 and not fresh_eval.completions.exists() and fresh_train.completions.count() == 2

    training = {p.pk for p in prompts[2:]} | {fresh_train.pk}
    for strategy in (Round.Strategy.OLDEST_ROUND_FIRST, Round.Strategy.UNJUDGED_FIRST):
        request = round_request(project=project, strategy=strategy, writers=["base"])
        round_write(round_id=request.pk)
        request.refresh_from_db()
        assert set(request.prompt_ids) == training


def test_imported_completions_of_evaluation_prompts_are_kept_but_give_no_task():
    project = ProjectFactory(mode=Project.Mode.PAIRWISE, completions_per_prompt=2)
    annotator = MembershipFactory(project=project, role=Membership.Role.ANNOTATOR).user
    prompts_import_jsonl(
        project=project,
        lines=jsonl(
            {"prompt": "Held back?", "completions": ["One.", "Two."], "split": "eval"},
            {"prompt": "Trained on?", "completions": ["Three.", "Four."]},
        ),
    )
    held_back = project.prompts.get(split="eval")
    assert held_back.completions.count() == 2
    assert not RoundPrompt.objects.filter(prompt=held_back).exists()
    assert judgements_left(project=project) == 1

    served = []
    while (task := assignment_lease_next(project=project, annotator=annotator)) is not None:
        served.append(task.assignment.prompt_id)
        submission = JudgementSubmission(task_id=task.task_id, client_uuid=uuid.uuid4(), kind="pairwise", choice="a")
        judgement_submit(project=project, annotator=annotator, submission=submission)
    assert len(served) == 1 and held_back.pk not in served


def test_the_uncertainty_order_leaves_out_judged_evaluation_prompts(judged, monkeypatch):
    project, prompts = judged
    monkeypatch.setattr(
        "training.logprobs.completion_logprob_sums", lambda model, tokenizer, examples, **kwargs: [0.0] * len(examples)
    )
    order = prompts_by_uncertainty(project=project, limit=None, model=None, tokenizer=None)
    assert order == [p.pk for p in prompts[2:]]
