import json
import re
import uuid
from datetime import timedelta

import pytest
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from feedback.models import Assignment, PairwiseJudgement, RankingJudgement
from feedback.services.assignments import assignment_lease_next
from tests.factories import CompletionFactory, MembershipFactory, ProjectFactory, PromptFactory, UserFactory

pytestmark = pytest.mark.django_db

HTMX = {"HTTP_HX_REQUEST": "true"}


@pytest.fixture(autouse=True)
def _fast_password_hashing(settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


def make_project(*, mode: str, prompts: int = 3, k: int = 4, texts=None, **kwargs):
    project = ProjectFactory(mode=mode, completions_per_prompt=k, **kwargs)
    for _ in range(prompts):
        prompt = PromptFactory(project=project)
        for index in range(k):
            CompletionFactory(prompt=prompt, **({"text": texts[index]} if texts else {}))
    return project


def member_client(project, role="annotator"):
    user = UserFactory()
    MembershipFactory(user=user, project=project, role=role)
    client = Client()
    client.force_login(user)
    return client, user


def current_task(client, project) -> Assignment:
    response = client.get(reverse("annotate", args=[project.slug]))
    task_id = int(re.search(r'name="task_id" value="(\d+)"', response.content.decode()).group(1))
    return Assignment.objects.get(pk=task_id)


def form_fields(html: str, task_id: int) -> dict[str, str]:
    form = re.search(rf'<form class="task[^"]*"[^>]*data-task-id="{task_id}".*?</form>', html, re.S).group(0)
    return dict(re.findall(r'name="(task_id|client_uuid|csrfmiddlewaretoken)" value="([^"]*)"', form))


def test_the_page_needs_a_login():
    project = make_project(mode="pairwise")
    response = Client().get(reverse("annotate", args=[project.slug]))
    assert response.status_code == 302 and response["Location"].startswith(reverse("login"))


def test_members_and_staff_may_annotate_others_may_not(staff_user):
    project = make_project(mode="pairwise")
    member, _ = member_client(project)
    assert member.get(reverse("annotate", args=[project.slug])).status_code == 200
    staff = Client()
    staff.force_login(staff_user)
    assert staff.get(reverse("annotate", args=[project.slug])).status_code == 200
    outsider = Client()
    outsider.force_login(UserFactory())
    url = reverse("annotate-submit", args=[project.slug])
    assert outsider.get(reverse("annotate", args=[project.slug])).status_code == 404
    assert outsider.post(url, {"task_id": 1}).status_code == 404
    assert member.get(reverse("annotate", args=["no-such-project"])).status_code == 404


def test_the_page_shows_the_task_and_prefetches_the_next_one_safely():
    hostile = ["<script>alert(1)</script>", "[x](javascript:alert(1))", '<img src=x onerror="alert(1)">', "fine"]
    project = make_project(mode="ranking", texts=hostile, guidelines="Prefer <b>short</b> answers.")
    client, user = member_client(project)
    response = client.get(reverse("annotate", args=[project.slug]))
    html = response.content.decode()
    assert response.status_code == 200
    assert "script-src 'self'" in response["Content-Security-Policy"]
    leases = Assignment.objects.filter(annotator=user, state="leased")
    assert leases.count() == 2  # the task on screen and the prefetched one
    for lease in leases:
        assert f'data-task-id="{lease.pk}"' in html
    assert '"selfRequestsOnly": true' in html and '"allowEval": false' in html and '"allowScriptTags": false' in html
    assert "<script>alert" not in html
    assert not re.search(r"<[a-z]+[^>]*\bonerror", html) and 'href="javascript:' not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "Prefer &lt;b&gt;short&lt;/b&gt; answers." in html
    assert html.count('class="markdown body" hx-disable') == 8
    assert re.findall(r"<script(?![^>]*\bsrc=)(?![^>]*application/json)", html) == []
    assert " style=" not in html and "<style" not in html
    assert json.loads(re.search(r'id="annotate-config" type="application/json">(.*?)</script>', html).group(1)) == {
        "mode": "ranking",
        "nextUrl": reverse("annotate-next", args=[project.slug]),
    }


def test_a_plain_pairwise_post_stores_the_judgement_and_shows_the_next_task():
    project = make_project(mode="pairwise", k=3)
    client, user = member_client(project)
    task = current_task(client, project)
    response = client.post(
        reverse("annotate-submit", args=[project.slug]),
        {
            "task_id": task.pk,
            "client_uuid": str(uuid.uuid4()),
            "choice": "b",
            "strength": "slight",
            "rationale": "B cites",
        },
    )
    assert response.status_code == 302 and response["Location"] == reverse("annotate", args=[project.slug])
    judgement = PairwiseJudgement.objects.get()
    assert (judgement.annotator, judgement.choice, judgement.strength, judgement.rationale) == (
        user,
        "b",
        "slight",
        "B cites",
    )
    assert [judgement.left_id, judgement.right_id] == task.display_order
    assert current_task(client, project).pk != task.pk


def test_a_plain_ranking_post_with_equal_ranks_stores_a_tie():
    project = make_project(mode="ranking")
    client, _ = member_client(project)
    task = current_task(client, project)
    a, b, c, d = task.display_order
    response = client.post(
        reverse("annotate-submit", args=[project.slug]),
        {
            "task_id": task.pk,
            "client_uuid": str(uuid.uuid4()),
            f"rank-{a}": "2",
            f"rank-{b}": "1",
            f"rank-{c}": "2",
            f"rank-{d}": "4",
        },
    )
    assert response.status_code == 302
    ranks = dict(RankingJudgement.objects.get().ranked.values_list("completion_id", "rank"))
    assert ranks == {b: 1, a: 2, c: 2, d: 3}


def test_a_repeated_plain_post_stores_one_judgement():
    project = make_project(mode="pairwise", k=3)
    client, _ = member_client(project)
    task = current_task(client, project)
    data = {"task_id": task.pk, "client_uuid": str(uuid.uuid4()), "choice": "a"}
    url = reverse("annotate-submit", args=[project.slug])
    assert client.post(url, data).status_code == 302
    assert client.post(url, data).status_code == 302
    assert PairwiseJudgement.objects.count() == 1


@pytest.mark.parametrize(
    ("mode", "change", "field"),
    [
        ("pairwise", {"choice": ""}, "choice"),
        ("pairwise", {"choice": "maybe"}, "choice"),
        ("pairwise", {"strength": "hugely"}, "strength"),
        ("pairwise", {"rationale": "x" * 5001}, "rationale"),
        ("pairwise", {"client_uuid": "not-a-uuid"}, "client_uuid"),
        ("pairwise", {"task_id": "abc"}, "task_id"),
        ("pairwise", {"time_ms": "-5"}, "time_ms"),
        ("ranking", {"drop_rank": True}, "ranking"),
        ("ranking", {"rank_value": "first"}, "ranking"),
        ("ranking", {"rank_value": "0"}, "ranking"),
        ("ranking", {"extra_rank": True}, "ranking"),
    ],
)
def test_an_invalid_plain_post_shows_the_error_at_the_field_and_stores_nothing(mode, change, field):
    project = make_project(mode=mode, k=3)
    client, _ = member_client(project)
    task = current_task(client, project)
    data = (
        {"task_id": task.pk, "client_uuid": str(uuid.uuid4()), "choice": "a"}
        if mode == "pairwise"
        else {
            "task_id": task.pk,
            "client_uuid": str(uuid.uuid4()),
        }
    )
    if mode == "ranking":
        data |= {f"rank-{c}": str(i) for i, c in enumerate(task.display_order, start=1)}
        first = task.display_order[0]
        if change.pop("drop_rank", False):
            del data[f"rank-{first}"]
        if "rank_value" in change:
            data[f"rank-{first}"] = change.pop("rank_value")
        if change.pop("extra_rank", False):
            data[f"rank-{CompletionFactory().pk}"] = "1"
    data |= change
    response = client.post(reverse("annotate-submit", args=[project.slug]), data)
    html = response.content.decode()
    assert response.status_code == 400
    assert "Your judgement was not saved" in html and f"<strong>{field}</strong>" in html
    assert 'class="errorlist"' in html
    assert not PairwiseJudgement.objects.exists() and not RankingJudgement.objects.exists()
    if field not in ("task_id",):
        assert f'data-task-id="{task.pk}"' in html  # the same task is shown again, to correct


def test_someone_elses_task_is_refused():
    project = make_project(mode="pairwise", k=3)
    owner, _ = member_client(project)
    task = current_task(owner, project)
    intruder, _ = member_client(project)
    response = intruder.post(
        reverse("annotate-submit", args=[project.slug]),
        {"task_id": task.pk, "client_uuid": str(uuid.uuid4()), "choice": "a"},
    )
    assert response.status_code == 400 and "leased to someone else" in response.content.decode()
    assert not PairwiseJudgement.objects.exists()


def test_an_htmx_submit_answers_with_a_new_prefetched_task_and_an_event():
    project = make_project(mode="pairwise", k=3)
    client, user = member_client(project)
    page = client.get(reverse("annotate", args=[project.slug])).content.decode()
    shown, prefetched = Assignment.objects.filter(annotator=user).order_by("pk")
    Assignment.objects.filter(pk=prefetched.pk).update(expires_at=timezone.now() + timedelta(seconds=5))
    response = client.post(
        reverse("annotate-submit", args=[project.slug]),
        {
            "task_id": shown.pk,
            "client_uuid": form_fields(page, shown.pk)["client_uuid"],
            "choice": "tie",
            "time_ms": "4200",
            "shown": prefetched.pk,
        },
        **HTMX,
    )
    html = response.content.decode()
    assert response.status_code == 200
    assert json.loads(response["HX-Trigger"]) == {"rankwise:judged": {}}
    assert "<html" not in html and html.count('<form class="task') == 1
    new_id = int(re.search(r'data-task-id="(\d+)"', html).group(1))
    assert new_id not in (shown.pk, prefetched.pk)
    assert PairwiseJudgement.objects.get().time_ms == 4200
    prefetched.refresh_from_db()  # now on screen: its lease starts again
    assert prefetched.expires_at > timezone.now() + timedelta(seconds=project.lease_seconds - 60)


def test_an_htmx_submit_that_fails_says_so_in_the_notice():
    project = make_project(mode="pairwise", k=3)
    client, _ = member_client(project)
    task = current_task(client, project)
    response = client.post(
        reverse("annotate-submit", args=[project.slug]),
        {"task_id": task.pk + 1000, "client_uuid": str(uuid.uuid4()), "choice": "a"},
        **HTMX,
    )
    assert response.status_code == 200
    assert response["HX-Retarget"] == "#notice" and response["HX-Reswap"] == "innerHTML"
    assert "Your judgement was not saved" in response.content.decode()
    assert not PairwiseJudgement.objects.exists()


def test_the_next_endpoint_prefetches_a_task_other_than_the_shown_one():
    project = make_project(mode="ranking", prompts=3)
    client, user = member_client(project)
    task = current_task(client, project)
    response = client.get(reverse("annotate-next", args=[project.slug]), {"shown": task.pk}, **HTMX)
    assert f'data-task-id="{task.pk}"' not in response.content.decode()
    assert 'class="task task-ranking"' in response.content.decode()


def test_skipping_plain_and_with_htmx():
    project = make_project(mode="ranking", prompts=3)
    client, _ = member_client(project)
    task = current_task(client, project)
    url = reverse("annotate-skip", args=[project.slug])
    assert client.post(url, {"task_id": task.pk, "reason": "Cannot read Welsh"}).status_code == 302
    task.refresh_from_db()
    assert (task.state, task.skip_reason, task.slot) == ("skipped", "Cannot read Welsh", None)
    second = current_task(client, project)
    response = client.post(url, {"task_id": second.pk}, **HTMX)
    assert json.loads(response["HX-Trigger"]) == {"rankwise:skipped": {}}
    response = client.post(url, {"task_id": second.pk + 999}, **HTMX)
    assert response["HX-Retarget"] == "#notice"


def test_all_done_when_nothing_is_left():
    project = make_project(mode="ranking", prompts=1)
    client, _ = member_client(project)
    task = current_task(client, project)
    client.post(reverse("annotate-skip", args=[project.slug]), {"task_id": task.pk})
    assert "All done" in client.get(reverse("annotate", args=[project.slug])).content.decode()


def test_posts_need_the_csrf_token():
    project = make_project(mode="pairwise", k=3)
    user = UserFactory()
    MembershipFactory(user=user, project=project)
    client = Client(enforce_csrf_checks=True)
    client.force_login(user)
    page = client.get(reverse("annotate", args=[project.slug])).content.decode()
    task = Assignment.objects.filter(annotator=user).order_by("pk").first()
    fields = form_fields(page, task.pk)
    data = {"task_id": task.pk, "client_uuid": fields["client_uuid"], "choice": "a"}
    url = reverse("annotate-submit", args=[project.slug])
    assert client.post(url, data, **HTMX).status_code == 403
    assert client.post(url, data | {"csrfmiddlewaretoken": fields["csrfmiddlewaretoken"]}, **HTMX).status_code == 200
    assert PairwiseJudgement.objects.count() == 1


def test_home_shows_progress_per_project_and_a_start_button(staff_user):
    mine = make_project(mode="ranking", prompts=3, overlap=2, name="Mine")
    make_project(mode="pairwise", prompts=1, name="Someone else's")
    client, user = member_client(mine)
    other, _ = member_client(mine)
    for annotator_client in (client, other):
        task = current_task(annotator_client, mine)
        annotator_client.post(
            reverse("annotate-submit", args=[mine.slug]),
            {"task_id": task.pk, "client_uuid": str(uuid.uuid4()), **{f"rank-{c}": "1" for c in task.display_order}},
        )
    html = client.get(reverse("home")).content.decode()
    row = re.search(r"<td>Mine</td>.*?</tr>", html, re.S).group(0)
    assert [int(n) for n in re.findall(r"<td>(\d+)</td>", row)] == [3, 1, 2, 4]
    assert reverse("annotate", args=[mine.slug]) in row and "Continue" in row
    assert "Someone else" not in html
    staff = Client()
    staff.force_login(staff_user)
    staff_html = staff.get(reverse("home")).content.decode()
    assert "Mine" in staff_html and "Someone else&#x27;s" in staff_html


def test_a_lease_reserved_for_the_page_is_resumed_after_a_reload():
    project = make_project(mode="ranking", prompts=4)
    client, user = member_client(project)
    first = current_task(client, project)
    assert current_task(client, project).pk == first.pk
    assert assignment_lease_next(project=project, annotator=user).task_id == first.pk
