"""Two huey consumers against one on one Redis queue of generation and export jobs.

Usage: REDIS_URL=redis://... [DATABASE_URL=postgres://...] python benchmarks/workers_speed.py
       [--projects 4] [--prompts 6] [--k 2] [--max-new-tokens 24] [--export-prompts 20000] [--repeats 2]
       [--model var/models/SmolLM2-135M-Instruct] [--redis-db 15] [--no-write]

The queue: M projects (--projects) each with a round to write (--prompts prompts x K completions of
at most --max-new-tokens tokens, by the model given, the default model unless --model says otherwise)
and M JSONL exports (`dpo`, default options) of one large ranking project (--export-prompts prompts x
4 completions, each ranked alike by 2 annotators). The rounds and exports are asked for through the
services, as the web app asks for them, alternating generation and export, all at once.

The same jobs run with 1 consumer, then with 2, and again (--repeats), taking turns (`manage.py run_huey
--flush-locks`, one process each, the settings' one worker thread, torch's default threads), each time on fresh state:
a new database (with DATABASE_URL=postgres://..., a new PostgreSQL database beside the one named
there, dropped at the end, so the role needs CREATEDB; otherwise a new SQLite file, the production
settings), an empty data dir, and an empty Redis database (--redis-db of REDIS_URL's server, which is
this benchmark's own: it is emptied before each run and at the end). The consumers are started and
have logged that they are up before anything is queued, so their start-up is not timed; loading the
model and importing torch in a consumer's first generation job is. The wall time runs from the
first request to the moment the last job is seen finished (the database and the export job records
are polled every 0.2 s).

The figures go into benchmarks/RESULTS.md under "## Several workers" unless --no-write.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import secrets
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.annotate_speed import drop_postgres_database, write_results  # noqa: E402

SECTION = "## Several workers"
DEFAULT_MODEL = ROOT / "var" / "models" / "SmolLM2-135M-Instruct"
EXECUTED = re.compile(r"feedback\.tasks\.(\w+): [0-9a-f-]+ executed in ([0-9.]+)s")


def create_postgres_database(url: str, name: str) -> str:
    """A new, empty database called `name` on the server of `url`; returns its URL."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    return url.rsplit("/", 1)[0] + "/" + name


def redis_database(url: str, number: int) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{number}"))


def machine() -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    found = re.search(r"^flags\s*:\s*(.+)$", cpuinfo, re.M)
    flags = set(found.group(1).split()) if found else set()
    have = [name for name in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if name in flags]
    lacking = [name for name in ("avx512f", "avx512_bf16", "amx_bf16") if name not in flags]
    cores = len(os.sched_getaffinity(0))
    return (
        f"{model.group(1) if model else platform.processor() or platform.machine()}, {cores} cores "
        f"(flags: {', '.join(have) or 'none of avx2/avx512f/avx512_bf16/amx_bf16'}"
        + (f"; no {', no '.join(lacking)}" if lacking else "")
        + ")"
    )


def load() -> str:
    return ", ".join(f"{x:.1f}" for x in os.getloadavg())


def setup_django(data_dir: Path, database_url: str, redis_url: str) -> None:
    os.environ |= {
        "RANKWISE_DATA_DIR": str(data_dir),
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "DEBUG": "0",
        "RANKWISE_ENV_FILE": "/dev/null",
        "RANKWISE_GENERATION_LOW_WATER": "0",  # no rounds but the benchmark's
        "DJANGO_SETTINGS_MODULE": "config.settings",
    }
    os.environ.setdefault("SECRET_KEY", secrets.token_urlsafe(50))
    os.environ.setdefault("ALLOWED_HOSTS", "127.0.0.1,localhost")
    import django

    django.setup()


def fresh_state(*, data_dir: Path, postgres: bool, server_url: str, database_name: str, redis_url: str) -> None:
    """An empty data dir, Redis database and database (dropped and made again), migrated."""
    import redis
    from django.core.management import call_command
    from django.db import connections

    connections.close_all()
    if postgres:
        drop_postgres_database(server_url, database_name)
        create_postgres_database(server_url, database_name)
    for child in data_dir.iterdir():
        shutil.rmtree(child) if child.is_dir() else child.unlink()
    redis.Redis.from_url(redis_url).flushdb()
    call_command("migrate", verbosity=0)


def seed(*, projects: int, prompts: int, k: int, max_new_tokens: int, export_prompts: int, model: Path):
    """The projects whose rounds are written, and the project that is exported."""
    import uuid

    from django.contrib.auth import get_user_model
    from django.db import connection

    from feedback.models import Completion, Project, Prompt, RankedCompletion, RankingJudgement, Round

    questions = ["How do I reverse a list in Python?", "Why is the sky blue?", "Give me a tip for better sleep."]
    written = []
    for n in range(projects):
        project = Project.objects.create(
            name=f"Written {n}",
            slug=f"written-{n}",
            base_model=str(model),
            completions_per_prompt=k,
            max_new_tokens=max_new_tokens,
        )
        Prompt.objects.bulk_create(
            Prompt(project=project, messages=[{"role": "user", "content": f"{questions[i % 3]} ({n}.{i})"}])
            for i in range(prompts)
        )
        written.append(project)

    exported = Project.objects.create(name="Exported", slug="exported", mode="ranking", completions_per_prompt=4)
    annotators = [get_user_model().objects.create(username=f"annotator-{n}") for n in range(2)]
    round_one = Round.objects.create(project=exported, number=1, status=Round.Status.DONE, writers=["seed"])
    new_prompts = Prompt.objects.bulk_create(
        (
            Prompt(project=exported, messages=[{"role": "user", "content": f"Question {i}: how do I sort a dict?"}])
            for i in range(export_prompts)
        ),
        batch_size=5000,
    )
    completions = Completion.objects.bulk_create(
        (
            Completion(prompt=p, round=round_one, text=f"Answer {j} to question {p.pk}: use sorted(d.items()). " * 3)
            for p in new_prompts
            for j in range(4)
        ),
        batch_size=5000,
    )
    judgements = RankingJudgement.objects.bulk_create(
        (
            RankingJudgement(project=exported, annotator=a, prompt=p, round=round_one, client_uuid=uuid.uuid4())
            for p in new_prompts
            for a in annotators
        ),
        batch_size=5000,
    )
    by_prompt: dict[int, list[Completion]] = {}
    for completion in completions:
        by_prompt.setdefault(completion.prompt_id, []).append(completion)
    RankedCompletion.objects.bulk_create(
        (
            RankedCompletion(judgement=j, completion=c, rank=position + 1, position=position)
            for j in judgements
            for position, c in enumerate(by_prompt[j.prompt_id])
        ),
        batch_size=5000,
    )
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE")
    return written, exported


def run_leg(consumers: int, args: argparse.Namespace, state: dict) -> dict:
    from django.db import connections

    from feedback.models import Completion, Round
    from feedback.selectors.preferences import PreferenceExportOptions
    from feedback.services.exports import export_job_get, export_job_start
    from feedback.services.rounds import round_enqueue, round_request
    from tests.processes import Consumer

    fresh_state(**state)
    started = time.perf_counter()
    written, exported = seed(
        projects=args.projects,
        prompts=args.prompts,
        k=args.k,
        max_new_tokens=args.max_new_tokens,
        export_prompts=args.export_prompts,
        model=args.model,
    )
    seeding = time.perf_counter() - started
    connections.close_all()
    data_dir = state["data_dir"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    workers = [Consumer(f"consumer-{n}", env, data_dir) for n in range(1, consumers + 1)]
    try:
        deadline = time.monotonic() + 300
        while not all("consumer started" in w.log().lower() for w in workers):
            for worker in workers:
                if worker.process.poll() is not None:
                    raise SystemExit(f"{worker.name} stopped:\n{worker.log()[-3000:]}")
            if time.monotonic() > deadline:
                raise SystemExit("the consumers did not start")
            time.sleep(0.2)
        time.sleep(2)  # their start-up hooks (reaper, stale locks) run once, before the timed part
        load_before = load()

        started = time.perf_counter()
        rounds, jobs = [], []
        for project in written:
            the_round = round_request(project=project)
            round_enqueue(round=the_round)
            rounds.append(the_round.pk)
            jobs.append(
                export_job_start(
                    project=exported,
                    options=PreferenceExportOptions(format="dpo"),
                    file_type="jsonl",
                    requested_by_id=None,
                ).id
            )
        finished: dict[str, float] = {}
        deadline = time.monotonic() + args.timeout
        while len(finished) < len(rounds) + len(jobs):
            now = time.perf_counter() - started
            for pk, status in Round.objects.filter(pk__in=rounds).values_list("pk", "status"):
                if status in (Round.Status.DONE, Round.Status.FAILED):
                    finished.setdefault(f"round {pk}", now)
            for job_id in jobs:
                if f"export {job_id}" not in finished and export_job_get(job_id=job_id).status in (
                    "succeeded",
                    "failed",
                ):
                    finished[f"export {job_id}"] = now
            for worker in workers:
                if worker.process.poll() is not None:
                    raise SystemExit(f"{worker.name} stopped:\n{worker.log()[-3000:]}")
            if time.monotonic() > deadline:
                raise SystemExit("timed out: " + "\n".join(w.log()[-2000:] for w in workers))
            time.sleep(0.2)
        wall = max(finished.values())
        load_after = load()
    finally:
        for worker in workers:
            if worker.process.poll() is None:
                worker.process.send_signal(signal.SIGINT)
        for worker in workers:
            worker.process.wait(timeout=120)

    failed = list(Round.objects.filter(pk__in=rounds).exclude(status=Round.Status.DONE).values_list("pk", "error"))
    jobs_done = [export_job_get(job_id=job_id) for job_id in jobs]
    failed += [(job.id, job.error) for job in jobs_done if job.status != "succeeded"]
    if failed:
        raise SystemExit(f"jobs failed: {failed}")
    completions = Completion.objects.filter(round_id__in=rounds).count()
    assert completions == args.projects * args.prompts * args.k, completions
    rows = {job.rows for job in jobs_done}
    assert len(rows) == 1, rows
    per_consumer = []
    durations: dict[str, list[float]] = {"round_write_task": [], "export_file_task": []}
    for worker in workers:
        ran = {name: 0 for name in durations}
        busy = 0.0
        for task, seconds in EXECUTED.findall(worker.log()):
            if task in durations:
                ran[task] += 1
                durations[task].append(float(seconds))
                busy += float(seconds)
        per_consumer.append((worker.name, ran["round_write_task"], ran["export_file_task"], busy))
    return {
        "consumers": consumers,
        "wall": wall,
        "jobs": len(finished),
        "seeding": seeding,
        "load_before": load_before,
        "load_after": load_after,
        "per_consumer": per_consumer,
        "durations": durations,
        "rows": rows.pop(),
        "completions": completions,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--projects", type=int, default=4, help="M: rounds to write, and exports to build")
    parser.add_argument("--prompts", type=int, default=6, help="prompts in each round")
    parser.add_argument("--k", type=int, default=2, help="completions per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--export-prompts", type=int, default=20_000)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--redis-db", type=int, default=15, help="the benchmark's own Redis database, emptied")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each, taking turns: 1, 2, 1, 2, ...")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds a run may take")
    parser.add_argument("--no-write", action="store_true", help="print the figures, leave RESULTS.md alone")
    args = parser.parse_args()
    if not (args.model / "config.json").is_file():
        parser.error(f"no model at {args.model} (run `python manage.py fetch_default_model`)")
    args.model = args.model.resolve()
    if not os.environ.get("REDIS_URL", "").startswith("redis://"):
        parser.error("REDIS_URL must name a Redis server (redis://...): the consumers share its queue")
    server_url = os.environ.get("DATABASE_URL", "")
    postgres = server_url.startswith(("postgres://", "postgresql://"))
    if server_url and not postgres:
        parser.error(f"DATABASE_URL must be a postgres:// URL or unset (SQLite), not {server_url.split(':')[0]}://")
    redis_url = redis_database(os.environ["REDIS_URL"], args.redis_db)

    scratch = tempfile.TemporaryDirectory()
    data_dir = Path(scratch.name)
    database_name = f"rankwise_workers_{os.getpid()}"
    if postgres:
        database_url = create_postgres_database(server_url, database_name)
    else:
        database_url = f"sqlite:///{data_dir / 'rankwise.sqlite3'}"
    state = {
        "data_dir": data_dir,
        "postgres": postgres,
        "server_url": server_url,
        "database_name": database_name,
        "redis_url": redis_url,
    }
    try:
        setup_django(data_dir, database_url, redis_url)
        legs = []
        for _ in range(args.repeats):  # taking turns, so that a load that moves slows both alike
            for consumers in (1, 2):
                legs.append(run_leg(consumers, args, state))
            leg = legs[-1]
            print(f"{consumers} consumer(s): {leg['jobs']} jobs in {leg['wall']:.1f} s, load {leg['load_after']}")
        report(args, legs, postgres=postgres)
    finally:
        import redis
        from django.db import connections

        connections.close_all()
        if postgres:
            drop_postgres_database(server_url, database_name)
        redis.Redis.from_url(redis_url).flushdb()
        scratch.cleanup()


def report(args: argparse.Namespace, legs: list[dict], *, postgres: bool) -> None:
    import torch
    import transformers
    from django.db import connection

    if postgres:
        connection.ensure_connection()
        database = f"PostgreSQL {connection.pg_version // 10000}.{connection.pg_version % 10000} on the same machine"
        command = "DATABASE_URL=postgres://... REDIS_URL=redis://... python benchmarks/workers_speed.py"
    else:
        database = f"SQLite {connection.Database.sqlite_version} (WAL, immediate transactions)"
        command = "REDIS_URL=redis://... python benchmarks/workers_speed.py"
    one = legs[0]
    jobs = one["jobs"]
    walls = {n: [leg["wall"] for leg in legs if leg["consumers"] == n] for n in (1, 2)}
    lines = [
        SECTION,
        "",
        f"`{command}` on {time.strftime('%Y-%m-%d')}: {machine()}, Python {platform.python_version()}, "
        f"torch {torch.__version__}, transformers {transformers.__version__}; {database}; Redis on the same "
        "machine. The machine is shared: other work may have been running, and the load average (1, 5, 15 min) "
        "is given for each run.",
        "",
        f"The queue: {jobs} jobs, asked for at once through the services, generation and export in turn: "
        f"{args.projects} rounds to write ({args.projects} projects x {args.prompts} prompts x {args.k} "
        f"completions of at most {args.max_new_tokens} new tokens, by {args.model.name}) and {args.projects} "
        f"JSONL exports (`dpo`, {one['rows']:,} rows each, of one ranking project of {args.export_prompts:,} "
        "prompts x 4 completions, each ranked alike by 2 annotators). Each consumer is "
        "`manage.py run_huey --flush-locks` in a process of its own (one worker thread, torch's default threads, "
        "exports with their forked helper, "
        "as deployed), started and up before anything is queued; loading the model in a consumer's first "
        "generation job is timed. Wall time runs from the first request to the last job seen finished "
        "(polled every 0.2 s). Each run starts from a new database, data dir and Redis database with the "
        f"same data. 1 and 2 consumers took turns, {args.repeats} runs each, in the order of the table.",
        "",
        "| consumers | wall | jobs/minute | rounds + exports each consumer ran | mean round job | mean export job "
        "| load before | load after |",
        "|---:|---:|---:|---|---:|---:|---|---|",
    ]
    for leg in legs:
        ran = "; ".join(f"{rounds} + {exports} ({busy:.0f} s busy)" for _, rounds, exports, busy in leg["per_consumer"])
        lines.append(
            f"| {leg['consumers']} | {leg['wall']:.1f} s | {leg['jobs'] / leg['wall'] * 60:.1f} | {ran} | "
            f"{statistics.mean(leg['durations']['round_write_task']):.1f} s | "
            f"{statistics.mean(leg['durations']['export_file_task']):.1f} s | {leg['load_before']} | "
            f"{leg['load_after']} |"
        )
    ratio = statistics.median(walls[1]) / statistics.median(walls[2])
    runs = ", ".join(f"{a / b:.2f}x" for a, b in zip(walls[1], walls[2], strict=True))
    cores = len(os.sched_getaffinity(0))
    highest = max(float(x) for leg in legs for x in (leg["load_before"] + ", " + leg["load_after"]).split(", "))
    lines += [
        "",
        f"Two consumers against one: {ratio:.2f}x the jobs per minute (median wall times; by turn {runs}). "
        "A job's time is as huey logs it "
        "(from taking it to finishing it); busy is the sum of a consumer's job times. One consumer already "
        "uses more than one core at times (torch's threads while generating, the export's forked helper), so on "
        f"{cores} cores two consumers overlap the jobs rather than add cores, and each job takes longer while "
        "they share them. Two consumers on one machine are about correctness (the locks, a killed worker); "
        "the speed-up of more workers comes from putting them on more machines.",
    ]
    if highest > cores:
        lines += [
            "",
            f"Other work was running on the machine (load average up to {highest:.1f} on {cores} cores): the "
            "times are longer than an idle machine's, and the ratio is rougher than its two decimals.",
        ]
    lines.append("")
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_results(text, SECTION)


if __name__ == "__main__":
    main()
