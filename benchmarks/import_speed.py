"""Time `import_prompts` on a generated file of 100,000 prompts with 4 completions each.

Usage: python benchmarks/import_speed.py [--lines N]
Runs against a fresh SQLite database in a temporary data dir with production settings
(DEBUG off; WAL, immediate transactions) and prints the command's wall time, lines/s, and the
CPU time of the command with its rendering workers, which other work on the machine disturbs less.
"""

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORDS = ["model", "answer", "python", "list", "reverse", "query", "index", "token"]
WORDS += ["batch", "rank", "pair", "judge", "prompt", "learn", "data"]


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def completion(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.2:
        name, n = rng.choice(WORDS), rng.randint(1, 999)
        return f"{sentence(rng, 8)}\n\n```python\n{name} = [{n}, {n + 1}, {n + 2}]\nprint({name}[::-1])\n```\n"
    if kind < 0.4:
        return f"- **{sentence(rng, 3)}**\n- {sentence(rng, 6)}\n- `{rng.choice(WORDS)}`\n"
    return " ".join(sentence(rng, rng.randint(6, 14)) for _ in range(rng.randint(2, 5)))


def write_file(path: Path, lines: int) -> None:
    rng = random.Random(0)
    with path.open("w") as out:
        for i in range(lines):
            record = {
                "prompt": sentence(rng, rng.randint(6, 20))[:-1] + "?",
                "completions": [completion(rng) for _ in range(4)],
                "id": f"q-{i}",
                "metadata": {"topic": rng.choice(["code", "facts", "advice"])},
            }
            out.write(json.dumps(record) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lines", type=int, default=100_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        data = Path(scratch)
        file = data / "prompts.jsonl"
        write_file(file, args.lines)
        env = {**os.environ, "RANKWISE_DATA_DIR": str(data), "DEBUG": "0", "ALLOWED_HOSTS": "localhost"}
        subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], cwd=ROOT, env=env, check=True)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        command = [sys.executable, "manage.py", "import_prompts", "bench", str(file)]
        subprocess.run(command, cwd=ROOT, env=env, check=True)
        seconds = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    print(
        f"{args.lines} lines ({args.lines * 4} completions): {seconds:.1f} s wall, "
        f"{args.lines / seconds:,.0f} lines/s; "
        f"CPU {cpu:.1f} s (command and its workers); load average {os.getloadavg()[0]:.1f}"
    )


if __name__ == "__main__":
    main()
