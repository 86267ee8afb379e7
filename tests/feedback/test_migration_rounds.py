"""Migrations 0005-0006: a seeded project's completions, leases and judgements become its round 1.

The golden exports under ``data/before_rounds/`` were written by the export of the code before
rounds (the commit this branch started from) from this module's ``seed`` on a fresh database; the
same seed, made before the migrations and exported after them, must give the same bytes, but for
the ``round`` field every row now ends with.
"""

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor

pytestmark = pytest.mark.django_db(transaction=True, reset_sequences=True)

BEFORE = [("feedback", "0004_training_algorithms")]
GOLDEN = Path(__file__).parent / "data" / "before_rounds"
FORMATS = ("dpo", "grpo", "judgements")
T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def migrate(targets):
    executor = MigrationExecutor(connection)
    executor.migrate(targets)
    return executor.loader.project_state(targets).apps


def seed(apps) -> None:
    """Two projects (ranking with ties, pairwise with every choice), leases live and done, fixed times."""
    User, Project, Prompt, Completion, Assignment, Pairwise, Ranking, Ranked = (
        apps.get_model(app, name)
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
    ann, bea, cai = (User.objects.create(username=name) for name in ("ann", "bea", "cai"))
    tick = iter(range(1000))

    def at() -> datetime:
        return T0 + timedelta(minutes=next(tick))

    ranking = Project.objects.create(name="R", slug="r", mode="ranking", completions_per_prompt=3, overlap=2)
    pairwise = Project.objects.create(name="P", slug="p", mode="pairwise", completions_per_prompt=3, overlap=1)
    for project in (ranking, pairwise):
        for n in range(3):
            messages = [{"role": "user", "content": f"{project.slug} question {n}?"}]
            if n == 2:
                messages = [{"role": "system", "content": "Be brief."}, *messages]
            prompt = Prompt.objects.create(project=project, messages=messages, external_id=f"{project.slug}-{n}")
            texts = [f"{project.slug} answer {n}.{j} **bold**" for j in range(3)]
            for j, text in enumerate(texts):
                Completion.objects.create(prompt=prompt, text=text, html=f"<p>{text}</p>", source_model=f"m{j}")

    def lease(project, annotator, prompt, key, state, order, slot):
        return Assignment.objects.create(
            project=project,
            annotator=annotator,
            prompt=prompt,
            item_key=key,
            slot=slot,
            annotator_slot=None if state == "done" else 0,
            display_order=order,
            state=state,
            expires_at=at(),
        )

    for n, prompt in enumerate(Prompt.objects.filter(project=ranking).order_by("pk")):
        c = list(Completion.objects.filter(prompt=prompt).order_by("pk").values_list("pk", flat=True))
        judges = [(ann, [[c[0]], [c[1], c[2]]]), (bea, [[c[2]], [c[0]], [c[1]]])] if n < 2 else []
        for slot, (judge, groups) in enumerate(judges):
            done = lease(ranking, judge, prompt, f"p{prompt.pk}", "done", c, slot)
            judgement = Ranking.objects.create(
                project=ranking,
                annotator=judge,
                assignment=done,
                prompt=prompt,
                rationale=f"why {judge.username}",
                time_ms=1000 + n,
                client_uuid=f"00000000-0000-0000-0000-00000000{prompt.pk:02d}{judge.pk:02d}",
            )
            position = 0
            for rank, group in enumerate(groups, start=1):
                for completion_id in group:
                    Ranked.objects.create(
                        judgement=judgement, completion_id=completion_id, rank=rank, position=position
                    )
                    position += 1
        Prompt.objects.filter(pk=prompt.pk).update(judgement_count=len(judges))
        if n == 2:
            lease(ranking, cai, prompt, f"p{prompt.pk}", "leased", c, 0)
    choices = iter(["a", "b", "tie", "both_bad", "a", "b"])
    for prompt in Prompt.objects.filter(project=pairwise).order_by("pk"):
        c = list(Completion.objects.filter(prompt=prompt).order_by("pk").values_list("pk", flat=True))
        for left, right in [(c[0], c[1]), (c[2], c[0])]:
            key = f"c{min(left, right)}-{max(left, right)}"
            done = lease(pairwise, cai, prompt, key, "done", [left, right], 0)
            Pairwise.objects.create(
                project=pairwise,
                annotator=cai,
                assignment=done,
                prompt=prompt,
                left_id=left,
                right_id=right,
                item_key=key,
                choice=next(choices),
                strength="clear",
                client_uuid=f"00000000-0000-0000-0001-0000{left:04d}{right:04d}",
            )
        Prompt.objects.filter(pk=prompt.pk).update(judgement_count=2)
    for model in (Completion, Pairwise, Ranking, Assignment):
        for pk in model.objects.order_by("pk").values_list("pk", flat=True):
            model.objects.filter(pk=pk).update(created_at=at())


def exports() -> dict[str, str]:
    from feedback.models import Project
    from feedback.selectors.preferences import PreferenceExportOptions, preference_rows
    from feedback.services.exports import export_jsonl_chunks

    files = {}
    for project in Project.objects.order_by("slug"):
        for export_format in FORMATS:
            for conversational in (False, True):
                options = PreferenceExportOptions(  # one vote each, as the exports were before weighting
                    format=export_format,  # type: ignore[arg-type]
                    conversational=conversational,
                    weighting="raw",
                )
                name = f"{project.slug}-{export_format}{'-conversational' if conversational else ''}.jsonl"
                files[name] = "".join(export_jsonl_chunks(rows=preference_rows(project=project, options=options)))
    return files


TRUNCATED = r'"(?:chosen_|rejected_)?truncated": (?:true|false|\[(?:true|false|, )*\]), '
ADJUDICATED = r', "adjudicated": false(?:, "superseded_by": null)?'


def test_every_judgement_exports_byte_for_byte_after_the_migration_and_all_of_it_is_round_one():
    latest = MigrationExecutor(connection).loader.graph.leaf_nodes()
    seed(migrate(BEFORE))
    new = migrate(latest)

    golden = {path.name: path.read_text(encoding="utf-8") for path in sorted(GOLDEN.glob("*.jsonl"))}
    assert len(golden) == 2 * len(FORMATS) * 2 and sum(map(len, golden.values())) > 10_000
    # every row now ends with the round it belongs to, round 1 here, and says which completions the length
    # limit cut (none of these: they carry no token counts); the rest is the same bytes
    after = {name: re.sub(ADJUDICATED, "", text) for name, text in exports().items()}  # no verdicts here
    assert all(line.endswith(', "round": 1}') for text in after.values() for line in text.splitlines())
    assert "true" not in "".join(re.findall(TRUNCATED, "".join(after.values())))
    unchanged = {name: re.sub(TRUNCATED, "", text).replace(', "round": 1}', "}") for name, text in after.items()}
    assert unchanged == golden

    Round, RoundPrompt, Completion, Assignment, Pairwise, Ranking = (
        new.get_model("feedback", name)
        for name in ("Round", "RoundPrompt", "Completion", "Assignment", "PairwiseJudgement", "RankingJudgement")
    )
    rounds = {r.project.slug: r for r in Round.objects.select_related("project")}
    assert sorted(rounds) == ["p", "r"]
    for slug, round_one in rounds.items():
        assert (round_one.number, round_one.status, round_one.writers) == (1, "done", ["m0", "m1", "m2"])
        assert round_one.prompts_total == round_one.prompts_written == 3 == len(round_one.prompt_ids)
        assert round_one.sampling["k"] == 3
        assert set(Completion.objects.filter(prompt__project__slug=slug).values_list("round", flat=True)) == {
            round_one.pk
        }
        assert set(Assignment.objects.filter(project__slug=slug).values_list("round", flat=True)) == {round_one.pk}
    for judgements in (Pairwise, Ranking):
        assert all(j.round.project_id == j.project_id for j in judgements.objects.select_related("round"))
    ranking_round = rounds["r"]
    counts = dict(RoundPrompt.objects.filter(round=ranking_round).values_list("prompt__external_id", "judgement_count"))
    assert counts == {"r-0": 2, "r-1": 2, "r-2": 0}
    keys = set(Assignment.objects.filter(project__slug="r").values_list("item_key", "prompt_id"))
    assert keys == {(f"p{prompt_id}-r{ranking_round.pk}", prompt_id) for _, prompt_id in keys}
    pair_counts = RoundPrompt.objects.filter(round=rounds["p"]).values_list("judgement_count", flat=True)
    assert list(pair_counts) == [2, 2, 2]


def test_the_migration_goes_back_to_per_prompt_counts_and_round_less_keys():
    latest = MigrationExecutor(connection).loader.graph.leaf_nodes()
    seed(migrate(BEFORE))
    migrate(latest)
    try:
        old = migrate(BEFORE)
        Prompt, Assignment = (old.get_model("feedback", name) for name in ("Prompt", "Assignment"))
        counts = dict(Prompt.objects.filter(project__slug="r").values_list("external_id", "judgement_count"))
        assert counts == {"r-0": 2, "r-1": 2, "r-2": 0}
        keys = set(Assignment.objects.filter(project__slug="r").values_list("item_key", "prompt_id"))
        assert keys == {(f"p{prompt_id}", prompt_id) for _, prompt_id in keys}
    finally:
        migrate(latest)
