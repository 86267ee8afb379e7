"""The task queue under real concurrency: annotators in separate processes, as under gunicorn's workers.

Each call runs in a forked process with its own database connection (SQLite in WAL mode, immediate
transactions, as in production); all of a test's processes are released at once by a barrier.
"""

import multiprocessing
import traceback
import uuid
from collections import Counter

import pytest
from django.contrib.auth.models import User
from django.db import connections
from django.urls import reverse
from rest_framework.test import APIClient

from feedback.db import use_own_connections
from feedback.models import Assignment, PairwiseJudgement, Project, RankingJudgement
from feedback.selectors.tasks import judgements_left
from feedback.services.assignments import assignment_lease_next
from feedback.services.judgements import JudgementSubmission, judgement_submit
from tests.factories import MembershipFactory, UserFactory
from tests.feedback.queue_helpers import make_project

# Forked processes see committed rows only: these tests commit theirs.
pytestmark = pytest.mark.django_db(transaction=True)

FORK = multiprocessing.get_context("fork")


def in_processes(target, calls: list[tuple]) -> list:
    """target(*args) for each args in calls, each in its own process, all started together; results in order."""
    APIClient().get(reverse("api:projects"))  # load the views and DRF once here, not in every child
    barrier = FORK.Barrier(len(calls))
    results = FORK.Queue()

    def run(index: int, args: tuple) -> None:
        use_own_connections()  # as the export's helpers do: never the parent's connection
        try:
            barrier.wait(timeout=60)
            results.put((index, target(*args), None))
        except BaseException:
            results.put((index, None, traceback.format_exc()))
        finally:
            connections.close_all()

    processes = [FORK.Process(target=run, args=(index, args)) for index, args in enumerate(calls)]
    for process in processes:
        process.start()
    answers = [results.get(timeout=300) for _ in processes]
    for process in processes:
        process.join(timeout=60)
    assert [process.exitcode for process in processes] == [0] * len(processes)
    assert [failure for _, _, failure in answers if failure] == []
    return [result for _, result, _ in sorted(answers, key=lambda answer: answer[0])]


def next_task_over_the_api(slug: str, user_id: int) -> int | None:
    client = APIClient()
    client.force_authenticate(User.objects.get(pk=user_id))
    response = client.get(reverse("api:project-next-task", args=[slug]))
    if response.status_code == 204:
        return None
    assert response.status_code == 200, response.content
    return response.json()["task_id"]


def lease_excluding(project_id: int, user_id: int, exclude_ids: list[int]) -> int | None:
    task = assignment_lease_next(
        project=Project.objects.get(pk=project_id), annotator=User.objects.get(pk=user_id), exclude_ids=exclude_ids
    )
    return None if task is None else task.task_id


def annotate_like_the_page(project_id: int, user_id: int) -> int:
    """Judge the task on screen while the next one is prefetched behind it, until nothing is left."""
    project, annotator = Project.objects.get(pk=project_id), User.objects.get(pk=user_id)
    current = assignment_lease_next(project=project, annotator=annotator)
    judged = 0
    while current is not None:
        prefetched = assignment_lease_next(project=project, annotator=annotator, exclude_ids=[current.task_id])
        ids = [c.pk for c in current.completions]
        fields = {"choice": "a"} if project.mode == Project.Mode.PAIRWISE else {"ranking": [[pk] for pk in ids]}
        submission = JudgementSubmission(task_id=current.task_id, client_uuid=uuid.uuid4(), kind=project.mode, **fields)
        assert judgement_submit(project=project, annotator=annotator, submission=submission).created
        judged += 1
        current = prefetched or assignment_lease_next(project=project, annotator=annotator)
    return judged


def members(project: Project, count: int) -> list[User]:
    users = UserFactory.create_batch(count)
    for user in users:
        MembershipFactory(user=user, project=project)
    return users


def test_nine_annotators_asking_at_once_each_get_one_of_twelve_prompts():
    project = make_project(prompts=12, overlap=1)
    annotators = members(project, 9)
    task_ids = in_processes(next_task_over_the_api, [(project.slug, a.pk) for a in annotators])
    assert None not in task_ids
    leases = Assignment.objects.filter(pk__in=task_ids)
    assert sorted(leases.values_list("annotator_id", flat=True)) == sorted(a.pk for a in annotators)
    assert len(set(leases.values_list("prompt_id", flat=True))) == 9
    # the three prompts left are still served, one each, and then nothing is
    latecomers = members(project, 4)
    late = in_processes(next_task_over_the_api, [(project.slug, a.pk) for a in latecomers])
    assert late.count(None) == 1
    assert Assignment.objects.filter(state="leased").values("prompt_id").distinct().count() == 12


def test_twenty_next_task_calls_at_once_by_one_user_share_one_lease():
    project = make_project(prompts=30, overlap=1)
    (annotator,) = members(project, 1)
    task_ids = in_processes(next_task_over_the_api, [(project.slug, annotator.pk)] * 20)
    live = list(Assignment.objects.filter(annotator=annotator, state="leased").values_list("pk", flat=True))
    assert len(live) == 1
    assert set(task_ids) == set(live)


def test_twenty_prefetches_at_once_by_one_user_make_one_second_lease():
    project = make_project(prompts=30, overlap=1)
    (annotator,) = members(project, 1)
    current = lease_excluding(project.pk, annotator.pk, [])
    task_ids = in_processes(lease_excluding, [(project.pk, annotator.pk, [current])] * 20)
    live = set(Assignment.objects.filter(annotator=annotator, state="leased").values_list("pk", flat=True))
    assert len(live) == 2 and current in live
    assert set(task_ids) == live - {current}


@pytest.mark.parametrize("mode", ["ranking", "pairwise"])
def test_annotators_in_parallel_processes_judge_every_item_exactly_to_the_overlap(mode):
    project = make_project(mode=mode, prompts=12, k=3, overlap=2)
    annotators = members(project, 9)
    judged = in_processes(annotate_like_the_page, [(project.pk, a.pk) for a in annotators])
    judgements = PairwiseJudgement if mode == "pairwise" else RankingJudgement
    key = "item_key" if mode == "pairwise" else "prompt_id"
    items = 12 * (3 if mode == "pairwise" else 1)
    per_item = Counter(judgements.objects.values_list(key, flat=True))
    assert len(per_item) == items and set(per_item.values()) == {2}  # none lost, none over the overlap
    assert set(Counter(judgements.objects.values_list("annotator_id", key)).values()) == {1}
    assert sum(judged) == judgements.objects.count() == 2 * items
    assert not Assignment.objects.filter(state="leased").exists()
    assert judgements_left(project=project) == 0
