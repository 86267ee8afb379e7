"""Data-parallel training: two processes under torchrun (gloo, on the CPU) train as one process with the same batch."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from tests.training.synthetic import preference_pairs, ranked_groups
from training.__main__ import main
from training.data import tokenize_groups
from training.grpo import loss_share
from training.logprobs import completion_mask
from training.loss_types import GRPO_LOSS_TYPES
from training.losses import grpo_loss
from training.parallel import Ranks

REPO = Path(__file__).resolve().parents[2]
# fp32, so the only differences are the order of additions: a micro-batch split in two runs as two smaller
# matmuls. Measured: losses within 9e-8 of each other, the trained weights within 2e-7.
LOSS_TOLERANCE = 1e-5
WEIGHT_TOLERANCE = 1e-5

# Loaded by every process of the runs below (through PYTHONPATH): each file a process creates, opens for
# writing or renames under WATCHED_DIR is logged, with the process's RANK, to its own file in WRITES_DIR.
WRITE_WATCH = """
import os, sys
_root, _dir = os.environ.get("WATCHED_DIR"), os.environ.get("WRITES_DIR")
if _root and _dir and "RANK" in os.environ:
    _log = open(os.path.join(_dir, f"rank-{os.environ['RANK']}-{os.getpid()}.log"), "a", buffering=1)
    _writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT

    def _watch(event, args):
        if event in ("os.rename", "os.replace"):
            path = args[1]
        elif event == "open" and isinstance(args[2], int) and args[2] & _writes:
            path = args[0]
        else:
            return
        if isinstance(path, (str, os.PathLike)) and os.fspath(path).startswith(_root):
            _log.write(f"{event} {os.fspath(path)}\\n")

    sys.addaudithook(_watch)
"""

ALGORITHMS = {
    # an odd batch, so the two processes' shares differ in size; two micro-batches per step
    "dpo": (preference_pairs(12), ["--batch-size", "5", "--grad-accum", "2", "--lr", "1e-3"]),
    # μ = 2 iterations per batch, so the old log-probs of each process's share are kept across steps
    "grpo": (ranked_groups(8), ["--batch-size", "3", "--num-iterations", "2", "--lr", "1e-3"]),
}
COMMON = ["--max-length", "64", "--max-prompt-length", "48", "--precision", "fp32", "--eval-fraction", "0.2"]
COMMON += ["--epochs", "2", "--save-every", "1", "--warmup-ratio", "0", "--quiet"]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def losses(progress_log: Path) -> list[float]:
    steps = [json.loads(line) for line in progress_log.read_text().splitlines()]
    assert [s["step"] for s in steps] == list(range(1, len(steps) + 1))  # each step logged once
    return [s["metrics"]["loss"] for s in steps]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(launcher: str) -> list[str]:
    """Two processes on this machine; accelerate's multi-GPU mode is torchrun underneath and runs on the CPU too."""
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    accelerate = Path(sys.executable).with_name("accelerate")
    options = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"]
    return [str(accelerate), "launch", *options, "--dynamo_backend", "no", "--main_process_port", str(free_port())]


@pytest.mark.parametrize(("algorithm", "launcher"), [("dpo", "torchrun"), ("grpo", "torchrun"), ("dpo", "accelerate")])
def test_two_processes_train_as_one_with_the_same_batch(tmp_path, tiny_model_dir, algorithm, launcher):
    if launcher == "accelerate":
        pytest.importorskip("accelerate")
    rows, options = ALGORITHMS[algorithm]
    data = write_jsonl(tmp_path / "data.jsonl", rows)

    def run(where: str) -> list[str]:
        folder = tmp_path / where
        folder.mkdir()
        return [algorithm, "--data", str(data), "--model", str(tiny_model_dir), "--out", str(folder / "model")] + [
            "--cache-dir",
            str(folder / "cache"),
            "--progress-log",
            str(folder / "progress.jsonl"),
            *options,
            *COMMON,
        ]

    assert main(run("one")) == 0

    watch = tmp_path / "watch"
    watch.mkdir()
    (watch / "sitecustomize.py").write_text(WRITE_WATCH)
    writes = tmp_path / "writes"
    writes.mkdir()
    env = {**os.environ, "PYTHONPATH": f"{watch}{os.pathsep}{REPO}", "OMP_NUM_THREADS": "1"}
    env |= {"WATCHED_DIR": str(tmp_path / "two"), "WRITES_DIR": str(writes)}
    done = subprocess.run(
        [*launch(launcher), "-m", "training", *run("two")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("model written to") == 1  # the summary, from rank 0 only

    one, two = losses(tmp_path / "one" / "progress.jsonl"), losses(tmp_path / "two" / "progress.jsonl")
    assert len(one) == len(two) >= 4
    assert max(abs(a - b) for a, b in zip(one, two, strict=True)) <= LOSS_TOLERANCE, (one, two)
    assert len(set(one)) > 1  # it trained

    weights_file = "adapter_model.safetensors"
    assert sorted(p.name for p in (tmp_path / "two" / "model").iterdir()) == sorted(
        p.name for p in (tmp_path / "one" / "model").iterdir()
    )
    trained, expected = (load_file(tmp_path / where / "model" / weights_file) for where in ("two", "one"))
    assert trained.keys() == expected.keys()
    assert max(float((trained[k] - expected[k]).abs().max()) for k in expected) <= WEIGHT_TOLERANCE
    metrics = json.loads((tmp_path / "two" / "model" / "metrics.json").read_text())
    assert metrics["steps"] == len(two) and metrics["eval_after"]["pairs"] > 0

    # Rank 0 alone wrote: the reference cache, each checkpoint and the model directory, each put in place once.
    logged = {log.name.split("-")[1]: log.read_text().splitlines() for log in writes.iterdir()}
    assert set(logged) == {"0", "1"} and logged["1"] == []
    renamed = [line.split(" ", 1)[1] for line in logged["0"] if line.startswith(("os.rename", "os.replace"))]
    placed = [path for path in renamed if ".old-" not in path]  # not the old checkpoint moved aside to go
    folder = tmp_path / "two"
    assert placed.count(str(folder / "model")) == 1
    checkpoints = len(two) - 1 if algorithm == "dpo" else len(two) // 2 - 1  # grpo: at the end of each batch
    assert placed.count(str(folder / ".model.checkpoint")) == checkpoints >= 1
    shards = [path for path in placed if path.startswith(str(folder / "cache"))]
    assert len(shards) == 1 and len(list((folder / "cache").rglob("*.safetensors"))) == 1
    assert len(placed) == 1 + checkpoints + 1
    assert not (folder / ".model.checkpoint").exists()


@pytest.mark.parametrize("loss_type", GRPO_LOSS_TYPES)
def test_the_processes_shares_of_a_grpo_loss_add_up_to_the_whole(tiny_model_dir, loss_type):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    groups = tokenize_groups(ranked_groups(5), tokenizer, max_length=64, max_prompt_length=48).examples
    lengths = [len(c) for g in groups for c in g.completion_ids]
    rows_of, first = [], 0
    for g in groups:
        rows_of.append(list(range(first, first + len(g.completion_ids))))
        first += len(g.completion_ids)
    generator = torch.Generator().manual_seed(0)
    logps = -torch.rand(len(lengths), max(lengths), generator=generator)  # (N, T)
    ref = logps + 0.2 * torch.randn(logps.shape, generator=generator)
    advantages = torch.randn(len(lengths), generator=generator)  # (N,)

    def loss(members: list[int]) -> torch.Tensor:
        rows = [r for i in members for r in rows_of[i]]
        mask = completion_mask(torch.tensor([lengths[r] for r in rows]))  # (n, t), t the longest of these
        t = mask.shape[1]
        part = logps[rows, :t]
        return grpo_loss(part, part - 0.1, ref[rows, :t], advantages[rows], mask, loss_type=loss_type)

    everyone = list(range(len(groups)))
    shares = [Ranks(rank, 2).share(everyone) for rank in range(2)]
    assert [len(s) for s in shares] == [len(groups) // 2, len(groups) - len(groups) // 2]
    whole = [groups[i] for i in everyone]
    added = sum(float(loss(s)) * loss_share(loss_type, [groups[i] for i in s], whole) for s in shares)
    assert added == pytest.approx(float(loss(everyone)), rel=1e-6)
