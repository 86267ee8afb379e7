import threading
import uuid
from collections import Counter
from datetime import timedelta

import pytest
from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from feedback.models import Assignment, PairwiseJudgement, Project, Prompt, RankingJudgement, RoundPrompt
from feedback.selectors.tasks import judgements_left, task_for_assignment, task_progress
from feedback.services.assignments import assignment_lease_renew, assignment_skip
from tests.factories import CompletionFactory, ProjectFactory, PromptFactory, UserFactory
from tests.feedback.queue_helpers import judge, lease, make_project, submit, work_until_done


@pytest.fixture(autouse=True)
def _fast_password_hashing(settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.mark.django_db
def test_ranking_items_reach_the_overlap_exactly_and_nobody_judges_one_twice():
    project = make_project(prompts=3, overlap=2)
    annotators = UserFactory.create_batch(3)
    for annotator in annotators:
        work_until_done(project, annotator)
    per_prompt = Counter(RankingJudgement.objects.values_list("prompt_id", flat=True))
    assert per_prompt == {prompt.pk: 2 for prompt in project.prompts.all()}
    per_annotator_prompt = Counter(RankingJudgement.objects.values_list("annotator_id", "prompt_id"))
    assert set(per_annotator_prompt.values()) == {1}
    assert all(lease(project, a) is None for a in annotators)
    assert list(RoundPrompt.objects.filter(round__project=project).values_list("judgement_count", flat=True)) == [
        2,
        2,
        2,
    ]


@pytest.mark.django_db
def test_pairwise_serves_every_pair_of_the_first_k_completions_once():
    project = make_project(mode="pairwise", prompts=2, k=4, overlap=1)
    extra = CompletionFactory(prompt=project.prompts.first())  # beyond K: not part of any item
    annotator = UserFactory()
    done = work_until_done(project, annotator)
    assert len(done) == 2 * 6
    keys = Counter(j.item_key for j in PairwiseJudgement.objects.all())
    assert set(keys.values()) == {1}
    for prompt in project.prompts.all():
        ids = sorted(c.pk for c in prompt.completions.all() if c.pk != extra.pk)
        expected = {f"c{a}-{b}" for i, a in enumerate(ids) for b in ids[i + 1 :]}
        assert {j.item_key for j in PairwiseJudgement.objects.filter(prompt=prompt)} == expected
    assert not PairwiseJudgement.objects.filter(left=extra).exists()
    assert not PairwiseJudgement.objects.filter(right=extra).exists()


@pytest.mark.django_db
def test_pairwise_spreads_a_round_so_every_completion_meets_others_evenly():
    project = make_project(mode="pairwise", prompts=1, k=4, overlap=1)
    annotator = UserFactory()
    first_two = []
    for _ in range(2):
        assignment = lease(project, annotator)
        judge(project, annotator, assignment)
        first_two.append(set(assignment.display_order))
    # the second pair avoids the two completions already compared: all four have been shown once
    assert first_two[0].isdisjoint(first_two[1])


@pytest.mark.django_db
def test_least_judged_prompts_come_first():
    project = make_project(prompts=3, overlap=3)
    first, second, third = project.prompts.order_by("pk")
    RoundPrompt.objects.filter(prompt=first).update(judgement_count=2)
    RoundPrompt.objects.filter(prompt=second).update(judgement_count=1)
    assignment = lease(project, UserFactory())
    assert assignment.prompt_id == third.pk


@pytest.mark.django_db
def test_an_unfinished_lease_is_resumed_and_can_be_excluded_for_prefetch():
    project = make_project(prompts=3)
    annotator = UserFactory()
    current = lease(project, annotator)
    assert lease(project, annotator).pk == current.pk
    prefetched = lease(project, annotator, exclude_ids=[current.pk])
    assert prefetched.pk != current.pk
    assert Assignment.objects.filter(annotator=annotator, state="leased").count() == 2


@pytest.mark.django_db
def test_an_expired_lease_returns_its_item_to_the_pool():
    project = make_project(prompts=1, overlap=1)
    first, second = UserFactory.create_batch(2)
    abandoned = lease(project, first)
    assert lease(project, second) is None
    Assignment.objects.filter(pk=abandoned.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    taken = lease(project, second)
    assert taken is not None and taken.item_key == abandoned.item_key and taken.slot == abandoned.slot
    assert not Assignment.objects.filter(pk=abandoned.pk).exists()
    with pytest.raises(Exception, match="went to someone else"):
        judge(project, first, abandoned)


@pytest.mark.django_db
def test_an_expired_lease_nobody_took_can_still_be_submitted():
    project = make_project(prompts=1)
    annotator = UserFactory()
    assignment = lease(project, annotator)
    Assignment.objects.filter(pk=assignment.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    assert judge(project, annotator, assignment).created


@pytest.mark.django_db
def test_renewing_restarts_only_the_annotators_own_unfinished_leases():
    project = make_project(prompts=3)
    me, other = UserFactory.create_batch(2)
    mine = lease(project, me)
    theirs = lease(project, other)
    soon = timezone.now() + timedelta(seconds=5)
    Assignment.objects.update(expires_at=soon)
    assert assignment_lease_renew(project=project, annotator=me, task_ids=[mine.pk, theirs.pk]) == 1
    mine.refresh_from_db()
    theirs.refresh_from_db()
    assert mine.expires_at > soon + timedelta(seconds=500) and theirs.expires_at == soon


@pytest.mark.django_db
def test_skip_frees_the_slot_for_others_and_never_serves_the_item_again():
    project = make_project(prompts=1, overlap=1)
    first, second = UserFactory.create_batch(2)
    assignment = lease(project, first)
    skipped = assignment_skip(project=project, annotator=first, task_id=assignment.pk, reason="Not my language")
    assert skipped.state == "skipped" and skipped.slot is None and skipped.skip_reason == "Not my language"
    assert lease(project, first) is None
    assert lease(project, second).item_key == assignment.item_key


@pytest.mark.django_db
def test_display_order_is_randomised_per_assignment_and_recorded():
    project = make_project(prompts=1, k=6, overlap=20)
    prompt = project.prompts.get()
    ids = sorted(prompt.completions.values_list("pk", flat=True))
    orders = set()
    for _ in range(20):
        assignment = lease(project, UserFactory())
        assert sorted(assignment.display_order) == ids
        orders.add(tuple(assignment.display_order))
    assert len(orders) > 1
    task = task_for_assignment(assignment=assignment)
    assert [c.pk for c in task.completions] == assignment.display_order


@pytest.mark.django_db
def test_prompts_with_fewer_than_two_completions_are_not_served():
    project = ProjectFactory(mode="ranking")
    CompletionFactory(prompt=PromptFactory(project=project))
    PromptFactory(project=project)
    assert lease(project, UserFactory()) is None


@pytest.mark.django_db
def test_progress_counts_mine_everyones_and_whats_left():
    project = make_project(mode="pairwise", prompts=2, k=3, overlap=2)  # 2 prompts x 3 pairs x 2 = 12 wanted
    me, other = UserFactory.create_batch(2)
    for _ in range(2):
        judge(project, me, lease(project, me))
    judge(project, other, lease(project, other))
    progress = task_progress(project=project, annotator=me)
    assert (progress.judged_by_me, progress.judged_total, progress.left) == (2, 3, 9)


@pytest.mark.django_db
@pytest.mark.parametrize(("mode", "left"), [("pairwise", 6 + 0 + 1 + 0), ("ranking", 2 + 0 + 1 + 0)])
def test_whats_left_counts_the_first_k_completions_and_never_goes_below_zero(mode, left):
    project = ProjectFactory(mode=mode, completions_per_prompt=3, overlap=2)
    for completions, judged in [(5, 0), (1, 0), (2, 1), (3, 7)]:  # only 3 of the 5 count; 1 makes no item
        prompt = PromptFactory(project=project)
        CompletionFactory.create_batch(completions, prompt=prompt)
        RoundPrompt.objects.filter(prompt=prompt).update(judgement_count=judged)
    assert judgements_left(project=project) == left


def _annotate_concurrently(project_id: int, annotator_ids: list[int], barrier: threading.Barrier, errors: list):
    def work(annotator_id: int) -> None:
        try:
            project = Project.objects.get(pk=project_id)
            annotator = UserFactory._meta.model.objects.get(pk=annotator_id)
            barrier.wait()
            while (assignment := lease(project, annotator)) is not None:
                judge(project, annotator, assignment)
        except Exception as error:  # reported by the test below
            errors.append(error)
        finally:
            connection.close()

    threads = [threading.Thread(target=work, args=(pk,)) for pk in annotator_ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("mode", ["ranking", "pairwise"])
def test_concurrent_annotators_never_exceed_the_overlap_or_repeat_an_item(mode):
    project = make_project(mode=mode, prompts=6, k=3, overlap=2)
    annotators = UserFactory.create_batch(5)
    errors: list = []
    _annotate_concurrently(project.pk, [a.pk for a in annotators], threading.Barrier(len(annotators)), errors)
    assert errors == []
    judgements = PairwiseJudgement if mode == "pairwise" else RankingJudgement
    items = 6 * (3 if mode == "pairwise" else 1)
    key = "item_key" if mode == "pairwise" else "prompt_id"
    per_item = Counter(judgements.objects.values_list(key, flat=True))
    assert len(per_item) == items and set(per_item.values()) == {2}
    assert set(Counter(judgements.objects.values_list("annotator_id", key)).values()) == {1}
    assert Assignment.objects.filter(state="leased").count() == 0


@pytest.mark.django_db(transaction=True)
def test_the_same_submission_sent_at_once_from_many_threads_is_stored_once():
    project = make_project(prompts=1)
    annotator = UserFactory()
    assignment = lease(project, annotator)
    client_uuid = uuid.uuid4()
    results, errors = [], []
    barrier = threading.Barrier(6)

    def send() -> None:
        try:
            barrier.wait()
            results.append(
                submit(
                    project=project,
                    annotator=annotator,
                    task_id=assignment.pk,
                    client_uuid=client_uuid,
                    kind="ranking",
                    ranking=[assignment.display_order],
                )
            )
        except Exception as error:
            errors.append(error)
        finally:
            connection.close()

    threads = [threading.Thread(target=send) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert sorted(r.created for r in results) == [False] * 5 + [True]
    assert len({r.judgement.pk for r in results}) == 1
    assert RankingJudgement.objects.count() == 1
    assert RoundPrompt.objects.get().judgement_count == 1


@pytest.mark.django_db
def test_prompts_beyond_the_first_batch_are_served_when_the_first_batch_is_taken():
    """12 prompts, overlap 1: nine annotators asking once each all get a task, and the last three too."""
    project = make_project(prompts=12, overlap=1)
    annotators = UserFactory.create_batch(13)
    leases = [lease(project, annotator) for annotator in annotators]
    assert all(assignment is not None for assignment in leases[:12])
    assert leases[12] is None
    assert len({assignment.prompt_id for assignment in leases[:12]}) == 12


@pytest.mark.django_db
def test_a_later_batch_is_read_in_queue_order_after_the_first():
    """Prompts judged more often come after every less-judged one, across batches."""
    project = make_project(prompts=20, overlap=2)
    prompts = list(project.prompts.order_by("pk"))
    for prompt in prompts[:10]:  # counted as judged once (by nobody still holding a slot): two slots free each
        RoundPrompt.objects.filter(prompt=prompt).update(judgement_count=1)
    served = [lease(project, annotator).prompt_id for annotator in UserFactory.create_batch(40)]
    assert served == [p.pk for p in prompts[10:] + prompts[:10] for _ in range(2)]


@pytest.mark.django_db
def test_an_annotator_holds_at_most_two_leases_and_gets_the_older_one_back():
    project = make_project(prompts=5)
    annotator = UserFactory()
    current = lease(project, annotator)
    prefetched = lease(project, annotator, exclude_ids=[current.pk])
    assert prefetched.pk != current.pk
    assert {current.annotator_slot, prefetched.annotator_slot} == {0, 1}
    assert lease(project, annotator).pk == current.pk
    assert lease(project, annotator, exclude_ids=[current.pk]).pk == prefetched.pk
    assert lease(project, annotator, exclude_ids=[current.pk, prefetched.pk]) is None
    assert lease(project, annotator, resume_id=prefetched.pk).pk == prefetched.pk
    assert Assignment.objects.filter(annotator=annotator, state="leased").count() == 2
    judge(project, annotator, current)
    third = lease(project, annotator, exclude_ids=[prefetched.pk])
    assert third.pk not in (current.pk, prefetched.pk) and third.annotator_slot == current.annotator_slot
    current.refresh_from_db()
    assert current.state == "done" and current.annotator_slot is None
    assert Assignment.objects.filter(annotator=annotator, state="leased").count() == 2


@pytest.mark.django_db
def test_the_two_lease_places_are_per_project():
    first, second = make_project(prompts=3), make_project(prompts=3)
    annotator = UserFactory()
    held = [lease(project, annotator) for project in (first, second)]
    held += [lease(project, annotator, exclude_ids=[held[n].pk]) for n, project in enumerate((first, second))]
    assert all(assignment is not None for assignment in held)
    assert Assignment.objects.filter(annotator=annotator, state="leased").count() == 4


@pytest.mark.django_db(transaction=True)
def test_the_database_refuses_a_third_lease_or_a_finished_one_holding_a_place():
    project = make_project(prompts=3)
    annotator = UserFactory()
    current = lease(project, annotator)
    lease(project, annotator, exclude_ids=[current.pk])
    free_prompt = Prompt.objects.exclude(assignments__annotator=annotator).filter(project=project).first()
    third = {
        "project": project,
        "annotator": annotator,
        "prompt": free_prompt,
        "round": current.round,
        "item_key": f"p{free_prompt.pk}-r{current.round_id}",
        "slot": 0,
        "display_order": [],
        "expires_at": timezone.now(),
    }
    # Each refusal in a savepoint of its own: on PostgreSQL an error ends the transaction it happens in.
    for place in (0, 1):
        with pytest.raises(IntegrityError, match="(?i)unique constraint"), transaction.atomic():
            Assignment.objects.create(**third, annotator_slot=place)
    with pytest.raises(IntegrityError, match="(?i)check constraint"), transaction.atomic():
        Assignment.objects.create(**third, annotator_slot=2)
    with pytest.raises(IntegrityError, match="(?i)check constraint"), transaction.atomic():
        Assignment.objects.create(**third, annotator_slot=None)
    with pytest.raises(IntegrityError, match="(?i)check constraint"), transaction.atomic():
        Assignment.objects.filter(pk=current.pk).update(state="done")
    assert Assignment.objects.filter(annotator=annotator).count() == 2


@pytest.mark.django_db
def test_an_expired_lease_taken_over_by_someone_frees_the_annotators_place():
    project = make_project(prompts=3, overlap=1)
    slow, fast = UserFactory.create_batch(2)
    current = lease(project, slow)
    prefetched = lease(project, slow, exclude_ids=[current.pk])
    Assignment.objects.filter(pk=prefetched.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    assert lease(project, fast).item_key == prefetched.item_key
    assert not Assignment.objects.filter(pk=prefetched.pk).exists()
    replacement = lease(project, slow, exclude_ids=[current.pk])
    assert replacement.item_key not in (current.item_key, prefetched.item_key)
    assert replacement.annotator_slot == prefetched.annotator_slot
