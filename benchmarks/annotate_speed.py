"""How fast the annotation queue answers with a large project, and whether it stays correct under load.

Usage: python benchmarks/annotate_speed.py [--prompts 100000] [--judgements-per-prompt 3] [--rounds 1]
                                           [--gold 0] [--battle 0]
                                           [--calls 1000] [--annotators 20] [--seconds 60] [--seeded-db FILE]
                                           [--no-write]

It builds a fresh SQLite database (the production settings: WAL, immediate transactions,
busy timeout) in a temporary data dir, or with DATABASE_URL=postgres://... a fresh PostgreSQL
database beside the one named there (dropped at the end; the role needs CREATEDB), with two
projects of N prompts x 4 completions:

- ranking, overlap 5, with 3 judgements on every prompt (3N judgements);
- pairwise, overlap 1, with 3 of the 6 pairs of every prompt judged (3N judgements).

With --rounds R (default 1) each project has R rounds, every prompt in each with K completions of
that round: rounds 1..R-1 are fully judged, every item at its overlap (5N ranking, 6N pairwise
judgements a round), and round R is judged as above. next-task reads the rounds newest first and
finds its tasks in round R, with the older rounds' rows in the same tables and indexes (the script
checks that every ordinary task it is given is of round R).

With --gold N, N prompts of each project have a gold answer (a ranking of their imported completions),
and the seeded annotators have met gold items at the project's gold share (10 %) of their tasks, or every
gold item when there are too few. With --battle M, each project also has a written battle round of v1
against the base model on M evaluation prompts (a pair each, in the ranking project too), not yet judged.
Gold and battle tasks are counted apart from the ordinary ones, and each annotator's tasks are replayed
in order against the queue's rule for the gold and battle shares (`check_shares`); the timings of
next-task are also given by the kind of task it answered.

Then, for each project:

1. server-side time: 1,000 GET next-task and 1,000 POST judgements through Django's full
   request handling in this process (middleware, session auth, DRF, the services; no network),
   taking turns among 20 annotators who already have thousands of judgements;
2. over HTTP: gunicorn (2 workers x 8 threads) and 20 simulated annotators, each looping
   next-task -> judgement as fast as answers come, for 60 s; then the database is checked for
   lost or duplicated judgements, items over their overlap, and items judged twice by one person.

Throttling is switched off for the HTTP run (benchmarks/annotate_speed_settings.py): the
submit throttle (120/min per user) is a policy for people, and the simulated annotators are
far faster than people. The figures are written to benchmarks/RESULTS.md (## Annotation speed, or
## Annotation speed on PostgreSQL; with --rounds R > 1, its subsection ### R rounds, ... fully judged; with
--gold or --battle, its subsection ### With gold items and a battle).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
SECTION = "## Annotation speed"
POSTGRES_SECTION = "## Annotation speed on PostgreSQL"
K = 4
PROJECTS = (("ranking", 5), ("pairwise", 1))  # mode, overlap
PAIR_PLAN = [(0, 1), (2, 3), (0, 2), (1, 3), (0, 3), (1, 2)]  # the first judgements_per_prompt pairs are judged


def full_judgements(mode: str) -> int:
    """Judgements a prompt holds in a fully judged round: every item at its overlap."""
    overlap = dict(PROJECTS)[mode]
    return overlap * (1 if mode == "ranking" else len(PAIR_PLAN))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def summary(values_ms: list[float]) -> str:
    return f"median {statistics.median(values_ms):.1f} ms, p95 {percentile(values_ms, 0.95):.1f} ms"


def fresh_postgres_database(url: str) -> tuple[str, str]:
    """A new, empty database on the server of `url`, as (its URL, its name): the SQLite leg's fresh file."""
    import psycopg

    name = f"rankwise_bench_{os.getpid()}"
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    return url.rsplit("/", 1)[0] + "/" + name, name


def drop_postgres_database(url: str, name: str) -> None:
    import psycopg

    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def setup_django(data_dir: Path) -> None:
    os.environ["RANKWISE_DATA_DIR"] = str(data_dir)
    os.environ["DEBUG"] = "0"
    os.environ.setdefault("ALLOWED_HOSTS", "127.0.0.1,localhost,testserver")
    os.environ["SECURE_SSL_REDIRECT"] = "0"
    os.environ["SESSION_COOKIE_SECURE"] = "0"
    os.environ["CSRF_COOKIE_SECURE"] = "0"
    os.environ["DJANGO_SETTINGS_MODULE"] = "benchmarks.annotate_speed_settings"
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)


def _insert(model, names: list[str], rows: list[tuple]) -> None:
    """Plain executemany (COPY on PostgreSQL) with values prepared by the model's own fields: no model instances."""
    from django.db import connection

    fields = [model._meta.get_field(name) for name in names]
    columns = ", ".join(connection.ops.quote_name(f.column) for f in fields)
    table = connection.ops.quote_name(model._meta.db_table)
    sql = f"INSERT INTO {table} ({columns}) VALUES ({', '.join(['%s'] * len(fields))})"
    prepared = [tuple(f.get_db_prep_save(v, connection) for f, v in zip(fields, row, strict=True)) for row in rows]
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":  # COPY: several times faster than executemany there
            with cursor.cursor.copy(f"COPY {table} ({columns}) FROM STDIN") as copy:
                for row in prepared:
                    copy.write_row(row)
        else:
            cursor.executemany(sql, prepared)


ASSIGNMENT_FIELDS = [
    "id",
    "project",
    "annotator",
    "prompt",
    "round",
    "completion_a",
    "completion_b",
    "item_key",
    "slot",
    "display_order",
    "state",
    "skip_reason",
    "expires_at",
    "created_at",
    "finished_at",
]
RANKING_FIELDS = ["id", "project", "annotator", "assignment", "prompt", "round", "rationale", "time_ms"]
PAIRWISE_FIELDS = ["id", "project", "annotator", "assignment", "prompt", "round", "left", "right", "item_key"]
PAIRWISE_FIELDS += ["choice", "strength", "rationale", "time_ms"]
COMPLETION_FIELDS = ["id", "prompt", "round", "text", "html", "source_model", "model_version", "generation_params"]


class JudgedRows:
    """Rows of done assignments with their judgements, built in memory and written by `insert`."""

    def __init__(self, *, ids: dict[str, int], project_id: int, rng: random.Random, now) -> None:
        self.ids, self.project_id, self.rng, self.now = ids, project_id, rng, now
        self.assignments: list[tuple] = []
        self.rankings: list[tuple] = []
        self.ranked: list[tuple] = []
        self.pairs: list[tuple] = []

    def add(self, *, annotator: int, prompt_id: int, round_id: int, members: list[int], key: str, slot: int) -> None:
        """One judged item: a ranking of `members`, or a choice between them when they are two."""
        self.ids["assignment"] += 1
        order = self.rng.sample(members, len(members))
        pair = len(members) == 2
        a, b = (order[0], order[1]) if pair else (None, None)
        now = self.now
        self.assignments.append(
            (self.ids["assignment"], self.project_id, annotator, prompt_id, round_id, a, b, key, slot, order)
            + ("done", "", now, now, now)
        )
        client_uuid = uuid.UUID(int=self.rng.getrandbits(128))
        time_ms = self.rng.randint(2000, 60000)
        common = (self.project_id, annotator, self.ids["assignment"], prompt_id, round_id)
        if pair:
            self.ids["pairwise"] += 1
            choice = self.rng.choice(["a", "b", "tie", "both_bad"])
            row = (self.ids["pairwise"], *common, a, b, key, choice, "", "", time_ms, client_uuid, now)
            self.pairs.append(row)
        else:
            self.ids["ranking"] += 1
            self.rankings.append((self.ids["ranking"], *common, "", time_ms, client_uuid, now))
            self.ranked += [(self.ids["ranking"], c, p + 1, p) for p, c in enumerate(order)]

    def insert(self) -> None:
        from feedback.models import Assignment, PairwiseJudgement, RankedCompletion, RankingJudgement

        _insert(Assignment, ASSIGNMENT_FIELDS, self.assignments)
        _insert(RankingJudgement, [*RANKING_FIELDS, "client_uuid", "created_at"], self.rankings)
        _insert(RankedCompletion, ["judgement", "completion", "rank", "position"], self.ranked)
        _insert(PairwiseJudgement, [*PAIRWISE_FIELDS, "client_uuid", "created_at"], self.pairs)
        self.assignments, self.rankings, self.ranked, self.pairs = [], [], [], []


def seed(
    *, prompts: int, judgements_per_prompt: int, rounds: int = 1, gold: int = 0, battle: int = 0
) -> dict[str, object]:
    """Two projects with judgements already in; returns their slugs and the annotators' ids.

    Each project has `rounds` rounds, every prompt in each with its own K completions: rounds
    before the last are fully judged (every item at its overlap, so the queue skips them through
    the RoundPrompt index), the last has `judgements_per_prompt` judgements per prompt. Rounds are
    written one after the other, so a later round's rows have the higher ids, as in a real project.
    Round 1 holds the completions the prompts were imported with, which gold answers refer to.

    With `gold`, that many prompts of each project (evenly spread) get a gold answer, a ranking of
    their K imported completions, and the seeded annotators have met gold items at the project's gold
    share of their tasks, as many as there are (`seed_gold`). With `battle`, each project has a written
    battle round of v1 against the base model on that many evaluation prompts, not yet judged
    (`seed_battle`).

    Rows go in with explicit ids through executemany (the database is new), which is what makes
    millions of rows take a minute rather than ten.
    """
    from django.contrib.auth import get_user_model
    from django.db import connection, transaction
    from django.utils import timezone

    from feedback.models import (
        Assignment,
        Completion,
        Membership,
        PairwiseJudgement,
        Project,
        Prompt,
        RankedCompletion,
        RankingJudgement,
        Round,
        RoundPrompt,
    )
    from feedback.selectors.tasks import item_key_for_pair, item_key_for_prompt

    rng = random.Random(0)
    now = timezone.now()
    user_model = get_user_model()
    users = [
        user_model(username=f"{kind}-{n}") for kind, count in (("seeded", 60), ("bench", 20)) for n in range(count)
    ]
    for user in users:
        user.set_unusable_password()
    user_model.objects.bulk_create(users)
    by_name = user_model.objects.order_by("pk")
    seeded_ids = list(by_name.filter(username__startswith="seeded-").values_list("pk", flat=True))
    bench_ids = list(by_name.filter(username__startswith="bench-").values_list("pk", flat=True))

    ids = {"prompt": 0, "completion": 0, "assignment": 0, "ranking": 0, "pairwise": 0}
    slugs = {}
    for mode, overlap in PROJECTS:
        started = time.perf_counter()
        project = Project.objects.create(
            name=f"Bench {mode}", slug=f"bench-{mode}", mode=mode, completions_per_prompt=K, overlap=overlap
        )
        slugs[mode] = project.slug
        Membership.objects.bulk_create(Membership(user_id=pk, project=project) for pk in seeded_ids + bench_ids)
        first_prompt_id = ids["prompt"] + 1
        judged = 0
        for number in range(1, rounds + 1):
            the_round = Round.objects.create(
                project=project,
                number=number,
                writers=["bench"],
                strategy=Round.Strategy.IMPORTED if number == 1 else Round.Strategy.OLDEST_ROUND_FIRST,
                status=Round.Status.DONE,
            )
            per_prompt = judgements_per_prompt if number == rounds else full_judgements(mode)
            judged += prompts * per_prompt
            batch = 10_000
            for start in range(0, prompts, batch):
                prompt_rows, completion_rows, round_prompt_rows = [], [], []
                judged_rows = JudgedRows(ids=ids, project_id=project.pk, rng=rng, now=now)
                for n in range(start, min(start + batch, prompts)):
                    prompt_id = first_prompt_id + n
                    if number == 1:
                        ids["prompt"] += 1
                        assert ids["prompt"] == prompt_id
                        messages = [{"role": "user", "content": f"Question {n}: how do I reverse a list in Python?"}]
                        prompt_rows.append((prompt_id, project.pk, messages, "", {}, "train", now))
                    round_prompt_rows.append((the_round.pk, prompt_id, per_prompt))
                    mine = []
                    for j in range(K):
                        ids["completion"] += 1
                        mine.append(ids["completion"])
                        text = f"Answer {j} to question {n}: use `xs[::-1]` or `reversed(xs)`."
                        html = (
                            f"<p>Answer {j} to question {n}: "
                            "use <code>xs[::-1]</code> or <code>reversed(xs)</code>.</p>"
                        )
                        completion_rows.append(
                            (ids["completion"], prompt_id, the_round.pk, text, html, "bench", None, {})
                        )
                    for j in range(per_prompt):
                        annotator = seeded_ids[(prompt_id * 7 + j * 13) % len(seeded_ids)]
                        if mode == "ranking":
                            members, key, slot = mine, item_key_for_prompt(prompt_id, the_round.pk), j
                        else:
                            x, y = PAIR_PLAN[j]
                            members, key, slot = [mine[x], mine[y]], item_key_for_pair(mine[x], mine[y]), 0
                        judged_rows.add(
                            annotator=annotator,
                            prompt_id=prompt_id,
                            round_id=the_round.pk,
                            members=members,
                            key=key,
                            slot=slot,
                        )
                with transaction.atomic():
                    if prompt_rows:
                        _insert(
                            Prompt,
                            ["id", "project", "messages", "external_id", "metadata", "split", "created_at"],
                            prompt_rows,
                        )
                    _insert(RoundPrompt, ["round", "prompt", "judgement_count"], round_prompt_rows)
                    _insert(Completion, [*COMPLETION_FIELDS, "created_at"], [(*r, now) for r in completion_rows])
                    judged_rows.insert()
        gold_ids = [first_prompt_id + n * prompts // gold for n in range(gold)]
        if gold:
            seed_gold(project=project, gold_ids=gold_ids, seeded_ids=seeded_ids, ids=ids, rng=rng, now=now)
        if battle:
            seed_battle(project=project, number=rounds + 1, prompts=battle, ids=ids, rng=rng, now=now)
        print(
            f"seeded {mode}: {prompts} prompts in {rounds} round(s), {judged} judgements, {gold} gold prompts, "
            f"a battle on {battle} evaluation prompts in {time.perf_counter() - started:.0f} s",
            flush=True,
        )
    if connection.vendor == "postgresql":
        # Explicit ids leave PostgreSQL's sequences behind; the benchmark's own writes must not collide with them.
        from django.core.management.color import no_style

        models = [Prompt, Completion, Assignment, RankingJudgement, RankedCompletion, PairwiseJudgement]
        with connection.cursor() as cursor:
            for statement in connection.ops.sequence_reset_sql(no_style(), models):
                cursor.execute(statement)
    return {"slugs": slugs, "rounds": rounds, "seeded_ids": seeded_ids, "bench_ids": bench_ids}


def seed_gold(*, project, gold_ids: list[int], seeded_ids: list[int], ids: dict[str, int], rng, now) -> None:
    """Gold answers on `gold_ids`, and gold items judged by the seeded annotators at the project's gold share.

    An annotator who has taken T tasks, G of them gold, meets gold items (in a random order, each once, in the
    slot after the last taken) until G is the gold share of T, or until they have met them all: where the
    queue's rule would have left them after T tasks.
    """
    from django.db import transaction
    from django.db.models import Count, Max

    from feedback.models import Assignment, Completion, Prompt, Round
    from feedback.selectors.tasks import item_key_for_pair, item_key_for_prompt

    imported = Round.objects.get(project=project, number=1)
    completions: dict[int, list[int]] = {}
    for prompt_id, pk in (
        Completion.objects.filter(round=imported, prompt_id__in=gold_ids).order_by("pk").values_list("prompt_id", "pk")
    ):
        completions.setdefault(prompt_id, []).append(pk)
    items = []  # (prompt id, members, key)
    for prompt_id in gold_ids:
        mine = completions[prompt_id]
        if project.mode == "ranking":
            items.append((prompt_id, mine, item_key_for_prompt(prompt_id, imported.pk)))
        else:
            items += [(prompt_id, [a, b], item_key_for_pair(a, b)) for a, b in itertools.combinations(mine, 2)]
    with transaction.atomic():
        for prompt_id in gold_ids:
            order = rng.sample(range(K), K)
            Prompt.objects.filter(pk=prompt_id).update(gold={"ranking": [order[:1], order[1:3], order[3:]]})
        on_gold = Assignment.objects.filter(project=project, prompt_id__in=gold_ids)
        met = set(on_gold.values_list("annotator_id", "item_key"))
        next_slot = {
            key: slot + 1
            for key, slot in on_gold.values("item_key").annotate(s=Max("slot")).values_list("item_key", "s")
        }
        tasks = dict(
            Assignment.objects.filter(project=project)
            .values("annotator_id")
            .annotate(n=Count("pk"))
            .values_list("annotator_id", "n")
        )
        gold_taken = dict(on_gold.values("annotator_id").annotate(n=Count("pk")).values_list("annotator_id", "n"))
        rows = JudgedRows(ids=ids, project_id=project.pk, rng=rng, now=now)
        for annotator in seeded_ids:
            taken, total = gold_taken.get(annotator, 0), tasks.get(annotator, 0)
            wanted = int((project.gold_share * total - taken) / (1 - project.gold_share))
            unmet = [item for item in items if (annotator, item[2]) not in met]
            for prompt_id, members, key in rng.sample(unmet, min(max(wanted, 0), len(unmet))):
                slot = next_slot.get(key, 0)
                next_slot[key] = slot + 1
                rows.add(
                    annotator=annotator, prompt_id=prompt_id, round_id=imported.pk, members=members, key=key, slot=slot
                )
        rows.insert()


def seed_battle(*, project, number: int, prompts: int, ids: dict[str, int], rng, now) -> None:
    """A written battle round of v1 against the base model: `prompts` evaluation prompts, one completion of
    each writer per prompt (in random id order, as the round writer stores them), nothing judged yet."""
    from django.db import transaction

    from feedback.models import Completion, ModelVersion, Prompt, Round, RoundPrompt

    with transaction.atomic():
        v1 = ModelVersion.objects.create(project=project, name="v1", weights_path="")  # it writes nothing here
        first = ids["prompt"] + 1
        ids["prompt"] += prompts
        prompt_ids = list(range(first, first + prompts))
        battle = Round.objects.create(
            project=project,
            number=number,
            kind=Round.Kind.BATTLE,
            strategy=Round.Strategy.EVALUATION,
            writers=["v1", "base"],
            sampling={"k": 2, "temperature": project.temperature, "top_p": project.top_p},
            status=Round.Status.DONE,
            prompt_ids=prompt_ids,
            prompts_total=prompts,
            prompts_written=prompts,
        )
        prompt_rows, completion_rows = [], []
        for n, prompt_id in enumerate(prompt_ids):
            messages = [{"role": "user", "content": f"Evaluation question {n}: how do I sort a dict by value?"}]
            prompt_rows.append((prompt_id, project.pk, messages, "", {}, "eval", now))
            for writer in rng.sample(["v1", "base"], 2):
                ids["completion"] += 1
                text = f"{writer} answers evaluation question {n}: `sorted(d.items(), key=lambda kv: kv[1])`."
                html = f"<p>{writer} answers evaluation question {n}.</p>"
                version, source = (v1.pk, "") if writer == "v1" else (None, "base")
                completion_rows.append((ids["completion"], prompt_id, battle.pk, text, html, source, version, {}, now))
        _insert(Prompt, ["id", "project", "messages", "external_id", "metadata", "split", "created_at"], prompt_rows)
        _insert(Completion, [*COMPLETION_FIELDS, "created_at"], completion_rows)
        _insert(RoundPrompt, ["round", "prompt", "judgement_count"], [(battle.pk, pk, 0) for pk in prompt_ids])


def seeded_from_database() -> dict[str, object]:
    from django.contrib.auth import get_user_model

    from feedback.models import Prompt, Round, RoundPrompt

    users = get_user_model().objects.order_by("pk")
    return {
        "slugs": {"ranking": "bench-ranking", "pairwise": "bench-pairwise"},
        "rounds": Round.objects.filter(project__slug="bench-ranking", kind=Round.Kind.TRAINING).count(),
        "gold": Prompt.objects.filter(project__slug="bench-ranking", gold__isnull=False).count(),
        "battle": RoundPrompt.objects.filter(
            round__project__slug="bench-ranking", round__kind=Round.Kind.BATTLE
        ).count(),
        "seeded_ids": list(users.filter(username__startswith="seeded-").values_list("pk", flat=True)),
        "bench_ids": list(users.filter(username__startswith="bench-").values_list("pk", flat=True)),
    }


def judgement_body(task: dict) -> dict:
    ids = [c["id"] for c in task["completions"]]
    body = {"task_id": task["task_id"], "client_uuid": str(uuid.uuid4()), "kind": task["kind"], "time_ms": 1234}
    if task["kind"] == "ranking":
        random.shuffle(ids)
        body["ranking"] = [[ids[0]], ids[1:3], [ids[3]]] if len(ids) == 4 else [[i] for i in ids]
    else:
        body["choice"] = random.choice(["a", "b", "tie", "both_bad"])
    return body


def in_process(
    *, slug: str, annotator_ids: list[int], calls: int
) -> tuple[dict[str, list[float]], dict[str, int], list[tuple[str, int]]]:
    """Full Django request handling without a network: the server-side time of each call, the
    most SQL statements one call took (counted on the warm-up calls, so counting costs the timings nothing),
    and the kind and round number of the task each timed next-task call was given (`task_kinds`)."""
    from django.contrib.auth import get_user_model
    from django.db import connection
    from django.test import Client
    from django.test.utils import CaptureQueriesContext

    last_before = last_assignment_id()

    users = get_user_model().objects.in_bulk(annotator_ids)
    clients = []
    for pk in annotator_ids:
        client = Client()
        client.force_login(users[pk])
        clients.append(client)
    next_url = f"/api/v1/projects/{slug}/next-task/"
    submit_url = f"/api/v1/projects/{slug}/judgements/"
    timings: dict[str, list[float]] = {"next-task": [], "submit": [], "next-task cpu": [], "submit cpu": []}
    queries = {"next-task": 0, "submit": 0}
    task_ids = []
    for client in clients:  # warm up (first requests import modules and fill caches) and count queries
        with CaptureQueriesContext(connection) as captured:
            task = client.get(next_url).json()
        queries["next-task"] = max(queries["next-task"], len(captured))
        with CaptureQueriesContext(connection) as captured:
            client.post(submit_url, judgement_body(task), content_type="application/json")
        queries["submit"] = max(queries["submit"], len(captured))
    for i in range(calls):
        client = clients[i % len(clients)]
        start, cpu = time.perf_counter(), time.thread_time()
        response = client.get(next_url)
        timings["next-task"].append((time.perf_counter() - start) * 1000)
        timings["next-task cpu"].append((time.thread_time() - cpu) * 1000)
        assert response.status_code == 200, response.status_code
        task_ids.append(response.json()["task_id"])
        body = judgement_body(response.json())
        start, cpu = time.perf_counter(), time.thread_time()
        response = client.post(submit_url, body, content_type="application/json")
        timings["submit"].append((time.perf_counter() - start) * 1000)
        timings["submit cpu"].append((time.thread_time() - cpu) * 1000)
        assert response.status_code == 201, (response.status_code, response.content)
    kinds = task_kinds(slug=slug, since=last_before)
    return timings, queries, [kinds[pk] for pk in task_ids]


def last_assignment_id() -> int:
    from django.db.models import Max

    from feedback.models import Assignment

    return Assignment.objects.aggregate(last=Max("pk"))["last"] or 0


def task_kinds(*, slug: str, since: int = 0, annotator_ids: list[int] | None = None) -> dict[int, tuple[str, int]]:
    """The project's tasks after the id `since` (of these annotators), each as its kind and its round's number:
    "battle" (a battle round's pair), "gold" (an item of a prompt with a gold answer) or "ordinary"."""
    from feedback.models import Assignment, Round

    tasks = Assignment.objects.filter(project__slug=slug, pk__gt=since)
    if annotator_ids is not None:
        tasks = tasks.filter(annotator_id__in=annotator_ids)
    kinds = {}
    for pk, round_kind, number, gold in tasks.values_list("pk", "round__kind", "round__number", "prompt__gold"):
        kind = "battle" if round_kind == Round.Kind.BATTLE else "gold" if gold is not None else "ordinary"
        kinds[pk] = (kind, number)
    return kinds


def check_shares(*, slug: str, annotator_ids: list[int], since: int) -> dict[str, object]:
    """Replay each annotator's tasks in order and check those after the id `since` against the queue's rule.

    Before each task, as `_specials_due` counts: a gold item is due when one more keeps the annotator's gold
    tasks within the gold share of their tasks, a battle when one more keeps battles and gold together within
    the battle share. A task must be gold when gold is due and the annotator has not met every gold item (gold
    items have no cap, so only their own history can use them up), and must not be gold otherwise; a battle
    must be due for a battle task; an ordinary task while a battle is due means the battle had no free slot
    for them, so no battle task may follow (no lease expires or is skipped during a run). Returns the
    problems found and the tasks of the window by kind.
    """
    from feedback.models import Assignment, Project, Round
    from feedback.selectors.tasks import items_per_prompt

    project = Project.objects.get(slug=slug)
    gold_items = project.prompts.filter(gold__isnull=False).count() * items_per_prompt(project=project, completions=K)
    has_battles = project.battle_share > 0 and Round.objects.filter(project=project, kind=Round.Kind.BATTLE).exists()
    kinds = task_kinds(slug=slug, annotator_ids=annotator_ids)
    by_annotator: dict[int, list[int]] = {pk: [] for pk in annotator_ids}
    for annotator_id, pk in Assignment.objects.filter(pk__in=list(kinds)).values_list("annotator_id", "pk"):
        by_annotator[annotator_id].append(pk)
    problems: list[str] = []
    window = {"ordinary": 0, "gold": 0, "battle": 0}
    for annotator_id, pks in by_annotator.items():
        taken = {"tasks": 0, "gold": 0, "battle": 0}
        battles_out = False
        for pk in sorted(pks):
            kind = kinds[pk][0]
            if pk > since:
                window[kind] += 1
                tasks = taken["tasks"] + 1
                gold_due = gold_items > 0 and taken["gold"] + 1 <= project.gold_share * tasks
                battle_due = has_battles and taken["battle"] + taken["gold"] + 1 <= project.battle_share * tasks
                where = f"annotator {annotator_id}, task {pk} ({kind}) after {taken}"
                if gold_due and taken["gold"] < gold_items and kind != "gold":
                    problems.append(f"{where}: a gold item was due")
                if kind == "gold" and not gold_due:
                    problems.append(f"{where}: no gold item was due")
                if kind == "battle" and (not battle_due or battles_out):
                    problems.append(f"{where}: " + ("no battle was due" if not battle_due else "battles had run out"))
                if kind == "ordinary" and battle_due:
                    battles_out = True
            taken["tasks"] += 1
            if kind != "ordinary":
                taken[kind] += 1
    return {"problems": problems, "window": window}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def over_http(*, base: str, slug: str, tokens: list[str], seconds: float) -> dict[str, object]:
    stop = time.monotonic() + seconds
    lock = threading.Lock()
    latencies: list[float] = []
    created: list[str] = []
    errors: list[str] = []
    empty = [0]

    def call(method: str, url: str, token: str, body: dict | None = None) -> tuple[int, dict | None, float]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            base + url,
            data=data,
            method=method,
            headers={"Authorization": f"Token {token}", "Content-Type": "application/json"},
        )
        start = time.perf_counter()
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                payload = response.read()
                status = response.status
        except urllib.error.HTTPError as error:
            payload, status = error.read(), error.code
        elapsed = (time.perf_counter() - start) * 1000
        return status, (json.loads(payload) if payload else None), elapsed

    def annotator(token: str) -> None:
        while time.monotonic() < stop:
            try:
                status, task, elapsed = call("GET", f"/api/v1/projects/{slug}/next-task/", token)
                with lock:
                    latencies.append(elapsed)
                if status == 204:
                    with lock:
                        empty[0] += 1
                    return
                if status != 200:
                    with lock:
                        errors.append(f"next-task {status}: {task}")
                    continue
                body = judgement_body(task)
                status, answer, elapsed = call("POST", f"/api/v1/projects/{slug}/judgements/", token, body)
                with lock:
                    latencies.append(elapsed)
                    if status == 201:
                        created.append(body["client_uuid"])
                    else:
                        errors.append(f"judgement {status}: {answer}")
            except Exception as error:  # counted and reported, the run goes on
                with lock:
                    errors.append(repr(error))

    threads = [threading.Thread(target=annotator, args=(t,)) for t in tokens]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    return {"latencies": latencies, "created": created, "errors": errors, "wall": wall, "ran_dry": empty[0]}


def check_integrity(*, slug: str, created: list[str], before: int) -> dict[str, object]:
    from django.db.models import Count

    from feedback.models import Assignment, PairwiseJudgement, Project, RankingJudgement, Round

    project = Project.objects.get(slug=slug)
    # a ranking project's battles are pairs, stored as pairwise judgements
    stored = [kind.objects.filter(project=project) for kind in (RankingJudgement, PairwiseJudgement)]
    found = [set(rows.filter(client_uuid__in=created).values_list("client_uuid", flat=True)) for rows in stored]
    new = [rows.filter(client_uuid__in=created) for rows in stored]
    ordinary = [rows.exclude(round__kind=Round.Kind.BATTLE).filter(prompt__gold__isnull=True) for rows in new]
    # an item: a pair of one round's completions, or one round's completions of a prompt
    judged_twice = sum(
        rows.values("annotator_id", *item).annotate(n=Count("pk")).filter(n__gt=1).count()
        for rows, item in zip(stored, (["prompt_id", "round_id"], ["item_key"]), strict=True)
    )
    return {
        "new judgements stored": sum(rows.count() for rows in stored) - before,
        "201 answers": len(created),
        "lost (201 but not stored)": len(created) - sum(len(uuids) for uuids in found),
        "items over their overlap": Assignment.objects.filter(project=project, prompt__gold__isnull=True)  # no cap
        .exclude(slot=None)
        .values("item_key")
        .annotate(n=Count("pk"))
        .filter(n__gt=project.overlap)
        .count(),
        "items judged twice by one annotator": judged_twice,
        "rounds judged": sorted({n for rows in ordinary for n in rows.values_list("round__number", flat=True)}),
        "gold judgements": sum(rows.filter(prompt__gold__isnull=False).count() for rows in new),
        "battle judgements": sum(rows.filter(round__kind=Round.Kind.BATTLE).count() for rows in new),
    }


def judgements_stored(slug: str) -> int:
    from feedback.models import PairwiseJudgement, RankingJudgement

    return sum(kind.objects.filter(project__slug=slug).count() for kind in (RankingJudgement, PairwiseJudgement))


def write_results(text: str, section: str, parent: str | None = None) -> None:
    """Replace `section` (a "## " section, or a "### " subsection of the section `parent`) in RESULTS.md,
    or add it: a subsection at the end of its parent, a section at the end of the file."""
    body = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    text = text.rstrip("\n") + "\n\n"
    if parent is not None:
        found = re.compile(rf"^{re.escape(parent)}\n.*?(?=^## |\Z)", re.S | re.M).search(body)
        if found is None:
            body = body.rstrip("\n") + f"\n\n{parent}\n\n"
            start = end = len(body)
        else:
            start, end = found.span()
        within = body[start:end]
        pattern = re.compile(rf"^{re.escape(section)}\n.*?(?=^##+ |\Z)", re.S | re.M)  # up to the next heading
        if pattern.search(within):
            within = pattern.sub(lambda _: text, within, count=1)
        else:
            within = within.rstrip("\n") + "\n\n" + text if within else text
        body = body[:start] + within + body[end:]
    else:
        pattern = re.compile(rf"^{re.escape(section)}\n.*?(?=^## |\Z)", re.S | re.M)
        found = pattern.search(body)
        body = pattern.sub(lambda _: text, body, count=1) if found else body.rstrip("\n") + "\n\n" + text
    RESULTS.write_text(body.rstrip("\n") + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=100_000)
    parser.add_argument("--judgements-per-prompt", type=int, default=3)
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="rounds per project: the older ones fully judged, the last with --judgements-per-prompt",
    )
    parser.add_argument("--gold", type=int, default=0, help="prompts of each project with a gold answer")
    parser.add_argument(
        "--battle", type=int, default=0, help="evaluation prompts of a written battle round in each project"
    )
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--annotators", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--no-write", action="store_true", help="print the figures, leave RESULTS.md alone")
    parser.add_argument(
        "--seeded-db",
        type=Path,
        help="a copy of the seeded database: made on the first run, copied in (and migrated) on later ones",
    )
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be 1 or more")
    if not 0 <= args.gold <= args.prompts:
        parser.error("--gold must be between 0 and --prompts")
    if args.battle < 0:
        parser.error("--battle must be 0 or more")

    server_url = os.environ.get("DATABASE_URL", "")
    postgres = server_url.startswith(("postgres://", "postgresql://"))
    if server_url and not postgres:
        parser.error(f"DATABASE_URL must be a postgres:// URL or unset (SQLite), not {server_url.split(':')[0]}://")
    if postgres and args.seeded_db is not None:
        parser.error("--seeded-db copies a SQLite file; it does not apply with DATABASE_URL")
    scratch = tempfile.TemporaryDirectory()
    data_dir = Path(scratch.name)
    if postgres:
        os.environ["DATABASE_URL"], bench_database = fresh_postgres_database(server_url)
    try:
        run(args, data_dir, postgres=postgres)
    finally:
        if postgres:
            from django.db import connections

            connections.close_all()
            drop_postgres_database(server_url, bench_database)
        scratch.cleanup()


def specials_figures(*, slug: str, annotator_ids: list[int], since: int, where: str) -> str:
    """Check the gold and battle shares of the annotators' tasks after `since` (`check_shares`); a table row."""
    from feedback.models import Project

    project = Project.objects.get(slug=slug)
    checked = check_shares(slug=slug, annotator_ids=annotator_ids, since=since)
    print(f"{slug} {where}: tasks by kind {checked['window']}, share problems {checked['problems'][:5]}", flush=True)
    assert not checked["problems"], checked["problems"][:10]
    window = checked["window"]
    total = sum(window.values())
    return (
        f"| {project.mode} | {where} | {total:,} | {window['ordinary']:,} | "
        f"{window['gold']:,} ({window['gold'] / total:.1%}) | {window['battle']:,} ({window['battle'] / total:.1%}) |"
    )


def run(args: argparse.Namespace, data_dir: Path, *, postgres: bool) -> None:
    reuse = args.seeded_db is not None and args.seeded_db.exists()
    if reuse:
        shutil.copyfile(args.seeded_db, data_dir / "rankwise.sqlite3")
    setup_django(data_dir)
    from django.db import connection
    from rest_framework.authtoken.models import Token

    started = time.perf_counter()
    if reuse:
        seeded = seeded_from_database()
        for option in ("rounds", "gold", "battle"):
            wanted = getattr(args, option)
            if seeded[option] != wanted:
                raise SystemExit(f"{args.seeded_db} was seeded with --{option} {seeded[option]}, not {wanted}")
    else:
        seeded = seed(
            prompts=args.prompts,
            judgements_per_prompt=args.judgements_per_prompt,
            rounds=args.rounds,
            gold=args.gold,
            battle=args.battle,
        )
    seed_seconds = time.perf_counter() - started
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE")
        if args.seeded_db is not None and not reuse:
            cursor.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            shutil.copyfile(data_dir / "rankwise.sqlite3", args.seeded_db)
    # in process: annotators with thousands of judgements each; over HTTP: newcomers
    in_process_ids, http_ids = seeded["seeded_ids"][: args.annotators], seeded["bench_ids"][: args.annotators]
    if postgres:
        database = f"PostgreSQL {connection.pg_version // 10000}.{connection.pg_version % 10000} on the same machine"
        command = "DATABASE_URL=postgres://... python benchmarks/annotate_speed.py"
    else:
        database = f"SQLite {connection.Database.sqlite_version} (WAL, immediate transactions)"
        command = "python benchmarks/annotate_speed.py"
    parent = POSTGRES_SECTION if postgres else SECTION
    specials = args.gold > 0 or args.battle > 0
    if args.rounds == 1:
        heading, under = parent, None
        data = (
            f"Each project: {args.prompts:,} prompts x {K} completions "
            f"and {args.prompts * args.judgements_per_prompt:,} judgements already stored "
        )
    else:
        older = "round 1" if args.rounds == 2 else f"rounds 1-{args.rounds - 1}"
        heading, under = f"### {args.rounds} rounds, {older} fully judged", parent
        command += f" --rounds {args.rounds}"
        full = {mode: args.prompts * full_judgements(mode) for mode, _ in PROJECTS}
        data = (
            f"Each project: {args.rounds} rounds, each of the same {args.prompts:,} prompts x {K} completions "
            f"of that round; {older} fully judged, every item at its overlap "
            f"({full['ranking']:,} ranking and {full['pairwise']:,} pairwise judgements a round), so they offer "
            f"no task; round {args.rounds} with {args.prompts * args.judgements_per_prompt:,} judgements "
            "already stored "
        )
    if specials:
        named = " and ".join(name for name, on in (("gold items", args.gold), ("a battle", args.battle)) if on)
        heading, under = f"### With {named}", parent
        command += (f" --gold {args.gold}" if args.gold else "") + (f" --battle {args.battle}" if args.battle else "")
        data += "(seeded as below) "
    lines = [
        heading,
        "",
        f"`{command}` on {platform.machine()} with {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, {database}; {time.strftime('%Y-%m-%d')}. "
        + data
        + ("(a copy of a database seeded earlier)." if reuse else f"(seeding took {seed_seconds:.0f} s)."),
    ]
    if specials:
        lines += ["", specials_seeded(args)]
    lines += [
        "",
        "Server-side time (Django's full request handling in process: middleware, session auth, DRF, services; "
        f"no network), {args.calls:,} calls each, {args.annotators} annotators taking turns. Wall is the time a "
        "caller waits; CPU is this thread's CPU time in the call, the part that does not depend on what else "
        "the machine runs:",
        "",
        "| project | next-task (wall) | submit (wall) | next-task (CPU) | submit (CPU) | SQL statements per call |",
        "|---|---|---|---|---|---|",
    ]
    by_kind = [
        "",
        "The same next-task calls by the kind of task they answered:",
        "",
        "| project | task | calls | next-task (wall) | next-task (CPU) |",
        "|---|---|---|---|---|",
    ]
    shares = [
        "",
        "Tasks served, by kind, and the shares checked task by task against the queue's rule (`check_shares`):",
        "",
        "| project | annotators | tasks | ordinary | gold | battle |",
        "|---|---|---|---|---|---|",
    ]
    for mode, slug in seeded["slugs"].items():
        since = last_assignment_id()
        timings, queries, kinds = in_process(slug=slug, annotator_ids=in_process_ids, calls=args.calls)
        rounds = sorted({number for kind, number in kinds if kind == "ordinary"})
        print(f"{mode}: in process, next-task answered ordinary tasks of round(s) {rounds}", flush=True)
        # the newest round; the older ones are fully judged (no ordinary task at all: battles or gold took every call)
        assert rounds == [args.rounds] or (specials and not rounds), rounds
        lines.append(
            f"| {mode} | {summary(timings['next-task'])} | {summary(timings['submit'])} | "
            f"{summary(timings['next-task cpu'])} | {summary(timings['submit cpu'])} | "
            f"next-task {queries['next-task']}, submit {queries['submit']} |"
        )
        print(lines[-1], flush=True)
        for kind in ("ordinary", "gold", "battle"):
            calls = [i for i, (task, _) in enumerate(kinds) if task == kind]
            if calls:
                wall = [timings["next-task"][i] for i in calls]
                cpu = [timings["next-task cpu"][i] for i in calls]
                by_kind.append(f"| {mode} | {kind} | {len(calls):,} | {summary(wall)} | {summary(cpu)} |")
                print(by_kind[-1], flush=True)
        shares.append(
            specials_figures(slug=slug, annotator_ids=in_process_ids, since=since, where="in process: seeded")
        )
    if specials:
        lines += by_kind

    tokens = [Token.objects.create(user_id=pk).key for pk in http_ids]
    connection.close()
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    server = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "gunicorn"),
            "config.wsgi",
            "--bind",
            f"127.0.0.1:{port}",
            "--workers",
            "2",
            "--threads",
            "8",
            "--log-level",
            "warning",
        ],
        cwd=ROOT,
        env=env,
    )
    lines += [
        "",
        f"Over HTTP: gunicorn (2 workers x 8 threads) on the same machine, {args.annotators} simulated annotators "
        f"(token auth, one thread each, next-task then judgement, no pause) for {args.seconds:.0f} s per project; "
        "latency is per request as the client sees it; afterwards the database is checked:",
        "",
        "| project | judgements/s | requests | p50 | p95 | errors | lost | over overlap | judged twice |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(base + "/api/v1/projects/", timeout=2)
            except urllib.error.HTTPError:
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        for mode, slug in seeded["slugs"].items():
            before, since = judgements_stored(slug), last_assignment_id()
            run = over_http(base=base, slug=slug, tokens=tokens, seconds=args.seconds)
            checks = check_integrity(slug=slug, created=run["created"], before=before)
            latencies = run["latencies"]
            lines.append(
                f"| {mode} | {len(run['created']) / run['wall']:.0f} | {len(latencies):,} | "
                f"{statistics.median(latencies):.1f} ms | {percentile(latencies, 0.95):.1f} ms | "
                f"{len(run['errors'])} | {checks['lost (201 but not stored)']} | "
                f"{checks['items over their overlap']} | {checks['items judged twice by one annotator']} |"
            )
            print(lines[-1], json.dumps(checks), run["errors"][:5], flush=True)
            assert checks["new judgements stored"] == checks["201 answers"], checks
            assert checks["rounds judged"] in ([], [args.rounds]), checks
            shares.append(
                specials_figures(slug=slug, annotator_ids=http_ids, since=since, where="over HTTP: newcomers")
            )
    finally:
        server.terminate()
        server.wait(timeout=30)
    lines += [
        "",
        "Lost = answered 201 but not in the database; over overlap = items holding more slots than the project's "
        "overlap (gold items have no cap); judged twice = an annotator with two judgements on one item. The number "
        "of new rows equals the number of 201 answers (checked by the script)."
        + (
            f" Every ordinary task next-task answered, in process and over HTTP, was of round {args.rounds} "
            "(checked by the script)."
            if args.rounds > 1 or specials
            else ""
        ),
    ]
    if specials:
        lines += [
            *shares,
            "",
            "The check replays each annotator's tasks in order: gold whenever a gold item was due and one was left "
            "for them, never gold when none was due; a battle only when one was due, and none after an ordinary "
            "task was served while a battle was due (the battle had no free slot left). No task broke the rule.",
        ]
    lines.append("")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    lines[3:3] = ["", f"Load average when the run ended: {load} (other work shared the machine's cores)."]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_results(text, heading, under)


def specials_seeded(args: argparse.Namespace) -> str:
    """What --gold and --battle added to each project, said for RESULTS.md."""
    parts = []
    if args.gold:
        parts.append(
            f"{args.gold:,} of each project's prompts (evenly spread) have a gold answer, a ranking of their "
            f"{K} imported completions; each seeded annotator has met gold items at the project's gold share "
            "(10 %) of their tasks, or all of them where there are too few: all ranking gold items "
            f"({args.gold:,}), about 550 of the {args.gold * 6:,} pairwise ones"
        )
    if args.battle:
        parts.append(
            f"a written battle round of v1 against the base model on {args.battle:,} evaluation prompts "
            "(one completion of each, no judgement yet), served at the battle share (20 %, gold included), "
            "pairs in both projects"
        )
    return "; ".join(parts).capitalize() + "."


if __name__ == "__main__":
    main()
