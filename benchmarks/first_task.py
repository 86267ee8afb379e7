"""A newcomer's first minute: from `make run` printing the address to an annotator's first task.

Usage: python benchmarks/first_task.py [--threads N] [--port P] [--timeout 900] [--no-write]

What `make run` does, in a fresh temporary data dir (RANKWISE_DATA_DIR; the already-fetched default
model is symlinked into its models folder, so `fetch_default_model` finds it and nothing is
downloaded or written under var/): `migrate`, `fetch_default_model`, `seed_demo` (which imports the
shipped first round and queues the other prompts' completions), then, at the moment `make run` prints
the address, the worker (`run_huey --flush-locks`) and the web server (`runserver`, with its
autoreloader, as `make run` starts it) at once.
The settings are `make run`'s: DEBUG=1, a new SECRET_KEY, SQLite and the file cache in the data dir
(DATABASE_URL and REDIS_URL are removed from the environment). As the demo annotator (`alice`, her
password from the demo-credentials.json seed_demo writes) the benchmark logs in through the login
form as a browser does (session cookie and CSRF token), then asks the API's next-task every 0.5 s
until it serves a task, and every 2 s looks at the annotate page (does it say "All done" while
nothing is ready?).

Reported: seconds from the address (the worker's start) and from the web server answering to the
first task served, and whether it was a shipped one; from the database, when the worker started its
round (`Round.started_at`, after importing Django, torch and the consumer's start-up) and committed
its first batch (the first of its `Completion.created_at`: the model loaded and the first prompts'
completions written; the worker does not log the model load on its own); the CPU's flags
(generation runs in bf16 only where the CPU has AVX512_BF16 or AMX, else fp32) and the load average
before, at the first task and at the end.

--threads N sets OMP_NUM_THREADS and MKL_NUM_THREADS for the worker (torch's intra-op threads),
to approximate a smaller or busier machine. There is no setting or environment variable that makes
generation use fp32 on a CPU with bf16 (training.generate.inference_dtype decides from the CPU
flags alone), so this benchmark cannot show the fp32 path of an AVX2-only machine here.

The figures go into benchmarks/RESULTS.md under "## A newcomer's first task", one subsection per
thread setting, unless --no-write. Processes and the data dir are removed at the end, on failure too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import secrets
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.annotate_speed import RESULTS, write_results  # noqa: E402

SECTION = "## A newcomer's first task"
DEFAULT_MODEL = ROOT / "var" / "models" / "SmolLM2-135M-Instruct"
ANNOTATOR = "alice"
POLL = 0.5
INTRO = """\
`python benchmarks/first_task.py [--threads N]`: what `make run` does, in a fresh temporary data dir with the
already-fetched default model (SmolLM2-135M-Instruct) linked in: `migrate`, `fetch_default_model`, `seed_demo`
(62 prompts, K = 4, at most 192 new tokens; 8 come with the shipped first round, feedback/demo/first_round.jsonl,
and it queues the other 54's completions), then the worker (`run_huey
--flush-locks`) and `runserver` started together at the moment `make run` prints the address. The demo annotator
logs in through the login form over HTTP and asks `GET /api/v1/projects/demo/next-task/` every 0.5 s until it
serves a task; the annotate page is looked at every 2 s. The round's start and its first commit are read from
the database (`Round.started_at`, the first `Completion.created_at`); the worker logs neither the model load nor
its batches, so "first batch" below includes loading the model. Goal (issue 14): a task within 30 s of the
address on an idle 2-core machine. Generation runs in
bf16 only where the CPU has AVX512_BF16 or AMX; nothing can make it use fp32 on such a CPU (no setting or
environment variable), so the fp32 path of an AVX2-only machine is not measured here; `--threads 1` (OMP_NUM_THREADS
for the worker) stands in for a smaller or busier machine."""


def machine() -> tuple[str, set[str]]:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    found = re.search(r"^flags\s*:\s*(.+)$", cpuinfo, re.M)
    flags = set(found.group(1).split()) if found else set()
    have = [name for name in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if name in flags]
    cores = len(os.sched_getaffinity(0))
    name = model.group(1) if model else platform.processor() or platform.machine()
    return f"{name}, {cores} cores (flags: {', '.join(have) or 'none of avx2/avx512f/avx512_bf16/amx_bf16'})", flags


def load() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def manage(env: dict[str, str], *args: str) -> float:
    """Run a manage.py command to completion; its wall time."""
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "manage.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, check=False
    )
    if done.returncode:
        raise SystemExit(f"manage.py {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return time.perf_counter() - started


def start(env: dict[str, str], log: Path, *args: str) -> subprocess.Popen:
    """A manage.py command in a session of its own (so its children, e.g. runserver's reloaded child, stop with it)."""
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "manage.py", *args], cwd=ROOT, env=env, stdout=out, stderr=out, start_new_session=True
        )


def stop(process: subprocess.Popen) -> None:
    """SIGINT to the process's own group (as Ctrl-C in `make run`), then SIGKILL if it lingers."""
    if process.poll() is not None:
        return
    for sig, grace in ((signal.SIGINT, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def db_time(value: str | None) -> float | None:
    """A DateTimeField as SQLite stores it (UTC text) -> seconds since the epoch."""
    if not value:
        return None
    return datetime.fromisoformat(value).replace(tzinfo=UTC).timestamp()


def login(session: requests.Session, base: str, password: str) -> None:
    page = session.get(f"{base}/login/", timeout=30)
    page.raise_for_status()
    token = session.cookies.get("csrftoken")
    if not token:
        raise SystemExit("the login page set no csrftoken cookie")
    answer = session.post(
        f"{base}/login/",
        data={"username": ANNOTATOR, "password": password, "csrfmiddlewaretoken": token},
        headers={"Referer": f"{base}/login/"},
        allow_redirects=False,
        timeout=30,
    )
    if answer.status_code != 302 or "sessionid" not in session.cookies:
        raise SystemExit(f"login as {ANNOTATOR} failed: HTTP {answer.status_code}")


def run(args: argparse.Namespace, data_dir: Path, processes: list[subprocess.Popen]) -> dict:
    (data_dir / "models").mkdir()
    (data_dir / "models" / DEFAULT_MODEL.name).symlink_to(args.model)
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL", "RANKWISE_BASE_MODEL")}
    env |= {
        "RANKWISE_DATA_DIR": str(data_dir),
        "RANKWISE_ENV_FILE": "/dev/null",  # never this checkout's .env
        "DEBUG": "1",
        "SECRET_KEY": secrets.token_urlsafe(50),
        "PYTHONUNBUFFERED": "1",
    }
    worker_env = dict(env)
    if args.threads:
        worker_env |= {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}

    setup = {
        "migrate": manage(env, "migrate", "--noinput"),
        "fetch_default_model": manage(env, "fetch_default_model"),
        "seed_demo": manage(env, "seed_demo"),
    }
    password = json.loads((data_dir / "demo-credentials.json").read_text())[ANNOTATOR]
    base = f"http://127.0.0.1:{args.port}"
    worker_log, server_log = data_dir / "worker.log", data_dir / "server.log"
    load_before = load()

    # `make run` prints the address here, then starts the worker and the web server together.
    wall0, t0 = time.time(), time.monotonic()
    processes.append(start(worker_env, worker_log, "run_huey", "--flush-locks"))
    processes.append(start(env, server_log, "runserver", f"127.0.0.1:{args.port}"))
    worker, server = processes

    def alive() -> None:
        for name, process, log in (("worker", worker, worker_log), ("web server", server, server_log)):
            if process.poll() is not None:
                raise SystemExit(f"the {name} stopped:\n{log.read_text()[-3000:]}")

    def timed_out(what: str) -> None:
        if time.monotonic() - t0 > args.timeout:
            raise SystemExit(f"no {what} within {args.timeout:.0f} s:\n{worker_log.read_text()[-3000:]}")

    while True:
        alive()
        timed_out("answer from the web server")
        try:
            if requests.get(f"{base}/healthz", timeout=5).status_code < 500:
                break
        except requests.RequestException:
            pass
        time.sleep(0.1)
    server_up = time.monotonic() - t0

    session = requests.Session()
    login(session, base, password)
    logged_in = time.monotonic() - t0

    all_done_seen = writing_seen = looks = 0
    polls = dropped = 0
    while True:
        alive()
        timed_out("task")
        tick = time.monotonic()
        try:
            answer = session.get(f"{base}/api/v1/projects/demo/next-task/", timeout=60)
        except requests.ConnectionError:
            # runserver may close a kept-alive connection as the request reuses it: ask again on the next tick
            dropped += 1
            time.sleep(max(0.0, POLL - (time.monotonic() - tick)))
            continue
        polls += 1
        if answer.status_code == 200:
            first_task = time.monotonic() - t0
            task = answer.json()
            break
        if answer.status_code != 204:
            raise SystemExit(f"next-task answered HTTP {answer.status_code}: {answer.text[:500]}")
        if polls % 4 == 1:
            try:
                page = session.get(f"{base}/projects/demo/annotate/", timeout=60).text
            except requests.ConnectionError:
                dropped += 1
                page = ""
            looks += 1
            all_done_seen += "All done" in page
            writing_seen += "Completions are being written" in page
        time.sleep(max(0.0, POLL - (time.monotonic() - tick)))
    load_at_task = load()

    db = sqlite3.connect(f"file:{data_dir / 'rankwise.sqlite3'}?mode=ro", uri=True)
    # The worker's round; the shipped first round seed_demo imports is a finished round of imported completions.
    worker_round = db.execute(
        "SELECT id, started_at, prompts_written, prompts_total FROM feedback_round "
        "WHERE strategy != 'imported' ORDER BY id LIMIT 1"
    ).fetchone()
    round_id, started_at, prompts_written, prompts_total = worker_round or (None, None, 0, 0)
    # Read at once after the first task: what the worker has committed by then.
    first_commit, rows, tokens, cut = db.execute(
        "SELECT MIN(created_at), COUNT(*), SUM(json_extract(generation_params, '$.new_tokens')), "
        "SUM(json_extract(generation_params, '$.truncated')) FROM feedback_completion WHERE round_id = ?",
        (round_id,),
    ).fetchone()
    ids = [completion["id"] for completion in task["completions"]]
    shipped_in_task, shipped_prompts = db.execute(
        "SELECT (SELECT COUNT(*) FROM feedback_completion c JOIN feedback_round r ON c.round_id = r.id "
        f"WHERE r.strategy = 'imported' AND c.id IN ({', '.join('?' * len(ids))})), "
        "(SELECT COALESCE(SUM(prompts_written), 0) FROM feedback_round WHERE strategy = 'imported')",
        ids,
    ).fetchone()
    db.close()
    round_started = db_time(started_at)
    first_commit_at = db_time(first_commit)
    return {
        "setup": setup,
        "server_up": server_up,
        "logged_in": logged_in,
        "round_started": None if round_started is None else round_started - wall0,
        "first_commit": None if first_commit_at is None else first_commit_at - wall0,
        "first_task": first_task,
        "completions_in_task": len(task["completions"]),
        "first_task_shipped": shipped_in_task == len(ids),
        "shipped_prompts": shipped_prompts,
        "committed": (rows, tokens or 0, cut or 0),
        "prompts_written": prompts_written,
        "prompts_total": prompts_total,
        "polls": polls,
        "all_done_seen": all_done_seen,
        "dropped": dropped,
        "looks": looks,
        "writing_seen": writing_seen,
        "server_log": server_log.read_text(),
        "load_before": load_before,
        "load_at_task": load_at_task,
    }


def report(args: argparse.Namespace, figures: dict, flags: set[str], host: str, load_end: str) -> str:
    import torch
    import transformers

    bf16 = bool({"avx512_bf16", "amx_bf16"} & flags)
    dtype = "bf16 (the CPU has AVX512_BF16 or AMX)" if bf16 else "fp32 (no AVX512_BF16 or AMX: only AVX2 or less)"
    threads = "torch's default threads"
    if args.threads:
        threads = f"{args.threads} torch thread{'s' if args.threads > 1 else ''}"
    first, up = figures["first_task"], figures["server_up"]
    setup = figures["setup"]

    def at(key: str) -> str:
        value = figures[key]
        return "not seen" if value is None else f"{value:.1f} s"

    cores = len(os.sched_getaffinity(0))
    busiest = max(float(x) for x in f"{figures['load_before']}, {figures['load_at_task']}, {load_end}".split(", "))
    lines = [
        f"### {threads[0].upper() + threads[1:]}",
        "",
        f"`python benchmarks/first_task.py{f' --threads {args.threads}' if args.threads else ''}` on "
        f"{time.strftime('%Y-%m-%d')}: {host}, "
        f"Python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}; "
        f"the worker generated in {dtype} with {threads}. Load average (1, 5, 15 min): "
        f"{figures['load_before']} before the worker started, {figures['load_at_task']} at the first task, "
        f"{load_end} at the end.",
        "",
        "| from the address (the worker's and the web server's start) to | seconds |",
        "|---|---:|",
        f"| the web server answering | {up:.1f} s |",
        f"| the annotator logged in | {figures['logged_in']:.1f} s |",
        "| the worker starting the round (Django and the consumer's start-up; torch is imported after) | "
        f"{at('round_started')} |",
        f"| the first batch committed (model loaded, first prompts written) | {at('first_commit')} |",
        f"| **the first task served** | **{first:.1f} s** |",
        "",
        f"**{first:.1f} s from the address, {first - up:.1f} s from the web server answering**, to the first task "
        f"({figures['completions_in_task']} completions, "
        + ("one of the shipped first round's" if figures["first_task_shipped"] else "written by the worker")
        + f" ({figures['shipped_prompts']} prompts shipped); the worker's round had {figures['prompts_written']} of "
        f"{figures['prompts_total']} prompts written by then; {figures['polls']} next-task calls, "
        f"{figures['dropped']} connections the server closed and asked again). ",
    ]
    if figures["round_started"] is not None and figures["first_commit"] is not None:
        lines[-1] += (
            f"The round's first batch took {figures['first_commit'] - figures['round_started']:.1f} s from the "
            "round's start to its commit, loading the model included; "
            f"{figures['committed'][0]} completions were committed by the first task, "
            f"{figures['committed'][1]:,} new tokens in all, {figures['committed'][2]} cut at the length limit "
            "(sampled without a seed, so their lengths and the batch's time vary from run to run). "
        )
    lines[-1] += (
        f"While nothing was ready the annotate page, looked at {figures['looks']} times (every 2 s), said "
        f'"Completions are being written" {figures["writing_seen"]} times and "All done" '
        f"{figures['all_done_seen']} times. "
        f"Before the address: migrate {setup['migrate']:.1f} s, fetch_default_model {setup['fetch_default_model']:.1f} "
        f"s (already present), seed_demo {setup['seed_demo']:.1f} s."
    )
    if busiest > cores * 0.5:
        lines += [
            "",
            f"The machine was not idle (load average up to {busiest:.1f} on {cores} cores: other work shared it), "
            "so an idle machine's times are shorter.",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=0, help="torch threads in the worker (0: torch's default)")
    parser.add_argument("--port", type=int, default=0, help="the web server's port (0: a free one)")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--timeout", type=float, default=900, help="seconds to wait for the first task")
    parser.add_argument("--no-write", action="store_true", help="print the figures, leave RESULTS.md alone")
    args = parser.parse_args()
    if not (args.model / "config.json").is_file():
        parser.error(f"no model at {args.model} (run `python manage.py fetch_default_model`)")
    args.model = args.model.resolve()
    args.port = args.port or free_port()
    host, flags = machine()

    # SIGTERM (e.g. a CI timeout) unwinds through the finally below like Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    processes: list[subprocess.Popen] = []
    scratch = tempfile.TemporaryDirectory(prefix="rankwise-first-task-")
    try:
        figures = run(args, Path(scratch.name), processes)
    finally:
        for process in reversed(processes):
            stop(process)
        scratch.cleanup()
    if figures["dropped"]:
        print("The web server's log:\n" + figures["server_log"][-3000:])
    text = report(args, figures, flags, host, load())
    print(text)
    if not args.no_write:
        if SECTION not in (RESULTS.read_text() if RESULTS.exists() else ""):
            write_results(f"{SECTION}\n\n{INTRO}\n", SECTION)
        write_results(text, text.splitlines()[0], parent=SECTION)


if __name__ == "__main__":
    main()
