"""Export speed: ranking judgements -> `dpo` JSONL through the command and through the API.

Usage: python benchmarks/export_speed.py [--judgements 1000000] [--small 250000] [--rounds 1]
                                         [--keep DIR [--reuse]] [--phases]

For each size (the small one shows whether memory grows with the data) it builds a fresh
SQLite database with the production settings (WAL, immediate transactions) in a temporary
data dir: one ranking project, K = 4 completions a prompt, 3 annotators ranking every prompt
(judgements / 3 prompts), each ranking a random order with a tie in one ranking of five.
The rows are written straight through the database cursor (the ORM would take longer to
build the data than to export it); the schema comes from the migrations.

Then it times, each in its own process so that the peak resident memory (ru_maxrss from
wait4) belongs to that export alone, and each after reading the database files once (so
that it finds them in the page cache) and a sync (so that the run before's file is on disk):

1. `python manage.py export_preferences bench --format dpo --out FILE.jsonl`, which shares the
   work with forked helper processes, one per core (settings.EXPORT_WORKERS);
2. the same command in one process (RANKWISE_EXPORT_WORKERS=1), for the ratio;
3. `GET /api/v1/projects/bench/export/?format=dpo` through Django's WSGI handler in-process
   (middleware, token auth, DRF, the streaming response; no socket), writing the body to a file.

Rows/s is the number of JSONL rows over the wall time of the whole process, start-up
included, and over its CPU time (user + system, helpers included), which other work on a
shared machine disturbs less. Peak memory is that of the largest of the export's processes
(wait4 reports the maximum over a process and the children it reaped). The load average
and a CPU calibration (the CPU time of sum(range(1000))) are recorded with the figures.
With --rounds N the three ways run in turn N times; each way's fastest round is reported,
with every round's wall time, and its highest peak.
With --phases it also splits the CPU time of one in-process export of the small database
into reading and grouping the rows by prompt, deriving the pairs and building the rows,
and writing the JSONL lines (to /dev/null).
The figures go to benchmarks/RESULTS.md under "## Export speed".
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
SECTION = "## Export speed"
WAYS = {"command": "command", "command_one_process": "command, one process", "api": "API"}
K = 4
ANNOTATORS = 3
WORDS = [
    "model",
    "answer",
    "python",
    "list",
    "reverse",
    "query",
    "index",
    "token",
    "batch",
    "rank",
    "pair",
    "judge",
    "prompt",
    "learn",
    "data",
]


def _django(data_dir: Path) -> None:
    os.environ["RANKWISE_DATA_DIR"] = str(data_dir)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()


def _insert(cursor, model, rows: list[dict]) -> None:
    """INSERT rows given as {field name: database value}; other fields take their defaults."""
    from django.db import connection

    fields = [f for f in model._meta.concrete_fields]
    defaults = {}
    for field in fields:
        if field.primary_key:
            defaults[field.attname] = None
        elif field.has_default():
            defaults[field.attname] = field.get_db_prep_save(field.get_default(), connection)
        elif field.null:
            defaults[field.attname] = None
        elif field.blank:
            defaults[field.attname] = ""
    columns = ", ".join(connection.ops.quote_name(f.column) for f in fields)
    marks = ", ".join(["%s"] * len(fields))
    sql = f"INSERT INTO {connection.ops.quote_name(model._meta.db_table)} ({columns}) VALUES ({marks})"
    names = [f.attname for f in fields]
    cursor.executemany(sql, [[row.get(name, defaults.get(name)) for name in names] for row in rows])


def generate(data_dir: Path, judgements: int) -> dict:
    """Fill the database in data_dir; returns counts."""
    _django(data_dir)
    from django.contrib.auth import get_user_model
    from django.db import connection, transaction
    from django.utils import timezone
    from rest_framework.authtoken.models import Token

    from feedback.models import (
        Completion,
        Membership,
        Project,
        Prompt,
        RankedCompletion,
        RankingJudgement,
        Round,
        RoundPrompt,
    )

    rng = random.Random(0)
    now = connection.ops.adapt_datetimefield_value(timezone.now())
    prompts = judgements // ANNOTATORS
    texts = [
        " ".join(" ".join(rng.choice(WORDS) for _ in range(10)).capitalize() + "." for _ in range(rng.randint(2, 6)))
        for _ in range(2000)
    ]
    questions = [" ".join(rng.choice(WORDS) for _ in range(12)).capitalize() + "?" for _ in range(2000)]
    User = get_user_model()
    project = Project.objects.create(name="Bench", slug="bench", mode=Project.Mode.RANKING, completions_per_prompt=K)
    Project.objects.create(name="Empty", slug="empty")
    staff = User.objects.create_user("bench-staff", is_staff=True)
    Token.objects.create(user=staff, key="b" * 40)
    annotators = [User.objects.create_user(f"bench-annotator-{i}") for i in range(ANNOTATORS)]
    for user in annotators:
        Membership.objects.create(user=user, project=project)
    # every completion and judgement in the project's one round, as imported completions are
    round_one = Round.objects.create(
        project=project, number=1, writers=["bench"], strategy=Round.Strategy.IMPORTED, status=Round.Status.DONE
    )

    started = time.perf_counter()
    batch = 20_000
    with transaction.atomic(), connection.cursor() as cursor:
        for first in range(1, prompts + 1, batch):
            ids = range(first, min(first + batch, prompts + 1))
            _insert(
                cursor,
                Prompt,
                [
                    {
                        "id": p,
                        "project_id": project.pk,
                        "messages": json.dumps([{"role": "user", "content": f"{rng.choice(questions)} ({p})"}]),
                        "metadata": "{}",
                        "created_at": now,
                    }
                    for p in ids
                ],
            )
            _insert(
                cursor,
                RoundPrompt,
                [{"round_id": round_one.pk, "prompt_id": p, "judgement_count": ANNOTATORS} for p in ids],
            )
            completion_rows, judgement_rows, ranked_rows = [], [], []
            for p in ids:
                completion_ids = [(p - 1) * K + j + 1 for j in range(K)]
                for cid in completion_ids:
                    text = rng.choice(texts)
                    completion_rows.append(
                        {
                            "id": cid,
                            "prompt_id": p,
                            "round_id": round_one.pk,
                            "text": text,
                            "html": f"<p>{text}</p>",
                            "source_model": "bench",
                            "generation_params": "{}",
                            "created_at": now,
                        }
                    )
                for a, annotator in enumerate(annotators):
                    jid = (p - 1) * ANNOTATORS + a + 1
                    judgement_rows.append(
                        {
                            "id": jid,
                            "project_id": project.pk,
                            "annotator_id": annotator.pk,
                            "prompt_id": p,
                            "round_id": round_one.pk,
                            "client_uuid": uuid.UUID(int=rng.getrandbits(128)).hex,
                            "created_at": now,
                        }
                    )
                    order = completion_ids[:]
                    rng.shuffle(order)
                    ranks = [1, 2, 3, 4] if rng.random() < 0.8 else [1, 2, 2, 3]
                    for position, (cid, rank) in enumerate(zip(order, ranks, strict=True)):
                        ranked_rows.append(
                            {"judgement_id": jid, "completion_id": cid, "rank": rank, "position": position}
                        )
            _insert(cursor, Completion, completion_rows)
            _insert(cursor, RankingJudgement, judgement_rows)
            _insert(cursor, RankedCompletion, ranked_rows)
    return {
        "prompts": prompts,
        "completions": prompts * K,
        "judgements": prompts * ANNOTATORS,
        "ranked": prompts * ANNOTATORS * K,
        "seconds": round(time.perf_counter() - started, 1),
    }


def serve_api(data_dir: Path, out: Path) -> None:
    """GET the dpo export through the WSGI handler and write the streamed body to out."""
    _django(data_dir)
    from django.core.handlers.wsgi import WSGIHandler

    from config import settings

    app = WSGIHandler()
    environ = {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": "/api/v1/projects/bench/export/",
        "QUERY_STRING": "format=dpo",
        "SERVER_NAME": "localhost",
        "SERVER_PORT": "443",
        "HTTP_HOST": settings.ALLOWED_HOSTS[0] if settings.ALLOWED_HOSTS else "localhost",
        "HTTP_AUTHORIZATION": "Token " + "b" * 40,
        "wsgi.url_scheme": "https",
        "wsgi.input": open(os.devnull, "rb"),  # noqa: SIM115
        "wsgi.errors": sys.stderr,
    }
    status = []
    body = app(environ, lambda s, headers, exc_info=None: status.append(s))
    with out.open("wb") as stream:
        for chunk in body:
            stream.write(chunk)
    body.close()
    if not status[0].startswith("200"):
        raise SystemExit(f"API answered {status[0]}: {out.read_text()[:500]}")


def write_lines(chunks, stream) -> int:
    count = 0
    for chunk in chunks:
        stream.write(chunk)
        count += chunk.count("\n")
    return count


def phases(data_dir: Path) -> dict:
    """CPU seconds of the dpo export's stages in this process, each pass adding one stage to the one before."""
    _django(data_dir)
    from feedback.models import Project
    from feedback.selectors.preferences import PreferenceExportOptions, _prompt_groups, preference_rows
    from feedback.services.exports import export_jsonl_chunks

    project = Project.objects.get(slug="bench")
    options = PreferenceExportOptions(format="dpo")
    seconds = []
    with open(os.devnull, "w", encoding="utf-8") as devnull:
        for run in (
            lambda: sum(1 for _ in _prompt_groups(project, options, None, None)),
            lambda: sum(1 for _ in preference_rows(project=project, options=options)),
            lambda: write_lines(export_jsonl_chunks(rows=preference_rows(project=project, options=options)), devnull),
        ):
            started = time.process_time()
            count = run()
            seconds.append(time.process_time() - started)
    return {
        "rows": count,
        "reading_and_grouping": round(seconds[0], 1),
        "deriving_pairs_and_rows": round(seconds[1] - seconds[0], 1),
        "writing_jsonl": round(seconds[2] - seconds[1], 1),
        "total": round(seconds[2], 1),
    }


def machine() -> dict:
    """Load averages and the CPU time of sum(range(1000)) in microseconds, to compare runs and machines."""
    started = time.process_time()
    for _ in range(10_000):
        sum(range(1000))
    return {
        "load": [round(x, 1) for x in os.getloadavg()],
        "sum_range_us": round((time.process_time() - started) * 100, 1),
    }


def timed(command: list[str], env: dict) -> tuple[float, float, int, str]:
    """Wall seconds, CPU seconds (user + system), peak resident memory in MiB and stdout of a child process."""
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stdout = process.stdout.read().decode()
    stderr = process.stderr.read().decode()
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{stderr[-2000:]}")
    return seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss // 1024, stdout


def warm(data_dir: Path) -> None:
    """Read the database files once, so that every timed export finds them in the page cache, and write out
    what the run before left to disk, so that it does not slow the next one."""
    os.sync()
    for path in data_dir.glob("rankwise.sqlite3*"):
        with path.open("rb") as stream:
            while stream.read(1 << 24):
                pass


def figures(rows: int, seconds: float, cpu: float, peak: int) -> dict:
    return {
        "rows": rows,
        "seconds": round(seconds, 1),
        "cpu_seconds": round(cpu, 1),
        "rows_per_s": round(rows / seconds),
        "rows_per_cpu_s": round(rows / cpu),
        "peak_mib": peak,
    }


def measure(judgements: int, base: Path, *, reuse: bool, rounds: int) -> dict:
    data_dir = base / f"n{judgements}"
    marker = data_dir / "generated.json"
    env = {**os.environ, "RANKWISE_DATA_DIR": str(data_dir), "DEBUG": "0", "ALLOWED_HOSTS": "localhost"}
    python = sys.executable
    if reuse and marker.exists():
        counts = json.loads(marker.read_text())
    else:
        shutil.rmtree(data_dir, ignore_errors=True)
        data_dir.mkdir(parents=True)
        subprocess.run([python, "manage.py", "migrate", "-v", "0"], env=env, cwd=ROOT, check=True)
        _, _, _, generated = timed([python, __file__, "_generate", str(data_dir), str(judgements)], env)
        counts = json.loads(generated)
        marker.write_text(generated)
    database_mib = sum(f.stat().st_size for f in data_dir.glob("rankwise.sqlite3*")) / 2**20

    before = machine()
    out, serial_out, api_out = (data_dir / name for name in ("command.jsonl", "one-process.jsonl", "api.jsonl"))
    command = [python, "manage.py", "export_preferences", "bench", "--format", "dpo", "--out"]
    ways = {
        "command": ([*command, str(out)], env),
        "command_one_process": ([*command, str(serial_out)], {**env, "RANKWISE_EXPORT_WORKERS": "1"}),
        "api": ([python, __file__, "_api", str(data_dir), str(api_out)], env),
    }
    runs: dict[str, list[tuple[float, float, int, str]]] = {way: [] for way in ways}
    for _ in range(rounds):
        for way, (argv, way_env) in ways.items():
            warm(data_dir)
            runs[way].append(timed(argv, way_env))
    rows = int(re.match(r"(\d+) dpo rows", runs["command"][0][3]).group(1))
    # Compared in chunks: a child forked while this process held both files would report their size as its peak.
    same = filecmp.cmp(api_out, out, shallow=False) and filecmp.cmp(serial_out, out, shallow=False)
    fastest = {way: min(way_runs) for way, way_runs in runs.items()}
    peaks = {way: max(run[2] for run in way_runs) for way, way_runs in runs.items()}

    empty = data_dir / "empty.jsonl"
    _, _, baseline, _ = timed(
        [python, "manage.py", "export_preferences", "empty", "--format", "dpo", "--out", str(empty)], env
    )
    return {
        "judgements": counts["judgements"],
        "machine": [before, machine()],
        "counts": counts,
        "database_mib": round(database_mib),
        "jsonl_mib": round(out.stat().st_size / 2**20),
        **{way: figures(rows, fastest[way][0], fastest[way][1], peaks[way]) for way in ways},
        "wall_by_round": {way: [round(run[0], 1) for run in way_runs] for way, way_runs in runs.items()},
        "identical": same,
        "baseline_peak_mib": baseline,
    }


def write_results(results: list[dict], stages: dict | None) -> None:
    lines = [
        SECTION,
        "",
        f"`python benchmarks/export_speed.py` on {platform.machine()}, {os.cpu_count()} CPUs (the load while "
        f"measured is below), Python {platform.python_version()}, SQLite "
        f"{__import__('sqlite3').sqlite_version}, {time.strftime('%Y-%m-%d')}.",
        "",
        f"Data: one ranking project, K = {K}, {ANNOTATORS} annotators rank every prompt in a random order "
        "(one ranking in five has a tie), written straight into a fresh SQLite database (production settings). "
        "Export: `dpo`, all pairs, default options. Each export runs in its own process: the command as a user "
        f"runs it (with its {os.cpu_count()} processes, one per core, forked helpers sharing the work), the same "
        "command in one process (`RANKWISE_EXPORT_WORKERS=1`), and the API through Django's WSGI handler "
        "in-process (token auth, DRF, streaming response; no socket; one process per core like the command). "
        "Wall rows/s counts the whole process, start-up included; CPU rows/s divides by the user + system time of "
        "the process and its helpers, which the other work on the machine disturbs less. Peak is the largest "
        "maximum resident set (ru_maxrss) of the export's processes; the same command on an empty project peaks at "
        "the baseline shown.",
        "",
        "| judgements | prompts | dpo rows | JSONL | way | wall | CPU | rows/s (wall) | rows/s (CPU) | peak RSS |",
        "|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        for way in WAYS:
            f = r[way]
            lines.append(
                f"| {r['judgements']:,} | {r['counts']['prompts']:,} | {f['rows']:,} | {r['jsonl_mib']} MiB "
                f"| {WAYS[way]} "
                f"| {f['seconds']} s | {f['cpu_seconds']} s | {f['rows_per_s']:,} | {f['rows_per_cpu_s']:,} "
                f"| {f['peak_mib']} MiB |"
            )
    lines.append("")
    for r in results:
        before, after = r["machine"]
        by_round = "; ".join(
            f"{WAYS[way]} {', '.join(f'{x} s' for x in seconds)}" for way, seconds in r["wall_by_round"].items()
        )
        lines.append(
            f"- Machine during the {r['judgements']:,}-judgement exports: load average (1, 5, 15 min) "
            f"{', '.join(map(str, before['load']))} before and {', '.join(map(str, after['load']))} after; "
            f"`sum(range(1000))` took {before['sum_range_us']} and {after['sum_range_us']} µs of CPU time. "
            f"Wall time by round: {by_round}."
        )
    same = all(r["identical"] for r in results)
    best = max(r[way]["rows_per_s"] for r in results for way in ("command", "api"))
    best_cpu = max(r[way]["rows_per_cpu_s"] for r in results for way in ("command", "api"))
    growth = max(results[-1][way]["peak_mib"] - results[0][way]["peak_mib"] for way in WAYS)
    shared = ", ".join(f"{r['command']['rows_per_s'] / r['command_one_process']['rows_per_s']:.2f}x" for r in results)
    lines += [
        "",
        f"Goal, at least 100,000 rows/s with memory flat in the number of rows: the speed is "
        f"{'met' if best >= 100_000 else 'not met'} here (best {best:,} rows/s of wall time, {best_cpu:,} rows/s "
        f"of CPU time); memory grows by at most {growth} MiB of peak from {results[0]['judgements']:,} to "
        f"{results[-1]['judgements']:,} judgements (the same way compared with itself). Sharing the work between "
        f"processes against one process, the command's wall rows/s at each size: {shared}.",
        "",
        f"Baseline peak (the command on an empty project): {results[0]['baseline_peak_mib']} MiB. "
        f"The command's file (either way) and the API's body are {'byte-identical' if same else 'NOT identical'} "
        "at every size.",
        "",
    ]
    if stages is not None:
        lines += [
            f"Where the time goes (the {results[0]['judgements']:,}-judgement database, CPU seconds in one process, "
            f"export to /dev/null, no start-up): reading and grouping the rows by prompt "
            f"{stages['reading_and_grouping']} s, deriving the pairs and building the rows "
            f"{stages['deriving_pairs_and_rows']} s, writing the JSONL lines {stages['writing_jsonl']} s; "
            f"{stages['total']} s for {stages['rows']:,} rows.",
            "",
        ]
    section = "\n".join(lines)
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(section + "\n", text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section
    RESULTS.write_text(text)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_generate":
        print(json.dumps(generate(Path(sys.argv[2]), int(sys.argv[3]))))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "_api":
        serve_api(Path(sys.argv[2]), Path(sys.argv[3]))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "_phases":
        print(json.dumps(phases(Path(sys.argv[2]))))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--judgements", type=int, default=1_000_000)
    parser.add_argument("--small", type=int, default=250_000, help="a second, smaller size to compare memory with")
    parser.add_argument("--keep", type=Path, help="keep the databases and exports in this directory")
    parser.add_argument("--reuse", action="store_true", help="with --keep: reuse the databases an earlier run built")
    parser.add_argument("--rounds", type=int, default=1, help="time each way this many times, keep the fastest")
    parser.add_argument("--phases", action="store_true", help="also split the small export's CPU time into stages")
    parser.add_argument("--no-write", action="store_true", help="print the figures, leave RESULTS.md alone")
    args = parser.parse_args()
    base = args.keep or Path(tempfile.mkdtemp(prefix="rankwise-export-bench-"))
    try:
        results = []
        for size in (args.small, args.judgements):
            result = measure(size, base, reuse=args.reuse, rounds=args.rounds)
            print(json.dumps(result), flush=True)
            results.append(result)
        stages = None
        if args.phases:
            env = {**os.environ, "DEBUG": "0", "ALLOWED_HOSTS": "localhost"}
            _, _, _, stdout = timed([sys.executable, __file__, "_phases", str(base / f"n{args.small}")], env)
            stages = json.loads(stdout)
            print(json.dumps(stages), flush=True)
        if not args.no_write:
            write_results(results, stages)
    finally:
        if args.keep is None:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
