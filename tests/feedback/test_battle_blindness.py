"""Battles are blind: nothing an annotator reads says which version, or the base model, wrote an answer.

A ranking project (K=4) has an ordinary round and a battle round between ``v1`` and ``base`` on twelve
evaluation prompts, served at half of an annotator's tasks. The annotator works through the page and the
API; every answer they get is searched for the writers' names, the version's id where it would name a
writer, and the base model's name. A manager asks the same questions and is told, so each check could fail.
"""

import json
import re
import shutil
import uuid
from collections import Counter

import pytest
from django.conf import settings
from django.test import Client
from rest_framework.test import APIClient

from feedback.models import Assignment, Completion, Membership, PairwiseJudgement, Project, Round
from feedback.services.assignments import assignment_lease_next
from feedback.services.generation import round_write
from feedback.services.promotion_gate import promotion_gate_open
from feedback.services.rounds import battle_request
from tests.factories import (
    CompletionFactory,
    MembershipFactory,
    ModelVersionFactory,
    PairwiseJudgementFactory,
    ProjectFactory,
    PromptFactory,
    RoundFactory,
    UserFactory,
)
from tests.feedback.queue_helpers import submit

pytestmark = pytest.mark.django_db

BASE_MODEL = "acme/hidden-base-1b"
BATTLE_PROMPTS = 12
TRAINING_PROMPTS = 6


@pytest.fixture
def arena():
    """The ranking project, its ordinary round 1, version v1, and battle round 2 (v1 against base)."""
    project = ProjectFactory(
        slug="arena", mode=Project.Mode.RANKING, completions_per_prompt=4, base_model=BASE_MODEL, battle_share=0.5
    )
    for _ in range(TRAINING_PROMPTS):
        CompletionFactory.create_batch(4, prompt=PromptFactory(project=project))
    v1 = ModelVersionFactory(project=project, name="v1")
    battle = RoundFactory(
        project=project,
        kind=Round.Kind.BATTLE,
        strategy=Round.Strategy.EVALUATION,
        writers=["v1", "base"],
        sampling={"k": 2, "temperature": 0.8, "top_p": 0.95, "max_new_tokens": 256},
    )
    for n in range(BATTLE_PROMPTS):
        prompt = PromptFactory(project=project, split="eval")
        writers = [{"model_version": v1, "source_model": ""}, {"model_version": None, "source_model": BASE_MODEL}]
        for writer in writers if n % 2 else writers[::-1]:
            CompletionFactory(prompt=prompt, round=battle, text=f"Battle answer {n}.", **writer)
    return project, v1, battle


def member(project: Project, username: str, role: str) -> tuple[Client, APIClient]:
    user = UserFactory(username=username)
    MembershipFactory(user=user, project=project, role=role)
    page, api = Client(), APIClient()
    page.force_login(user)
    api.force_authenticate(user)
    return page, api


def names_a_writer(text: str) -> list[str]:
    """The writers' names found in a page or an answer (the API's own path /api/v1/ is not the version)."""
    found = re.findall(r"\bv1\b", text.replace("/api/v1/", "/api/"))
    found += [name for name in (BASE_MODEL, str(settings.BASE_MODEL)) if name in text]
    return found


def task_ids(html: str) -> list[int]:
    return [int(pk) for pk in re.findall(r'data-task-id="(\d+)"', html)]


def ranks(assignment: Assignment) -> dict[str, str]:
    return {f"rank-{pk}": str(rank) for rank, pk in enumerate(assignment.display_order, start=1)}


def test_the_annotate_page_shows_battles_without_their_writers(arena):
    project, _, battle = arena
    page, _ = member(project, "ann", Membership.Role.ANNOTATOR)
    url = f"/projects/{project.slug}"
    seen = [page.get("/").content.decode()]
    first = page.get(f"{url}/annotate/")
    assert first.status_code == 200
    seen.append(first.content.decode())
    current, prefetched = task_ids(seen[-1])
    again = page.get(f"{url}/annotate/next/", {"shown": current}, HTTP_HX_REQUEST="true")
    seen.append(again.content.decode())
    assert task_ids(seen[-1]) == [prefetched]  # the page asks again: the same prefetched lease
    while current is not None:
        # as the page does: the prefetched task is on screen while the current one is posted
        assignment = Assignment.objects.get(pk=current)
        answer = {"choice": "a"} if assignment.completion_a_id else ranks(assignment)
        shown = {"shown": prefetched} if prefetched else {}
        response = page.post(
            f"{url}/annotate/submit/",
            {"task_id": current, "client_uuid": uuid.uuid4(), **shown, **answer},
            HTTP_HX_REQUEST="true",
        )
        assert response.status_code == 200
        seen.append(response.content.decode())
        current, prefetched = prefetched, (task_ids(seen[-1]) or [None])[0]
    seen.append(page.get("/").content.decode())
    rounds = page.get(f"{url}/training/rounds/").content.decode()  # the rounds table annotators may open
    assert re.search(r'<tr id="round-2">\s*<td>2</td>\s*<td>a blind battle</td>', rounds)
    seen.append(rounds)

    judged = PairwiseJudgement.objects.filter(project=project, annotator__username="ann")
    assert judged.filter(round=battle).count() == BATTLE_PROMPTS  # every battle pair passed through the page
    assert project.rankingjudgements.filter(annotator__username="ann").count() == TRAINING_PROMPTS
    pair_pages = [html for html in seen if 'class="task task-pairwise"' in html]
    assert len(pair_pages) >= BATTLE_PROMPTS
    assert all("Battle answer" in html for html in pair_pages)
    assert [names_a_writer(html) for html in seen] == [[] for _ in seen]
    manager, _ = member(project, "boss", Membership.Role.MANAGER)
    leaderboard_link = 'href="/projects/arena/models/"'
    assert leaderboard_link not in seen[0] and leaderboard_link in manager.get("/").content.decode()


def test_the_api_serves_and_takes_battles_without_their_writers(arena):
    project, _, battle = arena
    _, api = member(project, "ann", Membership.Role.ANNOTATOR)
    base = f"/api/v1/projects/{project.slug}"
    seen = []
    while (response := api.get(f"{base}/next-task/")).status_code == 200:
        task = response.json()
        seen.append(response.content.decode())
        ids = [c["id"] for c in task["completions"]]
        answer = {"choice": "b"} if task["kind"] == "pairwise" else {"ranking": [[pk] for pk in ids]}
        body = {"task_id": task["task_id"], "client_uuid": str(uuid.uuid4()), "kind": task["kind"], **answer}
        posted = api.post(f"{base}/judgements/", body, format="json")
        assert posted.status_code == 201, posted.json()
        seen.append(posted.content.decode())
        assert set(task) == {"task_id", "kind", "prompt", "completions", "lease_expires_at"}
        assert all(set(c) == {"id", "text", "html"} for c in task["completions"])
    assert response.status_code == 204

    battles = [task for task in map(json.loads, seen[::2]) if task["kind"] == "pairwise"]
    assert len(battles) == BATTLE_PROMPTS
    assert PairwiseJudgement.objects.filter(round=battle, choice="b").count() == BATTLE_PROMPTS
    assert [names_a_writer(text) for text in seen] == [[] for _ in seen]


def test_completions_name_their_writer_to_managers_only(arena):
    project, v1, battle = arena
    _, annotator = member(project, "ann", Membership.Role.ANNOTATOR)
    _, manager = member(project, "boss", Membership.Role.MANAGER)
    url = f"/api/v1/projects/{project.slug}/completions/"

    listed = annotator.get(url)
    assert listed.status_code == 200 and listed.json()["count"] == TRAINING_PROMPTS * 4 + BATTLE_PROMPTS * 2
    rows = listed.json()["results"]
    assert {(row["model_version"], row["source_model"]) for row in rows} == {(None, "")}
    assert names_a_writer(listed.content.decode()) == []
    refused = annotator.get(url, {"model_version": v1.pk})
    assert refused.status_code == 400
    assert refused.json() == {
        "model_version": ["Only the project's managers can filter completions by the version that wrote them."]
    }

    in_battle = set(Completion.objects.filter(round=battle).values_list("pk", flat=True))
    answer = manager.get(url)
    assert names_a_writer(answer.content.decode()) == [BASE_MODEL]
    told = {row["id"]: (row["model_version"], row["source_model"]) for row in answer.json()["results"]}
    assert Counter(told[pk] for pk in in_battle) == {(v1.pk, ""): BATTLE_PROMPTS, (None, BASE_MODEL): BATTLE_PROMPTS}
    by_v1 = manager.get(url, {"model_version": v1.pk})
    assert by_v1.status_code == 200 and by_v1.json()["count"] == BATTLE_PROMPTS


def test_rounds_hide_a_battles_writers_from_annotators(arena):
    project, _, battle = arena
    _, annotator = member(project, "ann", Membership.Role.ANNOTATOR)
    _, manager = member(project, "boss", Membership.Role.MANAGER)
    url = f"/api/v1/projects/{project.slug}/rounds/"

    listed = annotator.get(url)
    assert [(r["number"], r["kind"], r["writers"]) for r in listed.json()] == [
        (2, "battle", []),
        (1, "training", ["test-model"]),
    ]
    assert names_a_writer(listed.content.decode()) == []
    told = manager.get(url)
    assert [(r["number"], r["writers"]) for r in told.json()] == [(2, ["v1", "base"]), (1, ["test-model"])]
    assert names_a_writer(told.content.decode()) == ["v1"]


def test_the_leaderboard_and_the_models_page_are_closed_to_annotators(arena):
    project, _, battle = arena
    page, annotator = member(project, "ann", Membership.Role.ANNOTATOR)
    manager_page, manager = member(project, "boss", Membership.Role.MANAGER)
    left, right = battle.completions.order_by("pk")[:2]
    PairwiseJudgementFactory(prompt=left.prompt, round=battle, left=left, right=right, choice="a")

    assert annotator.get(f"/api/v1/projects/{project.slug}/leaderboard/").status_code == 403
    assert page.get(f"/projects/{project.slug}/models/").status_code == 403
    board = manager.get(f"/api/v1/projects/{project.slug}/leaderboard/").json()
    assert sorted((m["name"], m["battles"]) for m in board["models"]) == [("base", 1), ("v1", 1)]
    shown = manager_page.get(f"/projects/{project.slug}/models/").content.decode()
    assert '<tr data-model="v1">' in shown and '<tr data-model="base">' in shown


@pytest.fixture
def written_battle(tiny_model_dir, settings):
    """A battle between v1 and the base model (the same tiny weights) written by the worker on 40 prompts."""
    project = ProjectFactory(
        slug="written", base_model=str(tiny_model_dir), completions_per_prompt=4, max_new_tokens=4, battle_share=1.0
    )
    for _ in range(40):
        PromptFactory(project=project, split="eval")
    shutil.copytree(tiny_model_dir, settings.MODEL_VERSIONS_DIR / "written" / "v1")
    v1 = ModelVersionFactory(project=project, name="v1", weights_path="written/v1")
    battle = battle_request(project=project, candidate="v1", against="base")
    assert round_write(round_id=battle.pk).completions == 80
    return project, v1, battle


def test_neither_the_completion_ids_nor_the_a_b_order_follow_the_writer(written_battle):
    project, v1, battle = written_battle
    by_prompt: dict[int, list[Completion]] = {}
    for completion in Completion.objects.filter(round=battle).order_by("pk"):
        by_prompt.setdefault(completion.prompt_id, []).append(completion)
    assert len(by_prompt) == 40
    assert all(
        {(c.model_version_id, c.source_model) for c in pair} == {(None, str(project.base_model)), (v1.pk, "")}
        for pair in by_prompt.values()
    )
    v1_first = sum(pair[0].model_version_id == v1.pk for pair in by_prompt.values())
    assert 0 < v1_first < 40  # all or none would happen by chance once in 2**39 battles
    # completions/ tells annotators when each answer was written: that order must not name the writer either
    earlier = Counter()
    for pair in by_prompt.values():
        by_v1, by_base = sorted(pair, key=lambda c: c.model_version_id is None)
        earlier["v1"] += by_v1.created_at < by_base.created_at
        earlier["base"] += by_base.created_at < by_v1.created_at
    assert earlier["v1"] < 40 and earlier["base"] < 40

    annotator = UserFactory(username="ann")
    MembershipFactory(user=annotator, project=project)
    shown_first = []
    while (task := assignment_lease_next(project=project, annotator=annotator)) is not None:
        assert task.kind == "pairwise" and task.assignment.round_id == battle.pk
        shown_first.append(task.completions[0].model_version_id == v1.pk)
        submit(
            project=project,
            annotator=annotator,
            task_id=task.assignment.pk,
            client_uuid=uuid.uuid4(),
            kind="pairwise",
            choice="a",
        )
    assert len(shown_first) == 40
    assert 0 < sum(shown_first) < 40  # v1's answer is A on some battles, B on the others


def test_model_versions_do_not_tell_annotators_which_battle_a_version_is_in(arena, queue):
    project, v1, _ = arena
    project.promote_when_preferred = True
    project.save()
    gate = promotion_gate_open(version=v1).gate
    assert (gate["decision"], gate["against"], gate["round"]) == ("wait", "base", 3)
    _, annotator = member(project, "ann", Membership.Role.ANNOTATOR)
    _, manager = member(project, "boss", Membership.Role.MANAGER)
    url = f"/api/v1/projects/{project.slug}/model-versions/"
    rounds = annotator.get(f"/api/v1/projects/{project.slug}/rounds/").json()
    assert (rounds[0]["number"], rounds[0]["kind"], rounds[0]["writers"]) == (3, "battle", [])  # hidden here
    told = {version["name"]: version["gate"] for version in manager.get(url).json()["results"]}
    assert (told["v1"]["round"], told["v1"]["against"]) == (3, "base")
    shown = {version["name"]: version["gate"] for version in annotator.get(url).json()["results"]}
    assert "round" not in shown["v1"] and "against" not in shown["v1"], shown
