import uuid

import pytest
from django.core.cache import cache
from django.urls import reverse
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from feedback.models import Assignment, PairwiseJudgement, RankingJudgement
from tests.factories import CompletionFactory, MembershipFactory, ProjectFactory, PromptFactory, UserFactory

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _fast_password_hashing_and_fresh_throttles(settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    cache.clear()


def make_project(*, mode: str, prompts: int = 2, k: int = 4, **kwargs):
    project = ProjectFactory(mode=mode, completions_per_prompt=k, **kwargs)
    for _ in range(prompts):
        CompletionFactory.create_batch(k, prompt=PromptFactory(project=project))
    return project


def member(project, role="annotator") -> APIClient:
    user = UserFactory()
    MembershipFactory(user=user, project=project, role=role)
    client = APIClient()
    client.force_authenticate(user)
    return client


def next_task(client, project):
    return client.get(reverse("api:project-next-task", args=[project.slug]))


def submit(client, project, body):
    return client.post(reverse("api:project-judgements", args=[project.slug]), body, format="json")


def judgement_body(task: dict) -> dict:
    body = {"task_id": task["task_id"], "client_uuid": str(uuid.uuid4()), "kind": task["kind"]}
    if task["kind"] == "ranking":
        return body | {"ranking": [[c["id"]] for c in task["completions"]]}
    return body | {"choice": "a"}


def test_next_task_returns_the_task_as_designed():
    project = make_project(mode="pairwise", k=2, prompts=1)
    prompt = project.prompts.get()
    response = next_task(member(project), project)
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"task_id", "kind", "prompt", "completions", "lease_expires_at"}
    assignment = Assignment.objects.get(pk=body["task_id"])
    assert body["kind"] == "pairwise" and body["prompt"] == prompt.messages
    assert [c["id"] for c in body["completions"]] == assignment.display_order
    first = prompt.completions.get(pk=body["completions"][0]["id"])
    assert body["completions"][0] == {"id": first.pk, "text": first.text, "html": first.html}


def test_next_task_resumes_the_unfinished_lease_and_answers_204_when_nothing_is_left():
    project = make_project(mode="ranking", prompts=1)
    client = member(project)
    first = next_task(client, project).json()
    assert next_task(client, project).json()["task_id"] == first["task_id"]
    ranking = [[c["id"]] for c in first["completions"]]
    body = {"task_id": first["task_id"], "client_uuid": str(uuid.uuid4()), "kind": "ranking", "ranking": ranking}
    assert submit(client, project, body).status_code == 201
    response = next_task(client, project)
    assert response.status_code == 204 and response.content == b""


def test_a_ranking_with_ties_is_created_then_repeated_with_200_and_the_same_body():
    project = make_project(mode="ranking")
    client = member(project)
    task = next_task(client, project).json()
    a, b, c, d = (c["id"] for c in task["completions"])
    body = {
        "task_id": task["task_id"],
        "client_uuid": str(uuid.uuid4()),
        "kind": "ranking",
        "ranking": [[b], [a, d], [c]],
        "rationale": "b answers the question",
        "time_ms": 8000,
    }
    created = submit(client, project, body)
    assert created.status_code == 201
    assert created.json()["ranking"] == [[b], [a, d], [c]]
    assert created.json()["task_id"] == task["task_id"] and "choice" not in created.json()
    repeated = submit(client, project, body | {"ranking": [[a], [b], [c], [d]]})
    assert repeated.status_code == 200 and repeated.json() == created.json()
    assert RankingJudgement.objects.count() == 1


def test_a_pairwise_judgement_is_created():
    project = make_project(mode="pairwise", k=3)
    client = member(project)
    task = next_task(client, project).json()
    body = {"task_id": task["task_id"], "client_uuid": str(uuid.uuid4()), "kind": "pairwise", "choice": "both_bad"}
    response = submit(client, project, body | {"strength": "clear"})
    assert response.status_code == 201
    assert response.json()["choice"] == "both_bad" and response.json()["strength"] == "clear"
    assert "ranking" not in response.json()
    judgement = PairwiseJudgement.objects.get()
    assert [judgement.left_id, judgement.right_id] == [c["id"] for c in task["completions"]]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"task_id": None}, "task_id"),
        ({"task_id": "x"}, "task_id"),
        ({"client_uuid": "nope"}, "client_uuid"),
        ({"kind": "rating"}, "kind"),
        ({"kind": "ranking"}, "kind"),
        ({"choice": "c"}, "choice"),
        ({"choice": None}, "choice"),
        ({"strength": "huge"}, "strength"),
        ({"ranking": [[1]]}, "ranking"),
        ({"rationale": "x" * 5001}, "rationale"),
        ({"time_ms": -1}, "time_ms"),
        ({"task_id": 10**9}, "task_id"),
    ],
)
def test_an_invalid_pairwise_judgement_answers_400_at_the_field_and_stores_nothing(change, field):
    project = make_project(mode="pairwise", k=3)
    client = member(project)
    task = next_task(client, project).json()
    body = {"task_id": task["task_id"], "client_uuid": str(uuid.uuid4()), "kind": "pairwise", "choice": "a"}
    body |= change
    response = submit(client, project, {k: v for k, v in body.items() if v is not None})
    assert response.status_code == 400
    assert field in response.json()
    assert not PairwiseJudgement.objects.exists()


@pytest.mark.parametrize(
    ("ranking", "message"),
    [
        ("missing", "missing"),
        ("twice", "more than once"),
        ("foreign", "not part of this task"),
        ("empty-group", "This list may not be empty."),
        ("not-lists", "Expected a list"),
        ("absent", "Rank the completions"),
    ],
)
def test_an_invalid_ranking_answers_400_and_stores_nothing(ranking, message):
    project = make_project(mode="ranking")
    client = member(project)
    task = next_task(client, project).json()
    a, b, c, d = (c["id"] for c in task["completions"])
    rankings = {
        "missing": [[a], [b], [c]],
        "twice": [[a, b], [b], [c]],
        "foreign": [[a], [b], [c], [CompletionFactory().pk]],
        "empty-group": [[a], [], [b, c, d]],
        "not-lists": [a, b, c, d],
    }
    body = {"task_id": task["task_id"], "client_uuid": str(uuid.uuid4()), "kind": "ranking"}
    if ranking in rankings:
        body["ranking"] = rankings[ranking]
    response = submit(client, project, body)
    assert response.status_code == 400
    assert message in str(response.json()["ranking"])
    assert not RankingJudgement.objects.exists()


def test_someone_elses_task_is_refused():
    project = make_project(mode="pairwise", k=3)
    task = next_task(member(project), project).json()
    body = {"task_id": task["task_id"], "client_uuid": str(uuid.uuid4()), "kind": "pairwise", "choice": "a"}
    response = submit(member(project), project, body)
    assert response.status_code == 400 and "someone else" in response.json()["task_id"][0]


def test_a_client_uuid_reused_for_another_task_is_refused():
    project = make_project(mode="pairwise", k=3)
    client = member(project)
    client_uuid = str(uuid.uuid4())
    first = next_task(client, project).json()
    assert (
        submit(
            client,
            project,
            {"task_id": first["task_id"], "client_uuid": client_uuid, "kind": "pairwise", "choice": "a"},
        ).status_code
        == 201
    )
    second = next_task(client, project).json()
    response = submit(
        client, project, {"task_id": second["task_id"], "client_uuid": client_uuid, "kind": "pairwise", "choice": "a"}
    )
    assert response.status_code == 400 and "client_uuid" in response.json()


@pytest.mark.parametrize("role", ["annotator", "reviewer", "manager"])
def test_every_member_role_may_annotate(role):
    project = make_project(mode="pairwise", k=2)
    assert next_task(member(project, role=role), project).status_code == 200


def test_non_members_get_404_and_staff_may_annotate(staff_user):
    project = make_project(mode="pairwise", k=2)
    outsider = APIClient()
    outsider.force_authenticate(UserFactory())
    assert next_task(outsider, project).status_code == 404
    body = {"task_id": 1, "client_uuid": str(uuid.uuid4()), "kind": "pairwise", "choice": "a"}
    assert submit(outsider, project, body).status_code == 404
    staff = APIClient()
    staff.force_authenticate(staff_user)
    assert next_task(staff, project).status_code == 200
    assert next_task(staff, ProjectFactory.build(slug="missing")).status_code == 404


def test_anonymous_requests_are_refused():
    project = make_project(mode="pairwise", k=2)
    for response in (next_task(APIClient(), project), submit(APIClient(), project, {})):
        assert response.status_code == 401 and response["WWW-Authenticate"] == "Token"
        assert response.json() == {"detail": "Authentication credentials were not provided."}
    assert not Assignment.objects.exists()


def test_token_auth_works_and_session_posts_need_csrf():
    project = make_project(mode="pairwise", k=3)
    user = UserFactory()
    MembershipFactory(user=user, project=project)
    token = APIClient()
    token.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=user).key}")
    task = next_task(token, project).json()
    body = {"task_id": task["task_id"], "client_uuid": str(uuid.uuid4()), "kind": "pairwise", "choice": "a"}
    assert submit(token, project, body).status_code == 201
    session = APIClient(enforce_csrf_checks=True)
    session.force_login(user)
    second = next_task(session, project).json()
    body = {"task_id": second["task_id"], "client_uuid": str(uuid.uuid4()), "kind": "pairwise", "choice": "a"}
    assert submit(session, project, body).status_code == 403
    assert PairwiseJudgement.objects.count() == 1


@pytest.mark.parametrize("mode", ["pairwise", "ranking"])
def test_next_task_and_submit_take_a_few_queries_whatever_the_queue_holds(mode, django_assert_max_num_queries):
    project = make_project(mode=mode, prompts=12, overlap=2)
    clients = [member(project) for _ in range(3)]
    for client in clients:  # some leases and judgements already in the queue
        submit(client, project, judgement_body(next_task(client, project).json()))
    client = clients[0]
    # project, membership, own lease, the queue (its rounds, its gold prompts, then 3), the lease's insert in a
    # transaction (3), the task
    with django_assert_max_num_queries(12):
        task = next_task(client, project).json()
    # project, membership, the task, then its lease, the judgement (and ranks), the count in a transaction
    with django_assert_max_num_queries(9):
        assert submit(client, project, judgement_body(task)).status_code == 201
