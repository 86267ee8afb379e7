"""A reviewer in Chromium: from the home page to the review queue, the most contentious item, a verdict given from
the keyboard and seen in force, then undone."""

import re

import pytest
from playwright.sync_api import expect

from feedback.models import Adjudication, Membership, Project
from tests.e2e.conftest import log_in_as
from tests.factories import CompletionFactory, MembershipFactory, ProjectFactory, PromptFactory, UserFactory
from tests.feedback.export_helpers import compare

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def disputed():
    """A pairwise project with three judged pairs: split three ways, split 2-1, and agreed."""
    project = ProjectFactory(slug="disputes", name="Disputes", mode=Project.Mode.PAIRWISE, completions_per_prompt=2)
    judges = [MembershipFactory(project=project, user=UserFactory(username=f"judge{n}")).user for n in range(3)]
    MembershipFactory(project=project, user=UserFactory(username="rita"), role=Membership.Role.REVIEWER)
    keys = {}
    for name, votes in [("two-one", ["a", "a", "b"]), ("three-ways", ["a", "b", "tie"]), ("agreed", ["b", "b"])]:
        prompt = PromptFactory(project=project, messages=[{"role": "user", "content": f"Which is right ({name})?"}])
        low, high = (CompletionFactory(prompt=prompt, text=f"{name}: answer <{n}>") for n in range(2))
        for judge, choice in zip(judges, votes, strict=False):
            compare(judge, low, high, choice, rationale=f"{judge.username} thinks {choice}")
        keys[name] = f"c{low.pk}-{high.pk}"
    return project, keys


def test_a_reviewer_gives_a_verdict_on_the_most_contentious_item_and_undoes_it(live_server, page, disputed, artifacts):
    project, keys = disputed
    log_in_as(page, live_server, "rita")
    page.locator("tr", has_text="Disputes").get_by_role("link", name="Review").click()
    page.wait_for_url(f"{live_server.url}/projects/disputes/review/")
    rows = page.locator("#queue tr[data-item]")
    expect(rows).to_have_count(2)
    assert rows.evaluate_all("rows => rows.map(r => r.dataset.item)") == [keys["three-ways"], keys["two-one"]]
    expect(rows.nth(0).locator("td.contention")).to_have_text("0.667")

    rows.nth(0).get_by_role("link", name=keys["three-ways"]).click()
    page.wait_for_url(f"{live_server.url}/projects/disputes/review/{keys['three-ways']}/")
    expect(page.locator("#judgements tbody tr")).to_have_count(3)
    expect(page.locator("#judgements td.rationale")).to_have_text(
        ["judge0 thinks a", "judge1 thinks b", "judge2 thinks tie"]
    )
    expect(page.locator("#completions .review-text").first).to_have_text("three-ways: answer <0>")
    expect(page.locator("#verdict-in-force")).to_have_count(0)

    page.keyboard.press("2")  # B is better
    expect(page.locator('input[name=verdict][value="b"]')).to_be_checked()
    page.keyboard.press("n")
    page.keyboard.type("B gives the source.")
    page.keyboard.press("Escape")
    page.keyboard.press("Enter")
    expect(page.locator("#verdict-in-force .verdict")).to_have_text("The second completion is better")
    expect(page.locator(".messages")).to_contain_text(f"is in force on {keys['three-ways']}")
    page.screenshot(path=str(artifacts / "review-verdict.png"), full_page=True)
    verdict = Adjudication.objects.get()
    assert (verdict.item_key, verdict.verdict, verdict.note, verdict.undone_at) == (
        keys["three-ways"],
        "b",
        "B gives the source.",
        None,
    )

    page.get_by_role("link", name="← Review queue").click()
    expect(page.locator("#queue tr[data-item]")).to_have_count(1)
    page.get_by_role("link", name="Adjudicated").click()
    expect(page.locator("#queue tr[data-item]")).to_have_count(1)
    expect(page.locator(f'#queue tr[data-item="{keys["three-ways"]}"] td').last).to_have_text("b")
    page.get_by_role("link", name=keys["three-ways"]).click()

    page.get_by_role("button", name="Undo verdict").click()
    expect(page.locator(".messages")).to_contain_text("the annotators' votes count again")
    expect(page.locator("#verdict-in-force")).to_have_count(0)
    expect(page.locator("#history tbody tr td").first).to_have_text(re.compile(r"^The second completion is better$"))
    verdict.refresh_from_db()
    assert (verdict.undone_by.username, verdict.undone_at is not None) == ("rita", True)
    assert Adjudication.objects.filter(project=project, undone_at__isnull=True).count() == 0
