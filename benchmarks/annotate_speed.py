"""How fast the annotation queue answers with a large project, and whether it stays correct under load.

Usage: python benchmarks/annotate_speed.py [--prompts 100000] [--judgements-per-prompt 3] [--rounds 1]
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
checks that every task it is given is of round R).

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
## Annotation speed on PostgreSQL; with --rounds R > 1, its subsection ### R rounds, ... fully judged).
"""

from __future__ import annotations

import argparse
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


def seed(*, prompts: int, judgements_per_prompt: int, rounds: int = 1) -> dict[str, object]:
    """Two projects with judgements already in; returns their slugs and the annotators' ids.

    Each project has `rounds` rounds, every prompt in each with its own K completions: rounds
    before the last are fully judged (every item at its overlap, so the queue skips them through
    the RoundPrompt index), the last has `judgements_per_prompt` judgements per prompt. Rounds are
    written one after the other, so a later round's rows have the higher ids, as in a real project.

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

    ids = {"prompt": 0, "completion": 0, "assignment": 0, "judgement": 0}
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
                project=project, number=number, writers=["bench"], status=Round.Status.DONE
            )
            per_prompt = judgements_per_prompt if number == rounds else full_judgements(mode)
            judged += prompts * per_prompt
            batch = 10_000
            for start in range(0, prompts, batch):
                prompt_rows, completion_rows, assignment_rows, judgement_rows, ranked_rows = [], [], [], [], []
                round_prompt_rows = []
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
                            (ids["completion"], prompt_id, the_round.pk, text, html, "bench", {}, now)
                        )
                    for j in range(per_prompt):
                        ids["assignment"] += 1
                        ids["judgement"] += 1
                        annotator = seeded_ids[(prompt_id * 7 + j * 13) % len(seeded_ids)]
                        if mode == "ranking":
                            order = rng.sample(mine, K)
                            key, slot, a, b = item_key_for_prompt(prompt_id, the_round.pk), j, None, None
                        else:
                            x, y = PAIR_PLAN[j]
                            order = [mine[x], mine[y]]
                            rng.shuffle(order)
                            key, slot, a, b = item_key_for_pair(mine[x], mine[y]), 0, order[0], order[1]
                        assignment_rows.append(
                            (
                                ids["assignment"],
                                project.pk,
                                annotator,
                                prompt_id,
                                the_round.pk,
                                a,
                                b,
                                key,
                                slot,
                                order,
                                "done",
                                "",
                                now,
                                now,
                                now,
                            )
                        )
                        client_uuid = uuid.UUID(int=rng.getrandbits(128))
                        time_ms = rng.randint(2000, 60000)
                        if mode == "ranking":
                            judgement_rows.append(
                                (
                                    ids["judgement"],
                                    project.pk,
                                    annotator,
                                    ids["assignment"],
                                    prompt_id,
                                    the_round.pk,
                                    "",
                                    time_ms,
                                    client_uuid,
                                    now,
                                )
                            )
                            ranked_rows += [(ids["judgement"], c, p + 1, p) for p, c in enumerate(order)]
                        else:
                            choice = rng.choice(["a", "b", "tie", "both_bad"])
                            judgement_rows.append(
                                (
                                    ids["judgement"],
                                    project.pk,
                                    annotator,
                                    ids["assignment"],
                                    prompt_id,
                                    the_round.pk,
                                    order[0],
                                    order[1],
                                    key,
                                    choice,
                                    "",
                                    "",
                                    time_ms,
                                    client_uuid,
                                    now,
                                )
                            )
                with transaction.atomic():
                    if prompt_rows:
                        _insert(
                            Prompt,
                            ["id", "project", "messages", "external_id", "metadata", "split", "created_at"],
                            prompt_rows,
                        )
                    _insert(RoundPrompt, ["round", "prompt", "judgement_count"], round_prompt_rows)
                    _insert(
                        Completion,
                        ["id", "prompt", "round", "text", "html", "source_model", "generation_params", "created_at"],
                        completion_rows,
                    )
                    _insert(
                        Assignment,
                        [
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
                        ],
                        assignment_rows,
                    )
                    if mode == "ranking":
                        _insert(
                            RankingJudgement,
                            [
                                "id",
                                "project",
                                "annotator",
                                "assignment",
                                "prompt",
                                "round",
                                "rationale",
                                "time_ms",
                                "client_uuid",
                                "created_at",
                            ],
                            judgement_rows,
                        )
                        _insert(RankedCompletion, ["judgement", "completion", "rank", "position"], ranked_rows)
                    else:
                        _insert(
                            PairwiseJudgement,
                            [
                                "id",
                                "project",
                                "annotator",
                                "assignment",
                                "prompt",
                                "round",
                                "left",
                                "right",
                                "item_key",
                                "choice",
                                "strength",
                                "rationale",
                                "time_ms",
                                "client_uuid",
                                "created_at",
                            ],
                            judgement_rows,
                        )
        if mode == "ranking":
            ids["judgement"] = 0  # pairwise judgements live in their own table
        print(
            f"seeded {mode}: {prompts} prompts in {rounds} round(s), {judged} judgements "
            f"in {time.perf_counter() - started:.0f} s",
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


def seeded_from_database() -> dict[str, object]:
    from django.contrib.auth import get_user_model

    from feedback.models import Round

    users = get_user_model().objects.order_by("pk")
    return {
        "slugs": {"ranking": "bench-ranking", "pairwise": "bench-pairwise"},
        "rounds": Round.objects.filter(project__slug="bench-ranking").count(),
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
) -> tuple[dict[str, list[float]], dict[str, int], list[int]]:
    """Full Django request handling without a network: the server-side time of each call, the
    most SQL statements one call took (counted on the warm-up calls, so counting costs the timings nothing),
    and the numbers of the rounds the tasks it was given belong to."""
    from django.contrib.auth import get_user_model
    from django.db import connection
    from django.db.models import Max
    from django.test import Client
    from django.test.utils import CaptureQueriesContext

    from feedback.models import Assignment

    last_before = Assignment.objects.aggregate(last=Max("pk"))["last"] or 0

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
        body = judgement_body(response.json())
        start, cpu = time.perf_counter(), time.thread_time()
        response = client.post(submit_url, body, content_type="application/json")
        timings["submit"].append((time.perf_counter() - start) * 1000)
        timings["submit cpu"].append((time.thread_time() - cpu) * 1000)
        assert response.status_code == 201, (response.status_code, response.content)
    leased = Assignment.objects.filter(project__slug=slug, pk__gt=last_before)
    served = sorted(set(leased.values_list("round__number", flat=True)))
    return timings, queries, served


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

    from feedback.models import Assignment, PairwiseJudgement, Project, RankingJudgement

    project = Project.objects.get(slug=slug)
    judgements = PairwiseJudgement if project.mode == "pairwise" else RankingJudgement
    stored = judgements.objects.filter(project=project)
    found = set(stored.filter(client_uuid__in=created).values_list("client_uuid", flat=True))
    # an item: a pair of one round's completions, or one round's completions of a prompt
    item = ["item_key"] if project.mode == "pairwise" else ["prompt_id", "round_id"]
    return {
        "new judgements stored": stored.count() - before,
        "201 answers": len(created),
        "lost (201 but not stored)": len(created) - len(found),
        "items over their overlap": Assignment.objects.filter(project=project)
        .exclude(slot=None)
        .values("item_key")
        .annotate(n=Count("pk"))
        .filter(n__gt=project.overlap)
        .count(),
        "items judged twice by one annotator": stored.values("annotator_id", *item)
        .annotate(n=Count("pk"))
        .filter(n__gt=1)
        .count(),
        "rounds judged": sorted(set(stored.filter(client_uuid__in=created).values_list("round__number", flat=True))),
    }


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
        if seeded["rounds"] != args.rounds:
            raise SystemExit(
                f"{args.seeded_db} was seeded with {seeded['rounds']} round(s), not --rounds {args.rounds}"
            )
    else:
        seeded = seed(prompts=args.prompts, judgements_per_prompt=args.judgements_per_prompt, rounds=args.rounds)
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
    lines = [
        heading,
        "",
        f"`{command}` on {platform.machine()} with {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, {database}; {time.strftime('%Y-%m-%d')}. "
        + data
        + ("(a copy of a database seeded earlier)." if reuse else f"(seeding took {seed_seconds:.0f} s)."),
        "",
        "Server-side time (Django's full request handling in process: middleware, session auth, DRF, services; "
        f"no network), {args.calls:,} calls each, {args.annotators} annotators taking turns. Wall is the time a "
        "caller waits; CPU is this thread's CPU time in the call, the part that does not depend on what else "
        "the machine runs:",
        "",
        "| project | next-task (wall) | submit (wall) | next-task (CPU) | submit (CPU) | SQL statements per call |",
        "|---|---|---|---|---|---|",
    ]
    for mode, slug in seeded["slugs"].items():
        timings, queries, served = in_process(slug=slug, annotator_ids=in_process_ids, calls=args.calls)
        print(f"{mode}: in process, next-task answered tasks of round(s) {served}", flush=True)
        assert served == [args.rounds], served  # the newest round; the older ones are fully judged
        lines.append(
            f"| {mode} | {summary(timings['next-task'])} | {summary(timings['submit'])} | "
            f"{summary(timings['next-task cpu'])} | {summary(timings['submit cpu'])} | "
            f"next-task {queries['next-task']}, submit {queries['submit']} |"
        )
        print(lines[-1], flush=True)

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
        from feedback.models import PairwiseJudgement, RankingJudgement

        for mode, slug in seeded["slugs"].items():
            judgements = PairwiseJudgement if mode == "pairwise" else RankingJudgement
            before = judgements.objects.filter(project__slug=slug).count()
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
    finally:
        server.terminate()
        server.wait(timeout=30)
    lines += [
        "",
        "Lost = answered 201 but not in the database; over overlap = items holding more slots than the project's "
        "overlap; judged twice = an annotator with two judgements on one item. The number of new rows equals the "
        "number of 201 answers (checked by the script)."
        + (
            f" Every task next-task answered, in process and over HTTP, was of round {args.rounds} "
            "(checked by the script)."
            if args.rounds > 1
            else ""
        ),
        "",
    ]
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    lines[3:3] = ["", f"Load average when the run ended: {load} (other work shared the machine's cores)."]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_results(text, heading, under)


if __name__ == "__main__":
    main()
