"""Blind battles in the browser: an annotator meets battle pairs among ranking tasks, and staff read the outcome.

The promotion gate opens a battle between a new version ``v1`` and the base model; its answers are written
here as the worker would write them (no model is needed). The gate is checked after every battle judgement,
as the worker does on the task each one queues, so the annotator's own judgements decide it.
"""

import random
import re

import pytest
from playwright.sync_api import expect

from feedback.models import Completion, ModelVersion, PairwiseJudgement, Project, RankingJudgement, Round, RoundPrompt
from feedback.services.promotion_gate import promotion_gate_open
from feedback.tasks import promotion_gate_task
from tests.e2e.conftest import log_in_as
from tests.factories import (
    CompletionFactory,
    MembershipFactory,
    ModelVersionFactory,
    PairwiseJudgementFactory,
    ProjectFactory,
    PromptFactory,
    UserFactory,
)

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

BASE_MODEL = "acme/base-1b"
TRAINING_PROMPTS = 4
BATTLE_PROMPTS = 12


@pytest.fixture
def gated(queue):
    """A ranking project (K=4) with four ordinary prompts and twelve evaluation prompts; v1's gate is open on
    battle round 2 (v1 against base), whose answers are written; other annotators have judged ten of its pairs,
    v1 winning eight. The gate task runs, in the request that queues it, as the worker would run it."""
    queue.run_with("promotion_gate_task", promotion_gate_task.call_local)
    project = ProjectFactory(
        slug="arena",
        name="Arena",
        mode=Project.Mode.RANKING,
        completions_per_prompt=4,
        base_model=BASE_MODEL,
        battle_share=0.5,
        promote_when_preferred=True,
    )
    for n in range(TRAINING_PROMPTS):
        prompt = PromptFactory(project=project, messages=[{"role": "user", "content": f"Name a colour ({n})."}])
        CompletionFactory.create_batch(4, prompt=prompt)
    evaluation = [
        PromptFactory(project=project, split="eval", messages=[{"role": "user", "content": f"Name a fruit ({n})."}])
        for n in range(BATTLE_PROMPTS)
    ]
    v1 = promotion_gate_open(version=ModelVersionFactory(project=project, name="v1"))
    battle = Round.objects.get(project=project, number=v1.gate["round"])
    assert (battle.kind, battle.writers, v1.gate["against"]) == ("battle", ["v1", "base"], "base")
    assert queue.args("round_write_task") == [(battle.pk,)]
    shuffler = random.Random(7)
    for prompt in evaluation:  # as round_write writes them: one answer each, ids in random order
        writers = [{"model_version": v1, "source_model": ""}, {"model_version": None, "source_model": BASE_MODEL}]
        shuffler.shuffle(writers)
        for writer in writers:
            CompletionFactory(prompt=prompt, round=battle, text=f"A fruit: number {prompt.pk}.", **writer)
    Round.objects.filter(pk=battle.pk).update(
        status=Round.Status.DONE, prompt_ids=[p.pk for p in evaluation], prompts_total=12, prompts_written=12
    )
    others = UserFactory(username="earlier")
    for n, prompt in enumerate(evaluation[:10]):
        by_v1, by_base = _answers(prompt, v1)
        winner, loser = (by_v1, by_base) if n < 8 else (by_base, by_v1)
        PairwiseJudgementFactory(annotator=others, prompt=prompt, round=battle, left=winner, right=loser, choice="a")
    return project, v1, battle


def _answers(prompt, v1) -> tuple[Completion, Completion]:
    answers = Completion.objects.filter(prompt=prompt)
    return answers.get(model_version=v1), answers.get(model_version=None)


def test_an_annotator_judges_battles_among_rankings_and_staff_see_the_leaderboard_and_the_gate(
    live_server, page, browser, gated, artifacts
):
    project, v1, battle = gated
    MembershipFactory(user=UserFactory(username="ann"), project=project)
    log_in_as(page, live_server, "ann")
    page.locator("tr", has_text="Arena").get_by_role("link", name="Start").click()
    page.wait_for_selector("html.js #current form.task")
    page.keyboard.press("?")
    expect(page.locator("#help")).to_contain_text("A is better")  # a ranking project with battles: pair keys too
    expect(page.locator("#help")).to_contain_text("Move the focused completion up / down")
    page.keyboard.press("Escape")

    kinds = []
    while page.locator("#current form.task").count():
        form = page.locator("#current form.task")
        task = form.get_attribute("data-task-id")
        if "task-pairwise" in form.get_attribute("class"):
            a, b = (
                int(pk)
                for pk in page.locator("#current .completion").evaluate_all(
                    "els => els.map(e => e.dataset.completionId)"
                )
            )
            expect(page.locator("#current .completion .label")).to_have_text(["A", "B"])
            if "pair" not in kinds:
                page.screenshot(path=str(artifacts / "battle-pair.png"), full_page=True)
            page.keyboard.press("1" if Completion.objects.get(pk=a).model_version_id == v1.pk else "2")
            kinds.append("pair")
        else:
            expect(page.locator("#current .rank-item")).to_have_count(4)
            kinds.append("ranking")
        page.keyboard.press("Enter")
        expect(page.locator("#count-mine")).to_have_text(str(len(kinds)))
        expect(page.locator(f'#current form.task[data-task-id="{task}"]')).to_have_count(0)
    expect(page.locator("#current .all-done")).to_be_visible()

    # half of the tasks were battles while ordinary ones were left, then the rest of the battles
    assert kinds == ["ranking", "pair"] * TRAINING_PROMPTS + ["pair"] * (BATTLE_PROMPTS - TRAINING_PROMPTS)
    mine = {"annotator__username": "ann"}
    assert RankingJudgement.objects.filter(**mine).count() == TRAINING_PROMPTS
    assert RankingJudgement.objects.filter(**mine, round__kind="training").count() == TRAINING_PROMPTS
    pairs = PairwiseJudgement.objects.filter(**mine)
    assert pairs.count() == pairs.filter(round=battle).count() == BATTLE_PROMPTS
    assert {(j.left.model_version_id, j.choice) for j in pairs} <= {(v1.pk, "a"), (None, "b")}  # v1 preferred
    assert {j.prompt_id for j in pairs} == set(
        RoundPrompt.objects.filter(round=battle).values_list("prompt", flat=True)
    )

    # the gate: 8 wins and 2 losses before; each of ann's battles is one more win; 19 - 2 crosses log 20
    v1.refresh_from_db()
    assert v1.is_active
    assert (v1.gate["decision"], v1.gate["wins"], v1.gate["losses"], v1.gate["ties"]) == ("promote", 19, 2, 0)

    staff = browser.new_context(viewport={"width": 1280, "height": 900})
    UserFactory(username="staff", is_staff=True)
    boss = staff.new_page()
    log_in_as(boss, live_server, "staff")
    boss.locator("tr", has_text="Arena").get_by_role("link", name="Models").click()
    boss.wait_for_url(f"{live_server.url}/projects/arena/models/")
    total = 10 + BATTLE_PROMPTS
    for name, wins, losses in [("v1", 8 + BATTLE_PROMPTS, 2), ("base", 2, 8 + BATTLE_PROMPTS)]:
        cells = boss.locator(f'#leaderboard tr[data-model="{name}"] td')
        expect(cells.nth(0)).to_have_text(name)
        expect(cells.nth(4)).to_have_text(str(total))
        expect(cells.nth(5)).to_have_text(str(wins))
        expect(cells.nth(6)).to_have_text(str(losses))
        expect(cells.nth(7)).to_have_text("0")
    assert boss.locator("#leaderboard tr[data-model]").evaluate_all("rows => rows.map(r => r.dataset.model)") == [
        "v1",
        "base",
    ]
    gate = boss.locator('#gate tr[data-version="v1"]')
    expect(gate.locator("td").nth(0)).to_have_text(re.compile(r"^v1\s+\(active\)$"))
    expect(gate.locator("td.decision")).to_have_text("promote")
    expect(gate.locator("td").nth(2)).to_have_text("base")
    expect(gate.locator("td").nth(3)).to_have_text("19")
    expect(gate.locator("td").nth(4)).to_have_text("2")
    boss.screenshot(path=str(artifacts / "models-page.png"), full_page=True)
    assert ModelVersion.objects.get(project=project, is_active=True) == v1
    staff.close()
