"""Migration 0003: unfinished leases get their annotator's places, and no judgement is touched."""

from datetime import timedelta

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor
from django.utils import timezone

pytestmark = pytest.mark.django_db(transaction=True)

BEFORE = [("feedback", "0002_queue_order")]
AFTER = [("feedback", "0003_lease_places_and_judgement_base")]


def migrate(targets):
    executor = MigrationExecutor(connection)
    executor.migrate(targets)
    return executor.loader.project_state(targets).apps


def test_unfinished_leases_take_places_oldest_first_and_judgements_survive():
    latest = MigrationExecutor(connection).loader.graph.leaf_nodes()
    old = migrate(BEFORE)
    try:
        User, Project, Prompt, Completion, Assignment, Pairwise, Ranking, Ranked = (
            old.get_model(app, name)
            for app, name in [
                ("auth", "User"),
                ("feedback", "Project"),
                ("feedback", "Prompt"),
                ("feedback", "Completion"),
                ("feedback", "Assignment"),
                ("feedback", "PairwiseJudgement"),
                ("feedback", "RankingJudgement"),
                ("feedback", "RankedCompletion"),
            ]
        )
        busy, calm = User.objects.create(username="busy"), User.objects.create(username="calm")
        project = Project.objects.create(name="P", slug="p", mode="ranking", completions_per_prompt=2)
        prompts = [
            Prompt.objects.create(project=project, messages=[{"role": "user", "content": "?"}]) for _ in range(6)
        ]
        completions = [
            [Completion.objects.create(prompt=prompt, text=t, html=t) for t in ("a", "b")] for prompt in prompts
        ]
        expires = timezone.now() + timedelta(minutes=5)

        def lease(annotator, n, state="leased"):
            ids = [c.pk for c in completions[n]]
            return Assignment.objects.create(
                project=project,
                annotator=annotator,
                prompt=prompts[n],
                item_key=f"p{prompts[n].pk}",
                slot=0 if annotator == busy else 1,
                display_order=ids,
                state=state,
                expires_at=expires,
            )

        busy_leases = [lease(busy, n) for n in range(4)]  # four at once, as the old queue allowed
        calm_lease = lease(calm, 0)
        done = lease(calm, 1, state="done")
        a, b = completions[1]
        ranking = Ranking.objects.create(
            project=project,
            annotator=calm,
            assignment=done,
            prompt=prompts[1],
            rationale="why",
            time_ms=900,
            client_uuid="00000000-0000-0000-0000-000000000001",
        )
        Ranked.objects.create(judgement=ranking, completion=a, rank=1, position=0)
        Ranked.objects.create(judgement=ranking, completion=b, rank=2, position=1)
        pairwise = Pairwise.objects.create(
            project=project,
            annotator=busy,
            prompt=prompts[1],
            left=a,
            right=b,
            item_key=f"c{a.pk}-{b.pk}",
            choice="tie",
            strength="",
            rationale="",
            time_ms=None,
            client_uuid="00000000-0000-0000-0000-000000000002",
        )
        judgement_fields = [
            "project_id",
            "annotator_id",
            "assignment_id",
            "prompt_id",
            "rationale",
            "time_ms",
            "client_uuid",
            "created_at",
        ]
        stored_before = (
            list(Ranking.objects.values_list(*judgement_fields)),
            list(Pairwise.objects.values_list(*judgement_fields, "left_id", "right_id", "choice", "item_key")),
            list(Ranked.objects.values_list("judgement_id", "completion_id", "rank", "position")),
        )

        new = migrate(AFTER)
        Assignment = new.get_model("feedback", "Assignment")
        places = dict(Assignment.objects.values_list("pk", "annotator_slot"))
        assert places == {
            busy_leases[0].pk: 0,
            busy_leases[1].pk: 1,
            calm_lease.pk: 0,
            done.pk: None,
        }
        Ranking, Pairwise, Ranked = (
            new.get_model("feedback", name) for name in ("RankingJudgement", "PairwiseJudgement", "RankedCompletion")
        )
        assert stored_before == (
            list(Ranking.objects.values_list(*judgement_fields)),
            list(Pairwise.objects.values_list(*judgement_fields, "left_id", "right_id", "choice", "item_key")),
            list(Ranked.objects.values_list("judgement_id", "completion_id", "rank", "position")),
        )
        assert pairwise.pk in Pairwise.objects.values_list("pk", flat=True)
    finally:
        migrate(latest)
