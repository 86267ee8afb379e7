"""Gold items: known answers at import and through the API, served at the gold share, kept out of exports, scored."""

import json
import uuid

import pytest
from rest_framework.test import APIClient

from feedback.models import Completion, Membership, PairwiseJudgement, Project, Prompt
from feedback.selectors.preferences import PreferenceExportOptions, preference_rows
from feedback.selectors.quality import project_quality, wilson_interval
from feedback.services.prompts import (
    PromptImportError,
    prompts_import_csv,
    prompts_import_records,
)
from tests.factories import MembershipFactory, ProjectFactory, UserFactory
from tests.feedback.queue_helpers import lease, submit

pytestmark = pytest.mark.django_db


def _record(text, completions=("good", "bad"), **fields):
    return {"prompt": text, "completions": list(completions), **fields}


def test_gold_answers_are_stored_with_their_prompts():
    project = ProjectFactory(mode="pairwise", completions_per_prompt=2)
    prompts_import_records(
        project=project,
        records=[
            _record("p1", gold={"choice": "b"}),
            _record("p2", completions=("w", "x", "y", "z"), gold={"ranking": [[2], [0, 3], [1]]}),
            _record("p3"),
        ],
    )
    assert list(Prompt.objects.order_by("pk").values_list("gold", flat=True)) == [
        {"choice": "b"},
        {"ranking": [[2], [0, 3], [1]]},
        None,
    ]


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (_record("x", completions=("a", "b", "c"), gold={"choice": "a"}), "a choice needs exactly two completions"),
        (_record("x", gold={"choice": "c"}), "choice must be 'a' or 'b'"),
        (_record("x", gold={"ranking": [[0], [2]]}), "ranking names completion 2, which the prompt does not have"),
        (_record("x", gold={"ranking": [[0], [0]]}), "ranking names completion 0 more than once"),
        (_record("x", completions=("a", "b", "c"), gold={"ranking": [[0], [1]]}), "2 missing"),
        (_record("x", gold={"ranking": [[0], [True]]}), "whole numbers from 0"),
        (_record("x", gold={"ranking": [[0], []]}), "non-empty groups"),
        (_record("x", completions=(), gold={"choice": "a"}), "needs the prompt's completions to judge; it has 0"),
        (_record("x", gold={"pick": "a"}), 'must be {"choice": "a" or "b"} or {"ranking"'),
        (_record("x", gold=["a"]), 'must be {"choice": "a" or "b"} or {"ranking"'),
        (_record("x", gold={"choice": "a"}, split="eval"), "an evaluation prompt gets no ordinary tasks"),
    ],
)
def test_a_gold_answer_that_does_not_fit_is_named_and_nothing_is_written(record, message):
    project = ProjectFactory(mode="pairwise", completions_per_prompt=2)
    with pytest.raises(PromptImportError) as raised:
        prompts_import_records(project=project, records=[_record("fine"), record])
    [problem] = raised.value.problems
    assert (problem.line, problem.field) == (2, "gold") and message in problem.message
    assert not Prompt.objects.filter(project=project).exists()


def test_a_csv_gold_column_holds_json():
    project = ProjectFactory(mode="pairwise", completions_per_prompt=2)
    lines = ["prompt,completion_1,completion_2,gold", 'q1,yes,no,"{""choice"": ""a""}"', "q2,yes,no,"]
    prompts_import_csv(project=project, lines=lines)
    assert list(Prompt.objects.order_by("pk").values_list("gold", flat=True)) == [{"choice": "a"}, None]
    with pytest.raises(PromptImportError) as raised:
        prompts_import_csv(project=project, lines=["prompt,completion_1,completion_2,gold", "q3,a,b,{choice: a}"])
    assert [(p.line, p.field) for p in raised.value.problems] == [(2, "gold")]
    assert Prompt.objects.filter(project=project).count() == 2


def test_managers_set_and_clear_a_gold_answer_through_the_api():
    project = ProjectFactory(slug="g", mode="pairwise", completions_per_prompt=2)
    prompts_import_records(project=project, records=[_record("q", completions=("a", "b", "c"))])
    prompt = Prompt.objects.get(project=project)
    client = APIClient()
    client.force_authenticate(MembershipFactory(project=project, role=Membership.Role.MANAGER).user)
    url = f"/api/v1/projects/g/prompts/{prompt.pk}/gold/"
    wrong = client.post(url, {"gold": {"choice": "a"}}, format="json")
    assert wrong.status_code == 400 and wrong.json() == {
        "gold": ["a choice needs exactly two completions; this prompt has 3, give a ranking"]
    }
    assert Prompt.objects.get(pk=prompt.pk).gold is None
    set_ = client.post(url, {"gold": {"ranking": [[1], [0, 2]]}}, format="json")
    assert set_.status_code == 200 and set_.json() == {"id": prompt.pk, "gold": {"ranking": [[1], [0, 2]]}}
    assert client.post(url, {"gold": None}, format="json").json()["gold"] is None
    assert Prompt.objects.get(pk=prompt.pk).gold is None
    assert (
        client.post(f"/api/v1/projects/g/prompts/{prompt.pk + 99}/gold/", {"gold": None}, format="json").status_code
        == 404
    )
    assert client.post("/api/v1/projects/g/prompts/abc/gold/", {"gold": None}, format="json").status_code == 404


def _gold_project(**fields):
    """A pairwise project (K=2, overlap 1) of 20 ordinary prompts and 2 gold ones whose first answer is right."""
    project = ProjectFactory(slug="gp", mode="pairwise", completions_per_prompt=2, **fields)
    records = [_record(f"ordinary {i}") for i in range(20)]
    records += [_record(f"gold {i}", gold={"choice": "a"}) for i in range(2)]
    prompts_import_records(project=project, records=records)
    return project, set(Prompt.objects.filter(project=project, gold__isnull=False).values_list("pk", flat=True))


def _work(project, annotator, tasks, *, right=True):
    """Lease and judge tasks; a gold pair gets the right (or the wrong) answer. Returns which tasks were gold."""
    gold_ids = set(Prompt.objects.filter(project=project, gold__isnull=False).values_list("pk", flat=True))
    kinds = []
    for _ in range(tasks):
        task = lease(project, annotator)
        if task is None:
            break
        first = Completion.objects.filter(prompt_id=task.prompt_id).order_by("pk").first()
        good = "a" if task.completion_a_id == first.pk else "b"
        choice = good if right else ("b" if good == "a" else "a")
        submit(
            project=project,
            annotator=annotator,
            task_id=task.pk,
            client_uuid=uuid.uuid4(),
            kind="pairwise",
            choice=choice,
        )
        kinds.append("gold" if task.prompt_id in gold_ids else "ordinary")
    return kinds


def test_gold_items_come_at_the_gold_share_and_each_annotator_meets_each_once():
    project, _ = _gold_project()
    first, second = UserFactory(), UserFactory()
    # 10 %: the tenth and the twentieth task are gold; the ordinary items are not served twice
    assert _work(project, first, 12) == ["ordinary"] * 9 + ["gold"] + ["ordinary"] * 2
    kinds = _work(project, first, 30)
    assert kinds == ["ordinary"] * 7 + ["gold"] + ["ordinary"] * 2  # 20 ordinary in all; both gold items met
    # no overlap cap on gold: the second annotator meets both gold items too, while ordinary ones are all taken
    assert _work(project, second, 5) == []
    Project.objects.filter(pk=project.pk).update(gold_share=1.0)
    project.refresh_from_db()
    assert _work(project, second, 5) == ["gold", "gold"]
    assert PairwiseJudgement.objects.filter(prompt__gold__isnull=False).count() == 4


def test_a_gold_share_of_zero_serves_no_gold_and_gold_is_never_an_ordinary_item():
    project, _ = _gold_project(gold_share=0.0)
    assert _work(project, UserFactory(), 30) == ["ordinary"] * 20


def test_gold_judgements_are_left_out_of_exports_unless_asked(settings):
    project, gold_ids = _gold_project(gold_share=1.0)
    _work(project, UserFactory(), 22)
    plain = list(preference_rows(project=project, options=PreferenceExportOptions(format="dpo")))
    asked = list(preference_rows(project=project, options=PreferenceExportOptions(format="dpo", gold=True)))
    assert len(plain) == 20 and not {row["prompt_id"] for row in plain} & gold_ids
    assert len(asked) == 22 and {row["prompt_id"] for row in asked} >= gold_ids


def test_wilson_interval_matches_a_worked_example():
    # 8 of 10: centre (0.8 + 1.92/10) / 1.384, half-width 1.96 sqrt(0.016 + 0.00096) / 1.384
    low, high = wilson_interval(successes=8, trials=10)
    assert (round(low, 3), round(high, 3)) == (0.490, 0.943)
    assert wilson_interval(successes=0, trials=5)[0] == 0.0


def test_each_annotators_gold_accuracy_and_the_below_chance_flag():
    project = ProjectFactory(slug="acc", mode="pairwise", completions_per_prompt=2, gold_share=1.0)
    prompts_import_records(project=project, records=[_record(f"gold {i}", gold={"choice": "a"}) for i in range(12)])
    careful, careless = UserFactory(username="careful"), UserFactory(username="careless")
    _work(project, careful, 12, right=True)
    kinds = _work(project, careless, 12, right=False)
    assert kinds == ["gold"] * 12
    stats = {s.username: s for s in project_quality(project=project).annotators}
    assert (stats["careful"].gold_decisions, stats["careful"].gold_correct, stats["careful"].gold_accuracy) == (
        12,
        12,
        1.0,
    )
    assert (stats["careless"].gold_correct, stats["careless"].gold_accuracy) == (0, 0.0)
    assert stats["careless"].gold_ci_high == pytest.approx(wilson_interval(successes=0, trials=12)[1])
    assert [f.code for f in stats["careless"].flags] == ["below_chance_on_gold", "unreliable"]
    assert "Right on 0% of 12 gold decisions" in stats["careless"].flags[0].message
    assert stats["careful"].flags == []


def test_a_ranking_is_scored_on_the_pairs_its_gold_answer_orders():
    project = ProjectFactory(slug="rk", mode="ranking", completions_per_prompt=3, gold_share=1.0)
    prompts_import_records(
        project=project, records=[_record("g", completions=("x", "y", "z"), gold={"ranking": [[0], [1, 2]]})]
    )
    annotator = UserFactory(username="ranker")
    task = lease(project, annotator)
    x, y, z = Completion.objects.filter(prompt__project=project).order_by("pk").values_list("pk", flat=True)
    # y above x (wrong), z tied with x (wrong: gold puts x above z); y against z is equal in gold and not scored
    submit(
        project=project,
        annotator=annotator,
        task_id=task.pk,
        client_uuid=uuid.uuid4(),
        kind="ranking",
        ranking=[[y], [x, z]],
    )
    stats = project_quality(project=project).annotators[0]
    assert (stats.gold_decisions, stats.gold_correct) == (2, 0)
    assert json.dumps(stats.gold_accuracy) == "0.0"


def _one_gold_task(project, annotator):
    task = lease(project, annotator)
    first = Completion.objects.filter(prompt_id=task.prompt_id).order_by("pk").first()
    right = "a" if task.completion_a_id == first.pk else "b"
    return task, right, {"a": "b", "b": "a"}[right]


@pytest.mark.parametrize("allowed", [True, False])
def test_a_wrong_gold_answer_gets_the_expected_one_where_the_project_allows_it(allowed):
    project = ProjectFactory(
        slug="fb", mode="pairwise", completions_per_prompt=2, gold_share=1.0, gold_feedback=allowed
    )
    prompts_import_records(project=project, records=[_record(f"g{i}", gold={"choice": "a"}) for i in range(2)])
    annotator = MembershipFactory(project=project, role=Membership.Role.ANNOTATOR).user
    client = APIClient()
    client.force_authenticate(annotator)
    task, right, wrong = _one_gold_task(project, annotator)
    body = {"task_id": task.pk, "client_uuid": str(uuid.uuid4()), "kind": "pairwise", "choice": wrong}
    answer = client.post("/api/v1/projects/fb/judgements/", body, format="json").json()
    expected = f"That was a check item with a known answer: {right.upper()} is better."
    assert answer["gold_feedback"] == (expected if allowed else None)
    task, right, _ = _one_gold_task(project, annotator)
    body = {"task_id": task.pk, "client_uuid": str(uuid.uuid4()), "kind": "pairwise", "choice": right}
    assert client.post("/api/v1/projects/fb/judgements/", body, format="json").json()["gold_feedback"] is None


def test_the_annotate_page_shows_the_expected_answer_above_the_next_task(client):
    project = ProjectFactory(slug="pg", mode="pairwise", completions_per_prompt=2, gold_share=1.0, gold_feedback=True)
    prompts_import_records(project=project, records=[_record(f"g{i}", gold={"choice": "a"}) for i in range(2)])
    annotator = MembershipFactory(project=project, role=Membership.Role.ANNOTATOR).user
    client.force_login(annotator)
    task, right, wrong = _one_gold_task(project, annotator)
    data = {"task_id": task.pk, "client_uuid": str(uuid.uuid4()), "choice": wrong, "shown": task.pk}
    html = client.post("/projects/pg/annotate/submit/", data, HTTP_HX_REQUEST="true").content.decode()
    assert '<div id="notice" hx-swap-oob="innerHTML">' in html
    assert f"That was a check item with a known answer: {right.upper()} is better." in html
    plain = client.post(
        "/projects/pg/annotate/submit/",
        {"task_id": lease(project, annotator).pk, "client_uuid": str(uuid.uuid4()), "choice": "tie"},
        follow=True,
    ).content.decode()
    assert "That was a check item with a known answer:" in plain


def test_a_ranking_gets_the_expected_order_in_the_places_it_was_shown():
    project = ProjectFactory(slug="rf", mode="ranking", completions_per_prompt=3, gold_share=1.0, gold_feedback=True)
    prompts_import_records(
        project=project, records=[_record("g", completions=("x", "y", "z"), gold={"ranking": [[0], [1, 2]]})]
    )
    annotator = MembershipFactory(project=project, role=Membership.Role.ANNOTATOR).user
    task = lease(project, annotator)
    x = Completion.objects.filter(prompt__project=project).order_by("pk").first().pk
    others = [c for c in task.display_order if c != x]
    client = APIClient()
    client.force_authenticate(annotator)
    body = {"task_id": task.pk, "client_uuid": str(uuid.uuid4()), "kind": "ranking", "ranking": [others, [x]]}
    feedback = client.post("/api/v1/projects/rf/judgements/", body, format="json").json()["gold_feedback"]
    place = {c: n for n, c in enumerate(task.display_order, start=1)}
    rest = " = ".join(f"answer {place[c]}" for c in task.display_order if c != x)
    assert feedback == (
        f"That was a check item with a known answer: answer {place[x]} > {rest} "
        "(answers numbered as they were shown, top first)."
    )
