import re
import time

import pytest
from playwright.sync_api import expect

from feedback.models import Assignment, PairwiseJudgement, RankingJudgement
from tests.e2e.conftest import log_in_as
from tests.factories import CompletionFactory, MembershipFactory, ProjectFactory, PromptFactory, UserFactory

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def make_project(*, mode: str, prompts: int, k: int, texts=None, **kwargs):
    project = ProjectFactory(mode=mode, completions_per_prompt=k, **kwargs)
    for n in range(prompts):
        prompt = PromptFactory(
            project=project,
            messages=[
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": f"How do I reverse a list in Python? (question {n + 1})"},
            ],
        )
        for index in range(k):
            text = texts[index] if texts else f"Answer {index + 1}: use `xs[::-1]`.\n\n```python\nxs.reverse()\n```"
            CompletionFactory(prompt=prompt, text=text)
    return project


def log_in(page, live_server, project, *, home_screenshot=None):
    user = UserFactory(username="ann")
    MembershipFactory(user=user, project=project)
    log_in_as(page, live_server, "ann")
    row = page.locator("tr", has_text=project.name)
    expect(row).to_contain_text("Start")
    if home_screenshot:
        page.screenshot(path=str(home_screenshot))
    row.get_by_role("link", name="Start").click()
    page.wait_for_selector("html.js #current form.task")
    return user


def shown_task_id(page) -> int:
    return int(page.locator("#current form.task").get_attribute("data-task-id"))


def shown_order(page) -> list[int]:
    return [
        int(i) for i in page.locator("#current .rank-item").evaluate_all("els => els.map(e => e.dataset.completionId)")
    ]


def wait_for_db(check, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (value := check()) is not None:
            return value
        time.sleep(0.05)
    raise AssertionError("the database never showed the expected change")


def ranks_of(assignment_id: int) -> dict[int, int]:
    judgement = RankingJudgement.objects.filter(assignment_id=assignment_id).first()
    return dict(judgement.ranked.values_list("completion_id", "rank")) if judgement else None


def test_ranking_by_drag_and_drop_and_by_keyboard_with_ties_then_skip(live_server, page, artifacts):
    project = make_project(mode="ranking", prompts=4, k=4, guidelines="Rank correct answers first.")
    log_in(page, live_server, project)
    expect(page.locator("#count-left")).to_have_text("4")

    # 1. drag the last completion to the top
    first_task = shown_task_id(page)
    a, b, c, d = shown_order(page)
    items = page.locator("#current .rank-item")
    items.nth(3).drag_to(items.nth(0), target_position={"x": 40, "y": 5})
    assert shown_order(page) == [d, a, b, c]
    expect(page.locator("#current .rank-badge")).to_have_text(["1", "2", "3", "4"])
    page.keyboard.press("Enter")
    expect(page.locator("#count-mine")).to_have_text("1")
    assert shown_task_id(page) != first_task
    assert wait_for_db(lambda: ranks_of(first_task)) == {d: 1, a: 2, b: 3, c: 4}

    # 2. keyboard only: move, tie, untie, tie again
    second_task = shown_task_id(page)
    a, b, c, d = shown_order(page)
    assert page.evaluate("document.activeElement.dataset.completionId") == str(a)
    page.keyboard.press("Shift+ArrowDown")  # b a c d
    page.keyboard.press("ArrowDown")  # focus c
    page.keyboard.press("t")  # b [a c] d
    page.keyboard.press("ArrowDown")  # focus d
    page.keyboard.press("Shift+ArrowUp")  # b d [a c]
    assert shown_order(page) == [b, d, a, c]
    expect(page.locator("#current .rank-badge")).to_have_text(["1", "2", "3=", "3="])
    page.keyboard.press("ArrowDown")
    page.keyboard.press("ArrowDown")  # focus c
    page.keyboard.press("u")
    expect(page.locator("#current .rank-badge")).to_have_text(["1", "2", "3", "4"])
    page.keyboard.press("t")
    expect(page.locator("#current .rank-badge")).to_have_text(["1", "2", "3=", "3="])
    page.keyboard.press("r")
    page.keyboard.type("b is the only one that explains slicing")
    page.keyboard.press("Escape")
    page.screenshot(path=str(artifacts / "annotate-ranking.png"), full_page=True)
    page.keyboard.press("Enter")
    expect(page.locator("#count-mine")).to_have_text("2")
    assert wait_for_db(lambda: ranks_of(second_task)) == {b: 1, d: 2, a: 3, c: 3}
    judgement = RankingJudgement.objects.get(assignment_id=second_task)
    assert judgement.rationale == "b is the only one that explains slicing" and judgement.time_ms > 0

    # 3. skip with a reason (Enter in the reason field), 4. skip with K; then nothing is left
    third_task = shown_task_id(page)
    page.locator("#current input[name=reason]").fill("Duplicate question")
    page.keyboard.press("Enter")
    expect(page.locator("#current form.task")).not_to_have_attribute("data-task-id", str(third_task))
    skipped = wait_for_db(lambda: Assignment.objects.filter(pk=third_task, state="skipped").first())
    assert skipped.skip_reason == "Duplicate question"
    fourth_task = shown_task_id(page)
    page.keyboard.press("k")
    expect(page.locator("#current .all-done")).to_be_visible()
    assert wait_for_db(lambda: Assignment.objects.filter(pk=fourth_task, state="skipped").first()).skip_reason == ""
    expect(page.locator("#count-mine")).to_have_text("2")
    assert RankingJudgement.objects.count() == 2 and Assignment.objects.filter(state="leased").count() == 0


def test_pairwise_with_number_keys_and_the_help_overlay(live_server, page, artifacts):
    project = make_project(mode="pairwise", prompts=1, k=3)
    log_in(page, live_server, project, home_screenshot=artifacts / "home.png")
    page.keyboard.press("?")
    expect(page.locator("#help")).to_be_visible()
    expect(page.locator("#help")).to_contain_text("Both bad")
    page.keyboard.press("Escape")
    expect(page.locator("#help")).to_be_hidden()

    page.keyboard.press("g")
    expect(page.locator("#guidelines")).to_have_count(0)  # this project has none

    expected = []
    for keys, choice, strength in [(["1"], "a", ""), (["2", "s"], "b", "slight"), (["4", "c"], "both_bad", "clear")]:
        task = shown_task_id(page)
        for key in keys:
            page.keyboard.press(key)
        if choice == "a":
            expect(page.locator("#current input[name=choice][value=a]")).to_be_checked()
            page.screenshot(path=str(artifacts / "annotate-pairwise.png"), full_page=True)
        page.keyboard.press("Enter")
        expected.append((task, choice, strength))
        expect(page.locator("#count-mine")).to_have_text(str(len(expected)))
    expect(page.locator("#current .all-done")).to_be_visible()
    stored = wait_for_db(
        lambda: (
            list(PairwiseJudgement.objects.values_list("assignment_id", "choice", "strength").order_by("pk"))
            if PairwiseJudgement.objects.count() == 3
            else None
        )
    )
    assert stored == expected
    assert len(set(PairwiseJudgement.objects.values_list("item_key", flat=True))) == 3
    assert all(t > 0 for t in PairwiseJudgement.objects.values_list("time_ms", flat=True))


def test_enter_without_a_choice_submits_nothing_and_a_narrow_screen_stacks_the_pair(live_server, page, artifacts):
    project = make_project(mode="pairwise", prompts=1, k=2)
    log_in(page, live_server, project)
    task = shown_task_id(page)
    posts = []
    page.on("request", lambda request: posts.append(request.url) if request.method == "POST" else None)
    page.evaluate(
        """() => document.querySelector("#current input[name=choice]")
            .addEventListener("invalid", () => { window.choiceMissing = true; })"""
    )
    page.keyboard.press("Enter")
    # Instead of posting, the page asks for a choice (the radio's validity check) and stops there.
    page.wait_for_function("() => window.choiceMissing === true")
    assert posts == []
    assert shown_task_id(page) == task and not PairwiseJudgement.objects.exists()
    page.set_viewport_size({"width": 420, "height": 900})
    a, b = page.locator("#current .completion").all()
    assert b.bounding_box()["y"] > a.bounding_box()["y"] + a.bounding_box()["height"] - 1
    page.screenshot(path=str(artifacts / "annotate-pairwise-narrow.png"), full_page=True)


def test_the_page_works_without_javascript(live_server, browser):
    project = make_project(mode="pairwise", prompts=1, k=2)
    context = browser.new_context(java_script_enabled=False)
    page = context.new_page()
    UserFactory(username="plain")
    MembershipFactory(user=UserFactory._meta.model.objects.get(username="plain"), project=project)
    log_in_as(page, live_server, "plain")
    page.goto(f"{live_server.url}/projects/{project.slug}/annotate/")
    page.get_by_label("B is better").check()
    page.get_by_role("button", name=re.compile("^Submit")).click()
    expect(page.locator(".all-done")).to_be_visible()
    assert PairwiseJudgement.objects.get().choice == "b"
    context.close()


def test_hostile_completions_are_shown_as_text_and_run_nothing(live_server, page):
    hostile = [
        "<script>window.pwned = 1; alert('script')</script>",
        '<img src="/evil-img/" onerror="alert(\'img\')">',
        "[click me](javascript:alert('link'))",
        '<div hx-get="/evil-hx/" hx-trigger="load">hx</div>',
        "smuggled",
    ]
    project = make_project(mode="ranking", prompts=1, k=5, texts=hostile)
    # HTML that somehow bypassed the sanitizer: CSP and hx-disable still stop it
    prompt = project.prompts.get()
    smuggled = prompt.completions.order_by("pk").last()
    smuggled.html = (
        '<button hx-get="/evil-hx-raw/" hx-trigger="load">raw</button>'
        "<script>alert('inline')</script><img src=\"/evil-raw-img/\" onerror=\"alert('raw')\">"
    )
    smuggled.save()

    dialogs, requests = [], []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    page.on("request", lambda request: requests.append(request.url))
    page.add_init_script(
        "window.violations = []; document.addEventListener('securitypolicyviolation',"
        " (event) => window.violations.push(event.effectiveDirective));"
    )
    log_in(page, live_server, project)
    # What happens instead of the smuggled script and handler running: the CSP refuses each of them. By then
    # the page has loaded (the broken image's error comes after htmx has processed the page).
    page.wait_for_function("() => window.violations.length >= 2")
    assert sorted(set(page.evaluate("window.violations"))) == ["script-src-attr", "script-src-elem"]

    body = page.locator("#current")
    expect(body).to_contain_text("<script>window.pwned = 1; alert('script')</script>")
    expect(body).to_contain_text('<img src="/evil-img/" onerror="alert(\'img\')">')
    expect(body).to_contain_text("[click me](javascript:alert('link'))")
    expect(body).to_contain_text('<div hx-get="/evil-hx/" hx-trigger="load">hx</div>')
    assert page.locator("#current a[href^=javascript]").count() == 0
    assert dialogs == []
    assert page.evaluate("window.pwned") is None
    assert not [url for url in requests if "/evil-hx" in url]


def test_an_answer_the_server_refuses_is_reported_not_lost_silently(live_server, page):
    project = make_project(mode="pairwise", prompts=1, k=3)
    log_in(page, live_server, project)
    page.context.clear_cookies()  # logged out and without a CSRF cookie: the post is refused
    page.keyboard.press("1")
    page.keyboard.press("Enter")
    expect(page.locator("#notice")).to_contain_text("Your last answer was not saved (the server answered 403)")
    assert not PairwiseJudgement.objects.exists()
