"""Training runs: start (snapshot the judgements, queue), execute in the worker, cancel, reap, schedule.

The snapshot uses the export selector, so a run trains on exactly the rows an export of
the same options would give; PPO and online GRPO snapshot the project's training prompts,
judged or not, split into train and held-out parts as the export splits them. It is written
to the run's folder before the task is queued, and its counts and content hash are kept on
the run row.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.contrib.auth.models import User
from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone

from feedback import queue
from feedback.models import ModelVersion, PairwiseJudgement, Project, RankingJudgement, Round, TrainingRun
from feedback.selectors.models import model_for_generation, model_version_weights_dir, reward_model_newest
from feedback.selectors.preferences import (
    ExportFormat,
    ExportOptionsError,
    PreferenceExportOptions,
    preference_rows,
    preference_weights,
    training_prompt_rows,
)
from feedback.services.model_versions import model_version_promote
from feedback.services.promotion_gate import promotion_gate_open
from feedback.services.rounds import BASE
from feedback.services.side_by_side import side_by_side_request
from training.config import (
    DPOConfig,
    GRPOConfig,
    OnlineGRPOConfig,
    PPOConfig,
    RewardConfig,
    TrainConfig,
    config_arguments,
    config_from_mapping,
)
from training.lineage import base_model_of

if TYPE_CHECKING:
    from training.runs import TrainResult

HEARTBEAT_SECONDS = 20
PROGRESS_EVERY_SECONDS = 2.0
# Each model version is a standalone model directory, so the next run can start from it.
WEB_DEFAULTS: dict[str, Any] = {"merge_lora": True}
# The export options that limit a run's snapshot (by round, or by who wrote the completions).
SNAPSHOT_LIMITS = ("rounds", "since_round", "writers")
# Config fields this installation caps, and the setting that says how far.
LIMITS = {
    "epochs": "RANKWISE_MAX_TRAINING_EPOCHS",
    "batch_size": "RANKWISE_MAX_TRAINING_BATCH_SIZE",
    "eval_batch_size": "RANKWISE_MAX_TRAINING_BATCH_SIZE",
}


class TrainingRunError(Exception):
    """A run that cannot be started, cancelled or finished; the message says why."""


@dataclass(frozen=True)
class Algorithm:
    """How the app trains with one algorithm: its config, the export its data comes as, and its loop."""

    config_class: type[TrainConfig]
    formats: dict[str, ExportFormat]  # the export its data comes as, by the project modes it trains on
    train: str  # "module:function"; imported only when a run executes, so the web process never loads torch
    data: str  # what it trains on, for the message when there is none
    makes: str = ModelVersion.Kind.POLICY  # the kind of model version a finished run records
    # Its config names a reward version of the project (the newest by default), and it rolls out on the
    # project's training prompts, judged or not, rather than training on judgements.
    uses_reward_model: bool = False

    def train_function(self) -> Callable[..., TrainResult]:
        module, name = self.train.split(":")
        return getattr(importlib.import_module(module), name)  # type: ignore[no-any-return]


ALGORITHMS: dict[str, Algorithm] = {
    TrainingRun.Algorithm.DPO: Algorithm(
        DPOConfig, {Project.Mode.PAIRWISE: "dpo", Project.Mode.RANKING: "dpo"}, "training.dpo:train_dpo", "pairs"
    ),
    TrainingRun.Algorithm.GRPO: Algorithm(
        GRPOConfig, {Project.Mode.RANKING: "grpo"}, "training.grpo:train_grpo", "ranked groups with different rewards"
    ),
    # Pairs train it with Bradley-Terry; rankings with Plackett-Luce over each whole ranking.
    TrainingRun.Algorithm.REWARD: Algorithm(
        RewardConfig,
        {Project.Mode.PAIRWISE: "dpo", Project.Mode.RANKING: "grpo"},
        "training.reward:train_reward",
        "pairs or ranked groups",
        makes=ModelVersion.Kind.REWARD,
    ),
    # Their snapshot is the project's training prompts, judged or not; the policy writes and the reward model scores.
    TrainingRun.Algorithm.GRPO_ONLINE: Algorithm(
        OnlineGRPOConfig,
        {Project.Mode.PAIRWISE: "dpo", Project.Mode.RANKING: "grpo"},
        "training.grpo_online:train_grpo_online",
        "training prompts",
        uses_reward_model=True,
    ),
    TrainingRun.Algorithm.PPO: Algorithm(
        PPOConfig,
        {Project.Mode.PAIRWISE: "dpo", Project.Mode.RANKING: "grpo"},
        "training.ppo:train_ppo",
        "training prompts",
        uses_reward_model=True,
    ),
}


def training_algorithm(*, choice: str) -> str:
    """The algorithm a project's or a request's choice trains with ("dpo_rankings": DPO on pairs from rankings)."""
    name = TrainingRun.Algorithm.DPO if choice == Project.Algorithm.DPO_FROM_RANKINGS else choice
    if name not in ALGORITHMS:
        raise TrainingRunError(f"algorithm must be one of {', '.join(ALGORITHMS)}, not '{choice}'")
    return name


def training_config_build(*, algorithm: str, values: dict[str, Any]) -> dict[str, Any]:
    """A complete, validated config for the algorithm from the given values and the defaults.

    The one check of a config from the app (form, API, command, schedule): types and values as the
    training library sees them, then this installation's limits.
    """
    name = training_algorithm(choice=algorithm)
    try:
        config = config_from_mapping(ALGORITHMS[name].config_class, {**WEB_DEFAULTS, **values})
    except ValueError as error:
        raise TrainingRunError(f"{name} settings: {error}") from None
    for field, setting in LIMITS.items():
        limit = getattr(settings, setting)
        if getattr(config, field) > limit:
            raise TrainingRunError(f"{name} settings: {field} must be at most {limit} ({setting})")
    return asdict(config)


def _algorithm_for(project: Project, algorithm: str | None) -> tuple[str, Algorithm]:
    """The algorithm a run of the project trains with, checked against the project's data."""
    name = training_algorithm(choice=algorithm or project.training_algorithm)
    entry = ALGORITHMS[name]
    if project.mode not in entry.formats:
        raise TrainingRunError(
            f"{name.upper()} trains on {entry.data}; this project collects {project.mode} judgements"
        )
    return name, entry


def _reward_version(project: Project, name: str, algorithm: str) -> ModelVersion:
    """The reward model a run uses: the named reward version of the project, else its newest."""
    if name:
        version = project.model_versions.filter(kind=ModelVersion.Kind.REWARD, name=name).first()
    else:
        version = reward_model_newest(project=project)
    if version is not None:
        return version
    if name:
        raise TrainingRunError(f"{algorithm} settings: reward_model: {project.slug} has no reward model named '{name}'")
    raise TrainingRunError(
        f"{algorithm} needs a reward model and {project.slug} has none: train one first (algorithm reward)"
    )


def _check_reward_base(reward: ModelVersion, policy: str, algorithm: str) -> None:
    """Refuse a reward model trained on another base model than the policy's: it scores another model's text."""
    reward_base = base_model_of(str(model_version_weights_dir(version=reward)))
    policy_base = base_model_of(policy)
    if reward_base != policy_base:
        raise TrainingRunError(
            f"{algorithm} settings: reward_model: {reward.name} was trained on base model {reward_base}, "
            f"but the policy is of base model {policy_base}: train a reward model from {policy_base}"
        )


def run_dir(run: TrainingRun) -> Path:
    return Path(settings.DATA_DIR) / "runs" / str(run.pk)


def _snapshot_options(
    project: Project, export_format: ExportFormat, test_fraction: float, limits: Mapping[str, Any], weighting: str
) -> PreferenceExportOptions:
    """The export options a run's snapshot is read with: every round, or those ``limits`` keep.

    ``limits`` are export options by their public names (``rounds``, ``since_round``, ``writers``),
    read and checked by the export's own parsing; a writer must be a version of the project or base.
    """
    unknown = sorted(set(limits) - set(SNAPSHOT_LIMITS))
    if unknown:
        raise TrainingRunError(f"{unknown[0]} does not limit a snapshot; use {', '.join(SNAPSHOT_LIMITS)}")
    try:
        options = PreferenceExportOptions.from_mapping(
            {
                **limits,
                "format": export_format,
                "test_fraction": test_fraction,
                "weighting": weighting if export_format == "dpo" else None,
            }
        )
    except ExportOptionsError as error:
        raise TrainingRunError(f"{error.field}: {error.message}") from None
    named = [name for name in options.writers or () if name != BASE]
    known = set(project.model_versions.filter(name__in=named).values_list("name", flat=True))
    missing = [name for name in named if name not in known]
    if missing:
        raise TrainingRunError(f"writers: {project.slug} has no version {', '.join(map(repr, missing))}")
    return options


def _snapshot(project: Project, base: PreferenceExportOptions, *, prompts: bool) -> tuple[list[dict], list[dict]]:
    """The training and held-out rows: the export's, or with ``prompts`` every training prompt (same split)."""
    if prompts:
        return (
            list(training_prompt_rows(project=project, options=replace(base, split="train"))),
            list(training_prompt_rows(project=project, options=replace(base, split="test"))),
        )
    weights = preference_weights(project=project, options=base)  # one estimate for both parts
    train = list(preference_rows(project=project, options=replace(base, split="train"), reliability=weights))
    held_out = list(preference_rows(project=project, options=replace(base, split="test"), reliability=weights))
    return train, held_out


def _content_hash(rows: list[dict]) -> str:
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps(row, sort_keys=True).encode())
    return digest.hexdigest()


def training_run_start(
    *,
    project: Project,
    algorithm: str | None = None,
    config: dict[str, Any] | None = None,
    triggered_by: User | None = None,
    trigger: str = TrainingRun.Trigger.MANUAL,
    test_fraction: float = 0.1,
    limits: Mapping[str, Any] | None = None,
    weighting: str | None = None,
    enqueue: bool = True,
) -> TrainingRun:
    """Snapshot the project's judgements and queue a run; at most one is queued or running per project.

    The snapshot takes every round unless ``limits`` (``rounds``, ``since_round``, ``writers``, as
    exports take them) keep fewer; they are recorded in the run's ``data_counts``. A DPO snapshot's
    pairs are labelled with ``weighting`` (``reliability`` or ``raw``, as exports; the project's
    setting when None), which ``data_counts`` records too. ``enqueue=False``
    leaves the run for the caller to execute itself (``train --sync``), so no worker can take it too.
    """
    algorithm, entry = _algorithm_for(project, algorithm)
    full_config = training_config_build(algorithm=algorithm, values={**project.training_config, **(config or {})})
    try:
        model, parent = model_for_generation(project=project)
        if entry.uses_reward_model:
            reward = _reward_version(project, full_config["reward_model"], algorithm)
            _check_reward_base(reward, model, algorithm)
            full_config["reward_model"] = reward.name
    except ValueError as error:  # a version's weights path outside the versions folder: never read
        raise TrainingRunError(str(error)) from None
    if TrainingRun.objects.filter(project=project, status__in=["queued", "running"]).exists():
        raise TrainingRunError(f"a training run of {project.slug} is already queued or running")
    export_format = entry.formats[project.mode]
    options = _snapshot_options(project, export_format, test_fraction, limits or {}, weighting or project.weighting)
    limited = {name: value for name, value in options.as_mapping().items() if name in SNAPSHOT_LIMITS}
    if entry.uses_reward_model and limited:
        raise TrainingRunError(
            f"{next(iter(limited))} does not limit a {algorithm} run: it rolls out every training prompt"
        )
    train, held_out = _snapshot(project, options, prompts=entry.uses_reward_model)
    if not train:
        hint = "import prompts first" if entry.uses_reward_model else "collect more judgements first"
        raise TrainingRunError(f"no {entry.data} to train on yet: {hint}")
    counts: dict[str, Any] = {
        "train": len(train),
        "held_out": len(held_out),
        "format": "prompts" if entry.uses_reward_model else export_format,
    }
    if limited:
        counts["limits"] = limited
    if export_format == "dpo" and not entry.uses_reward_model:
        counts["weighting"] = options.weighting
    try:
        with transaction.atomic():
            run = TrainingRun.objects.create(
                project=project,
                algorithm=algorithm,
                config=full_config,
                data_counts=counts,
                data_hash=_content_hash(train + held_out),
                parent_version=parent,
                triggered_by=triggered_by if triggered_by and triggered_by.is_authenticated else None,
                trigger=trigger,
            )
            folder = run_dir(run)
            folder.mkdir(parents=True, exist_ok=True)
            for name, rows in (("train.jsonl", train), ("held_out.jsonl", held_out)):
                with (folder / name).open("w") as out:
                    out.writelines(json.dumps(row) + "\n" for row in rows)
            if enqueue:
                queue.enqueue("training_run_task", run.pk)
    except IntegrityError:
        raise TrainingRunError(f"a training run of {project.slug} is already queued or running") from None
    return run


def training_run_cancel(*, run: TrainingRun) -> TrainingRun:
    """A queued run is cancelled at once; a running one stops before its next step."""
    with transaction.atomic():
        run = TrainingRun.objects.select_for_update().get(pk=run.pk)
        if run.status == TrainingRun.Status.QUEUED:
            run.status = TrainingRun.Status.CANCELLED
            run.finished_at = timezone.now()
        elif run.status == TrainingRun.Status.RUNNING:
            run.cancel_requested = True
        else:
            raise TrainingRunError(f"run {run.pk} has already ended ({run.status})")
        run.save(update_fields=["status", "finished_at", "cancel_requested"])
    return run


def _finite(value: Any) -> Any:
    """JSON without NaN or infinities (PostgreSQL's jsonb refuses them)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


class _Heartbeat:
    """Touches the run's heartbeat from a thread, so long steps (the reference pass) look alive."""

    def __init__(self, run_id: int) -> None:
        self.run_id = run_id
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        from django.db import connection

        try:
            while not self.stopped.wait(HEARTBEAT_SECONDS):
                TrainingRun.objects.filter(pk=self.run_id, status="running").update(heartbeat_at=timezone.now())
        finally:
            connection.close()

    def __enter__(self) -> _Heartbeat:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self.thread.join()


ProgressCallback = Callable[[int, int, dict], None]


def _progress_writer(run: TrainingRun, also: ProgressCallback | None) -> ProgressCallback:
    """Record progress on the run row, at most every few seconds (and always the last step)."""
    last_write = 0.0

    def write(step: int, total: int, metrics: dict) -> None:
        nonlocal last_write
        if also is not None:
            also(step, total, metrics)
        run.metrics.append(_finite({"step": step, **metrics}))
        now = time.monotonic()
        if now - last_write < PROGRESS_EVERY_SECONDS and step < total:
            return
        last_write = now
        TrainingRun.objects.filter(pk=run.pk).update(
            step=step, total_steps=total, metrics=run.metrics, heartbeat_at=timezone.now()
        )

    return write


def _cancel_checker(run: TrainingRun) -> Callable[[], bool]:
    return lambda: TrainingRun.objects.filter(pk=run.pk, cancel_requested=True).exists()


def _read_rows(path: Path) -> list[dict]:
    with path.open() as lines:
        return [json.loads(line) for line in lines]


def _version_name(project: Project, kind: str) -> str:
    """v1, v2, ... for policies; reward-1, reward-2, ... for reward models."""
    prefix = "v" if kind == ModelVersion.Kind.POLICY else "reward-"
    number = project.model_versions.filter(kind=kind).count() + 1
    while project.model_versions.filter(name=f"{prefix}{number}").exists():
        number += 1
    return f"{prefix}{number}"


def training_run_execute(*, run_id: int, on_progress: ProgressCallback | None = None) -> TrainingRun:
    """Run a queued run here and now: train, then record the model version it made.

    A failed or cancelled run never touches the active version.
    """
    with transaction.atomic():
        claimed = TrainingRun.objects.filter(pk=run_id, status=TrainingRun.Status.QUEUED).update(
            status=TrainingRun.Status.RUNNING, started_at=timezone.now(), heartbeat_at=timezone.now()
        )
    run = TrainingRun.objects.select_related("project", "parent_version").get(pk=run_id)
    if not claimed:
        return run  # cancelled while queued, or already taken by another worker
    project = run.project
    out_dir = Path(settings.MODEL_VERSIONS_DIR) / project.slug / f"run-{run.pk}"
    try:
        result = _train(run, out_dir, on_progress)
    except Exception as error:  # the run records any failure; the worker goes on
        TrainingRun.objects.filter(pk=run.pk).update(
            status=TrainingRun.Status.FAILED, error=f"{type(error).__name__}: {error}", finished_at=timezone.now()
        )
        run.refresh_from_db()
        return run
    if result.cancelled:
        TrainingRun.objects.filter(pk=run.pk).update(status=TrainingRun.Status.CANCELLED, finished_at=timezone.now())
        run.refresh_from_db()
        return run
    metrics = _finite(result.metrics)
    kind = ALGORITHMS[run.algorithm].makes
    with transaction.atomic():
        version = ModelVersion.objects.create(
            project=project,
            kind=kind,
            name=_version_name(project, kind),
            parent=run.parent_version,
            weights_path=str(out_dir.relative_to(Path(settings.MODEL_VERSIONS_DIR))),
            produced_by_run=run,
            metrics=metrics,
        )
        side_by_side_request(version=version)  # the parent's and the new version's answers, for the training page
        TrainingRun.objects.filter(pk=run.pk).update(
            status=TrainingRun.Status.SUCCEEDED, finished_at=timezone.now(), step=metrics.get("steps", run.step)
        )
    run.refresh_from_db()
    if kind == ModelVersion.Kind.REWARD:
        queue.enqueue("completion_scores_task", version.pk)  # staff see its scores beside the completions
    online = ALGORITHMS[run.algorithm].uses_reward_model
    if kind == ModelVersion.Kind.POLICY and project.promote_when_preferred:
        promotion_gate_open(version=version)  # people decide, in blind battles against the active version
    elif project.auto_promote and kind == ModelVersion.Kind.POLICY and _improved(metrics, online=online):
        model_version_promote(version=version)
    return run


def _improved(metrics: dict[str, Any], *, online: bool = False) -> bool:
    """Whether the trained version beats its parent on the held-out figure its algorithm reports.

    DPO and GRPO: it prefers the chosen answers of the held-out pairs more often (``logp_accuracy``).
    Online runs: the reward model's mean score of fresh samples on held-out prompts (``reward``) rose
    by more than twice the standard error of the difference, so that sampling luck promotes nothing.
    """
    before, after = metrics.get("eval_before") or {}, metrics.get("eval_after") or {}
    names = ("reward", "reward_stderr") if online else ("logp_accuracy",)
    if any(figures.get(name) is None for figures in (before, after) for name in names):
        return False  # no held-out data, or one sample a prompt (no standard error): nothing to judge by
    if not online:
        return bool(after["logp_accuracy"] > before["logp_accuracy"])
    gain = after["reward"] - before["reward"]
    return bool(gain > 2 * math.hypot(before["reward_stderr"], after["reward_stderr"]))


def _train(run: TrainingRun, out_dir: Path, on_progress: ProgressCallback | None) -> Any:
    folder = run_dir(run)
    train, held_out = _read_rows(folder / "train.jsonl"), _read_rows(folder / "held_out.jsonl")
    model, _ = model_for_generation(project=run.project)
    algorithm = ALGORITHMS[run.algorithm]
    values = dict(run.config)
    if algorithm.uses_reward_model:  # the version's name becomes its checked weights directory here
        version = _reward_version(run.project, values["reward_model"], run.algorithm)
        values["reward_model"] = str(model_version_weights_dir(version=version))
    config = algorithm.config_class(**values)
    with _Heartbeat(run.pk):
        if settings.TRAIN_PROCESSES > 1 and config.data_parallel:
            return _train_in_processes(run, config, model, out_dir, _progress_writer(run, on_progress))
        return algorithm.train_function()(
            config,
            train_examples=train,
            eval_examples=held_out,
            model=model,
            out_dir=out_dir,
            cache_dir=Path(settings.REFERENCE_CACHE_DIR),
            progress=_progress_writer(run, on_progress),
            should_stop=_cancel_checker(run),
        )


def _train_in_processes(
    run: TrainingRun, config: TrainConfig, model: str, out_dir: Path, progress: ProgressCallback
) -> TrainResult:
    """Train under torchrun with RANKWISE_TRAIN_PROCESSES processes, on the run's snapshot files.

    The command line's rank 0 appends each step's figures to ``progress.jsonl`` in the run's
    folder, which this follows; a cancel request becomes the ``stop`` file there, which the
    processes check before each step. Their output goes to ``train.log`` beside them.
    """
    from training.runs import TrainResult

    folder = run_dir(run)
    progress_log, stop_file = folder / "progress.jsonl", folder / "stop"
    progress_log.unlink(missing_ok=True)
    stop_file.unlink(missing_ok=True)
    command = [*ending_with_this_process(), "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]
    command += [str(settings.TRAIN_PROCESSES), "-m", "training", run.algorithm, "--quiet"]
    held_out = folder / "held_out.jsonl"  # may be empty, which the command line refuses as a file of examples
    command += ["--data", str(folder / "train.jsonl")]
    command += ["--eval-data", str(held_out)] if held_out.stat().st_size else ["--eval-fraction", "0"]
    command += ["--model", model, "--out", str(out_dir), "--cache-dir", str(settings.REFERENCE_CACHE_DIR)]
    command += ["--progress-log", str(progress_log), "--stop-file", str(stop_file), *config_arguments(config)]
    cancel_requested = _cancel_checker(run)
    followed = 0
    with (folder / "train.log").open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            while process.poll() is None:
                time.sleep(1)
                followed = _follow(progress_log, followed, progress)
                if not stop_file.exists() and cancel_requested():
                    stop_file.touch()
        finally:
            if process.poll() is None:  # this worker is being stopped: so are they
                process.terminate()
                process.wait()
    _follow(progress_log, followed, progress)
    if process.returncode != 0:
        output = (folder / "train.log").read_text().splitlines()
        errors = list(dict.fromkeys(line for line in output if line.startswith("error: "))) or output[-5:]
        raise TrainingRunError(f"training processes exited with {process.returncode}: {' | '.join(errors)}")
    metrics_file = out_dir / "metrics.json"
    if stop_file.exists() and not metrics_file.is_file():
        return TrainResult(out_dir=out_dir, cancelled=True)
    return TrainResult(out_dir=out_dir, metrics=json.loads(metrics_file.read_text()))


def ending_with_this_process() -> list[str]:
    """The start of a Python command line whose process gets SIGTERM when this one ends, even killed (Linux).

    A worker killed with SIGKILL cannot stop the training processes it launched, and they would go on
    writing a run the reaper has failed. The kernel sends the launcher SIGTERM instead (the parent-death
    signal, kept across exec), and torchrun passes it on to its processes.
    """
    if sys.platform != "linux":
        return [sys.executable]
    arm = (  # PR_SET_PDEATHSIG is 1; then the command proper replaces this process
        "import ctypes, os, signal, sys; ctypes.CDLL(None).prctl(1, signal.SIGTERM); "
        "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
    )
    return [sys.executable, "-c", arm]


def _follow(progress_log: Path, position: int, progress: ProgressCallback) -> int:
    """Pass on the whole lines of ``progress_log`` after byte ``position``; return where they end."""
    if not progress_log.is_file():
        return position
    with progress_log.open("rb") as lines:
        lines.seek(position)
        for line in lines:
            if not line.endswith(b"\n"):
                break  # still being written
            entry = json.loads(line)
            progress(entry["step"], entry["total"], entry["metrics"])
            position += len(line)
    return position


def training_runs_reap() -> list[int]:
    """Fail runs whose worker stopped: running without a heartbeat for a while. Returns their ids.

    huey does not re-run a task whose consumer died, so without this such a run would
    stay `running` for ever and block the project's next run.
    """
    now = timezone.now()
    stale_after = timedelta(seconds=settings.TRAINING_RUN_STALE_SECONDS)
    stale = TrainingRun.objects.filter(status=TrainingRun.Status.RUNNING).filter(
        Q(heartbeat_at__lt=now - stale_after) | Q(heartbeat_at__isnull=True)
    )
    reaped = list(stale.values_list("pk", flat=True))
    stale.filter(pk__in=reaped).update(
        status=TrainingRun.Status.FAILED,
        finished_at=now,
        error="The worker stopped during this run (no heartbeat); start a new run to train again.",
    )
    return reaped


def judgements_since(*, project: Project, since: Any) -> int:
    """Judgements made since ``since`` that a run can learn from: battles are not counted."""
    filters = {"project": project, "round__kind": Round.Kind.TRAINING} | ({"created_at__gt": since} if since else {})
    return PairwiseJudgement.objects.filter(**filters).count() + RankingJudgement.objects.filter(**filters).count()


def training_schedule_tick() -> list[TrainingRun]:
    """Start a run for every auto-training project with enough new judgements and nothing running."""
    started = []
    for project in Project.objects.filter(auto_train=True):
        last = project.training_runs.filter(status=TrainingRun.Status.SUCCEEDED).order_by("-created_at").first()
        if judgements_since(project=project, since=last.created_at if last else None) < project.auto_train_threshold:
            continue
        try:
            started.append(training_run_start(project=project, trigger=TrainingRun.Trigger.SCHEDULE))
        except TrainingRunError:
            continue  # already running, or nothing to train on: the next tick tries again
    return started
