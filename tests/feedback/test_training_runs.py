"""The closed loop in one process: judgements -> run -> model version -> promotion -> new completions."""

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone
from huey.contrib.djhuey import HUEY
from rest_framework.test import APIClient

from feedback.models import ModelVersion, TrainingRun
from feedback.services import training_runs
from feedback.services.assignments import assignment_lease_next
from feedback.services.judgements import JudgementSubmission, judgement_submit
from feedback.services.model_versions import model_version_promote
from feedback.services.training_runs import (
    TrainingRunError,
    ending_with_this_process,
    training_config_build,
    training_run_cancel,
    training_run_execute,
    training_run_start,
    training_runs_reap,
    training_schedule_tick,
)
from tests.factories import (
    CompletionFactory,
    MembershipFactory,
    ProjectFactory,
    PromptFactory,
    TrainingRunFactory,
    UserFactory,
)
from tests.processes import database_url_for_subprocesses

pytestmark = pytest.mark.django_db(transaction=True)
ROOT = Path(__file__).resolve().parents[2]

SMALL = {
    "epochs": 1,
    "min_steps": 0,
    "batch_size": 4,
    "max_length": 64,
    "max_prompt_length": 32,
    "eval_batch_size": 8,
    "save_every": 0,
}


@pytest.fixture
def project(tiny_model_dir):
    return ProjectFactory(
        slug="loop",
        mode="pairwise",
        completions_per_prompt=2,
        base_model=str(tiny_model_dir),
        max_new_tokens=6,
        training_config=SMALL,
        auto_train_threshold=10,
    )


def judge_everything(project, annotator, prompts=12, first=0):
    """Prompts with a good and a bad answer, and the annotator's choice of the good one, through the services."""
    MembershipFactory(user=annotator, project=project)
    for i in range(first, first + prompts):
        prompt = PromptFactory(
            project=project, messages=[{"role": "user", "content": f"Question {i}: tell me about cats"}]
        )
        CompletionFactory(prompt=prompt, text="Cats are great.")
        CompletionFactory(prompt=prompt, text="No.")
    while (task := assignment_lease_next(project=project, annotator=annotator)) is not None:
        good = task.completions[0].text == "Cats are great."
        submission = JudgementSubmission(
            task_id=task.task_id, client_uuid=uuid.uuid4(), kind="pairwise", choice="a" if good else "b"
        )
        judgement_submit(project=project, annotator=annotator, submission=submission)


def test_judgements_become_a_model_version_that_writes_the_next_completions(project):
    judge_everything(project, UserFactory())
    staff = UserFactory(is_staff=True)

    run = training_run_start(project=project, triggered_by=staff)  # huey immediate: runs at once
    run.refresh_from_db()

    assert run.status == "succeeded", run.error
    assert run.triggered_by == staff and run.trigger == "manual"
    assert run.data_counts["train"] + run.data_counts["held_out"] == 12
    assert len(run.data_hash) == 64
    assert run.step == run.total_steps > 0 and run.metrics and "loss" in run.metrics[-1]
    version = run.produced_version
    assert version.name == "v1" and version.parent is None and not version.is_active
    assert "eval_after" in version.metrics and "eval_before" in version.metrics
    weights = training_runs.settings.MODEL_VERSIONS_DIR / version.weights_path
    assert (weights / "config.json").is_file() and any(weights.glob("*.safetensors"))

    new_prompt = PromptFactory(project=project)
    model_version_promote(version=version)  # generation follows in the worker (immediate here)
    assert ModelVersion.objects.get(is_active=True) == version
    # the next round mixes the new version with the model it was trained from
    written = [(c.model_version, c.source_model) for c in new_prompt.completions.all()]
    assert sorted(written, key=str) == sorted([(version, ""), (None, project.base_model)], key=str)

    second = training_run_start(project=project, config={"epochs": 1})
    second.refresh_from_db()
    assert second.status == "succeeded" and second.parent_version == version
    assert second.produced_version.parent == version and second.produced_version.name == "v2"
    newest = PromptFactory(project=project)
    model_version_promote(version=second.produced_version)
    assert {c.model_version for c in newest.completions.all()} == {version, second.produced_version}
    model_version_promote(version=version, generate=False)  # roll back
    assert ModelVersion.objects.get(is_active=True) == version


def test_the_schedule_starts_a_run_only_after_enough_new_judgements(project):
    project.auto_train = True
    project.save()
    assert training_schedule_tick() == []  # nothing judged yet
    judge_everything(project, UserFactory())
    [run] = training_schedule_tick()
    run.refresh_from_db()
    assert run.status == "succeeded" and run.trigger == "schedule"
    assert training_schedule_tick() == []  # no new judgements since that run


def test_a_failing_run_is_failed_with_its_message_and_the_active_version_is_untouched(project, tmp_path):
    judge_everything(project, UserFactory())
    active = ModelVersion.objects.create(project=project, name="v0", weights_path="loop/missing", is_active=True)
    run = training_run_start(project=project)
    run.refresh_from_db()
    assert run.status == "failed" and "loop/missing" in run.error
    assert ModelVersion.objects.get(is_active=True) == active and ModelVersion.objects.count() == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"config": {"beta": -1}}, "beta must be positive"),
        ({"config": {"learning_rate": "fast"}}, "learning_rate must be a number, not 'fast'"),
        ({"config": {"betta": 0.1}}, "unknown dpo setting 'betta'"),
        ({"algorithm": "sft"}, "algorithm must be one of dpo, grpo, reward, grpo_online, ppo, not 'sft'"),
        ({"algorithm": "grpo"}, "GRPO trains on ranked groups"),
    ],
)
def test_bad_settings_are_refused_before_anything_is_written(project, kwargs, message):
    judge_everything(project, UserFactory(), prompts=2)
    with pytest.raises(TrainingRunError, match=message):
        training_run_start(project=project, **kwargs)
    assert not TrainingRun.objects.exists()


def test_nothing_to_train_on_is_a_clear_error(project):
    with pytest.raises(TrainingRunError, match="no pairs to train on"):
        training_run_start(project=project)


def test_only_one_run_at_a_time(project, huey_immediate):
    judge_everything(project, UserFactory(), prompts=3)
    huey_immediate.immediate = False  # keep the first run queued
    try:
        first = training_run_start(project=project)
        with pytest.raises(TrainingRunError, match="already queued or running"):
            training_run_start(project=project)
    finally:
        huey_immediate.immediate = True
    assert TrainingRun.objects.get() == first and first.status == "queued"


def test_cancel_a_queued_run_and_a_running_one(project, huey_immediate):
    judge_everything(project, UserFactory())
    huey_immediate.immediate = False
    try:
        queued = training_run_start(project=project)
    finally:
        huey_immediate.immediate = True
    assert training_run_cancel(run=queued).status == "cancelled"
    assert training_run_execute(run_id=queued.pk).status == "cancelled"  # the queued task does nothing

    huey_immediate.immediate = False
    try:
        running = training_run_start(project=project, config={"epochs": 3, "batch_size": 1})
    finally:
        huey_immediate.immediate = True

    def cancel_after_first_step(step, total, metrics):
        if step == 1:
            training_run_cancel(run=TrainingRun.objects.get(pk=running.pk))

    done = training_run_execute(run_id=running.pk, on_progress=cancel_after_first_step)
    assert done.status == "cancelled" and 1 <= done.step < done.total_steps
    assert not ModelVersion.objects.exists()
    with pytest.raises(TrainingRunError, match="already ended"):
        training_run_cancel(run=done)


def test_the_reaper_fails_runs_without_a_heartbeat(project, settings):
    settings.TRAINING_RUN_STALE_SECONDS = 60
    stale = TrainingRunFactory(
        project=project, status="running", heartbeat_at=timezone.now() - timezone.timedelta(minutes=5)
    )
    alive = TrainingRunFactory(status="running", heartbeat_at=timezone.now())
    assert training_runs_reap() == [stale.pk]
    stale.refresh_from_db()
    alive.refresh_from_db()
    assert stale.status == "failed" and "worker stopped" in stale.error and alive.status == "running"


def test_train_command_sync_and_its_errors(project, capsys):
    judge_everything(project, UserFactory())
    call_command("train", "loop", "--algorithm", "dpo", "--sync", "--epochs", "1", "--lr", "0.001")
    out = capsys.readouterr().out
    assert "Queued" not in out
    assert "succeeded: model version v1" in out and "held-out preference accuracy" in out
    run = TrainingRun.objects.get()
    assert run.trigger == "command" and run.config["learning_rate"] == 0.001
    with pytest.raises(CommandError, match="no project 'nope'"):
        call_command("train", "nope")
    with pytest.raises(CommandError, match="beta must be positive"):
        call_command("train", "loop", "--beta", "0")
    with pytest.raises(CommandError, match="must be a JSON object"):
        call_command("train", "loop", "--config", "[1]")
    with pytest.raises(CommandError, match="^dpo settings: min_steps must not be negative$"):
        call_command("train", "loop", "--min-steps", "-1")
    assert TrainingRun.objects.count() == 1


def test_train_sync_never_puts_the_run_on_the_queue(project, monkeypatch, capsys):
    """A worker that took a queued copy of the run would train it a second time."""
    judge_everything(project, UserFactory(), prompts=4)
    monkeypatch.setattr(HUEY, "_immediate", False)  # keep huey's in-memory storage, but queue instead of running
    assert HUEY.pending_count() == 0

    call_command("train", "loop", "--sync")

    # only the side-by-side answers, which --sync wrote as well (a worker taking them later keeps them)
    assert [task.name for task in HUEY.pending()] == ["side_by_side_task"]
    HUEY.flush()
    run = TrainingRun.objects.get()
    assert run.status == "succeeded" and run.produced_version.metrics["side_by_side"]["status"] == "done"
    call_command("train", "loop")  # without --sync the run is queued for a worker
    assert HUEY.pending_count() == 1


# (setting, value, the error): wrong types and sizes in a config, each named by its field.
WRONG_VALUES = [
    ("beta", "x", "beta must be a number, not 'x'"),
    ("beta", [0.1], "beta must be a number, not [0.1]"),
    ("beta", {"value": 0.1}, "beta must be a number, not {'value': 0.1}"),
    ("beta", None, "beta must be a number, not None"),
    ("beta", float("nan"), "beta must be a finite number, not nan"),
    ("beta", True, "beta must be a number, not True"),
    ("beta", 10**400, "beta must be a finite number, not a number that large"),
    ("epochs", 10**30, "epochs is too large (at most 9223372036854775807)"),
    ("epochs", 2.5, "epochs must be a whole number, not 2.5"),
    ("lora", "yes", "lora must be true or false, not 'yes'"),
    ("loss_type", ["ipo"], "loss_type must be a string, not ['ipo']"),
    ("max_length", None, "max_length must be a whole number, not None"),
    ("epochs", 10**9, "epochs must be at most 100 (RANKWISE_MAX_TRAINING_EPOCHS)"),
    ("batch_size", 513, "batch_size must be at most 512 (RANKWISE_MAX_TRAINING_BATCH_SIZE)"),
    ("eval_batch_size", 1000, "eval_batch_size must be at most 512 (RANKWISE_MAX_TRAINING_BATCH_SIZE)"),
]


@pytest.mark.parametrize(("name", "value", "message"), WRONG_VALUES)
def test_a_wrong_setting_is_named_by_the_service(name, value, message):
    with pytest.raises(TrainingRunError) as error:
        training_config_build(algorithm="dpo", values={name: value})
    assert str(error.value) == f"dpo settings: {message}"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("x", "grpo settings: epsilon_high must be a number, not 'x'"),
        ([0.3], "grpo settings: epsilon_high must be a number, not [0.3]"),
        (float("inf"), "grpo settings: epsilon_high must be a finite number, not inf"),
    ],
)
def test_grpo_epsilon_high_takes_a_number_or_null(value, message):
    assert training_config_build(algorithm="grpo", values={"epsilon_high": None})["epsilon_high"] is None
    assert training_config_build(algorithm="grpo", values={"epsilon_high": 1})["epsilon_high"] == 1.0
    with pytest.raises(TrainingRunError) as error:
        training_config_build(algorithm="grpo", values={"epsilon_high": value})
    assert str(error.value) == message


def test_the_training_limits_follow_their_settings(settings):
    settings.RANKWISE_MAX_TRAINING_EPOCHS = 3
    settings.RANKWISE_MAX_TRAINING_BATCH_SIZE = 8
    assert training_config_build(algorithm="dpo", values={"epochs": 3, "batch_size": 8})["epochs"] == 3
    with pytest.raises(TrainingRunError, match=r"epochs must be at most 3 \(RANKWISE_MAX_TRAINING_EPOCHS\)"):
        training_config_build(algorithm="dpo", values={"epochs": 4})
    with pytest.raises(TrainingRunError, match=r"batch_size must be at most 8 \(RANKWISE_MAX_TRAINING_BATCH_SIZE\)"):
        training_config_build(algorithm="grpo", values={"batch_size": 9})


def test_max_prompt_length_left_out_follows_max_length():
    assert training_config_build(algorithm="dpo", values={"max_length": 256})["max_prompt_length"] == 128
    assert training_config_build(algorithm="dpo", values={})["max_prompt_length"] == 256


API_CASES = [case for case in WRONG_VALUES if case[0] != "beta" or isinstance(case[1], str | list | dict | bool)]


@pytest.mark.parametrize(("name", "value", "message"), API_CASES)
def test_the_api_answers_400_naming_the_setting_and_starts_nothing(project, name, value, message):
    judge_everything(project, UserFactory(), prompts=2)
    api = APIClient()
    api.force_authenticate(UserFactory(is_staff=True))

    response = api.post("/api/v1/projects/loop/training-runs/", {"config": {name: value}}, format="json")

    assert response.status_code == 400
    assert response.json() == {"detail": f"dpo settings: {message}"}
    assert not TrainingRun.objects.exists()


@pytest.mark.parametrize(
    ("algorithm", "config", "message"),
    [
        ("dpo", '{"beta": "x"}', "dpo settings: beta must be a number, not &#x27;x&#x27;"),
        ("dpo", '{"beta": NaN}', "dpo settings: beta must be a finite number, not nan"),
        ("dpo", '{"epochs": 1000000000}', "dpo settings: epochs must be at most 100 (RANKWISE_MAX_TRAINING_EPOCHS)"),
        ("grpo", '{"epsilon_high": "x"}', "grpo settings: epsilon_high must be a number, not &#x27;x&#x27;"),
        ("grpo", '{"epsilon_high": [1]}', "grpo settings: epsilon_high must be a number, not [1]"),
        ("dpo_rankings", '{"lora": 1}', "dpo settings: lora must be true or false, not 1"),
    ],
)
def test_the_settings_form_names_the_setting_and_saves_nothing(client, project, algorithm, config, message):
    manager = UserFactory()
    MembershipFactory(user=manager, project=project, role="manager")
    client.force_login(manager)
    data = {"auto_train_threshold": "25", "training_algorithm": algorithm, "training_config": config}

    response = client.post("/projects/loop/training/settings/", data)

    assert response.status_code == 400 and message in response.content.decode()
    project.refresh_from_db()
    assert project.training_config == SMALL and project.training_algorithm == "dpo"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--config", '{"beta": NaN}'], "dpo settings: beta must be a finite number, not nan"),
        (["--config", '{"beta": [1]}'], "dpo settings: beta must be a number, not [1]"),
        (["--config", '{"epochs": 1e400}'], "dpo settings: epochs must be a whole number, not inf"),
        (["--epochs", "1000000000"], "dpo settings: epochs must be at most 100 (RANKWISE_MAX_TRAINING_EPOCHS)"),
        (["--batch-size", "100000"], "dpo settings: batch_size must be at most 512 (RANKWISE_MAX_TRAINING_BATCH_SIZE)"),
        (["--lr", "nan"], "dpo settings: learning_rate must be a finite number, not nan"),
        (["--config", "{nope"], "argument --config: not JSON"),
        (["--epochs", "two"], "argument --epochs: invalid int value: 'two'"),
    ],
)
def test_the_train_command_names_the_setting_and_starts_nothing(project, args, message):
    judge_everything(project, UserFactory(), prompts=2)
    with pytest.raises(CommandError) as error:
        call_command("train", "loop", *args)
    assert message in str(error.value)
    assert not TrainingRun.objects.exists()


@pytest.mark.parametrize("weights_path", ["/etc", "../../x", "loop/../../../etc"])
def test_a_version_whose_weights_lie_outside_the_data_dir_refuses_the_run(project, weights_path):
    judge_everything(project, UserFactory(), prompts=2)
    ModelVersion.objects.create(project=project, name="v0", weights_path=weights_path, is_active=True)

    with pytest.raises(TrainingRunError) as error:
        training_run_start(project=project)

    assert str(error.value).startswith("model version loop/v0 points outside ")
    assert not TrainingRun.objects.exists()
    assert not (training_runs.settings.DATA_DIR / "runs").exists()


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        (
            "RANKWISE_MAX_TRAINING_EPOCHS",
            "0",
            "RANKWISE_MAX_TRAINING_EPOCHS must be a whole number of at least 1, not '0'",
        ),
        (
            "RANKWISE_MAX_TRAINING_BATCH_SIZE",
            "lots",
            "RANKWISE_MAX_TRAINING_BATCH_SIZE must be a whole number of at least 1, not 'lots'",
        ),
        (
            "RANKWISE_MAX_TRAINING_EPOCHS",
            "²",
            "RANKWISE_MAX_TRAINING_EPOCHS must be a whole number of at least 1, not '²'",
        ),
    ],
)
def test_a_wrong_training_limit_stops_start_up_naming_it(tmp_path, name, value, message):
    show = (
        "import django; django.setup(); from django.conf import settings; print(settings.RANKWISE_MAX_TRAINING_EPOCHS)"
    )
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")},
        "DJANGO_SETTINGS_MODULE": "config.settings",
        "SECRET_KEY": "k3Y-" * 16,
        "RANKWISE_DATA_DIR": str(tmp_path),
    }
    default = subprocess.run([sys.executable, "-c", show], cwd=ROOT, env=env, capture_output=True, text=True)
    assert default.stdout.strip() == "100"
    wrong = subprocess.run(
        [sys.executable, "-c", show], cwd=ROOT, env={**env, name: value}, capture_output=True, text=True
    )
    assert wrong.returncode != 0 and message in wrong.stderr


def wait_for(condition, *, seconds, what):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_worker_killed_mid_run_leaves_no_run_stuck_and_the_next_run_succeeds(project, settings, shared_queue):
    judge_everything(project, UserFactory())
    env = {
        **os.environ,
        "DATABASE_URL": database_url_for_subprocesses(),
        "RANKWISE_DATA_DIR": str(settings.DATA_DIR),
        "RANKWISE_TRAINING_RUN_STALE_SECONDS": "2",
        "RANKWISE_MAX_TRAINING_EPOCHS": "500",  # a run long enough to be killed in the middle
    }

    def manage(*args):
        return subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env=env, check=True, capture_output=True)

    log = (settings.DATA_DIR / "worker.log").open("ab")

    def worker():
        return subprocess.Popen(
            [sys.executable, "manage.py", "run_huey", "--flush-locks"], cwd=ROOT, env=env, stdout=log, stderr=log
        )

    manage("train", "loop", "--epochs", "500", "--batch-size", "1")  # queued for the worker
    run = TrainingRun.objects.get()
    first = worker()
    try:
        wait_for(lambda: TrainingRun.objects.get(pk=run.pk).step >= 1, seconds=120, what="the run to make progress")
    finally:
        first.kill()  # SIGKILL: no clean-up in the worker at all
        first.wait()
    run.refresh_from_db()
    assert run.status == "running"  # stuck, as huey will not re-run it

    time.sleep(2.5)  # the heartbeat goes stale
    second = worker()
    try:
        wait_for(lambda: TrainingRun.objects.get(pk=run.pk).status == "failed", seconds=60, what="the reaper")
        manage("train", "loop", "--epochs", "1")
        next_run = TrainingRun.objects.exclude(pk=run.pk).get()
        wait_for(
            lambda: TrainingRun.objects.get(pk=next_run.pk).status in ("succeeded", "failed"),
            seconds=120,
            what="the next run to end: " + (settings.DATA_DIR / "worker.log").read_text()[-3000:],
        )
    finally:
        second.terminate()
        second.wait(timeout=30)
    next_run.refresh_from_db()
    assert next_run.status == "succeeded", next_run.error + (settings.DATA_DIR / "worker.log").read_text()
    assert "worker stopped" in TrainingRun.objects.get(pk=run.pk).error
    assert not ModelVersion.objects.filter(produced_by_run=run).exists()


def test_a_version_moved_outside_the_data_dir_after_the_start_fails_the_run_unread(project):
    # six prompts: with two, both could land in the held-out part (a hash of the ids), leaving nothing to train on
    judge_everything(project, UserFactory(), prompts=6)
    run = training_run_start(project=project, enqueue=False)
    ModelVersion.objects.create(project=project, name="v0", weights_path="/etc", is_active=True)

    done = training_run_execute(run_id=run.pk)

    assert done.status == "failed"
    assert done.error.startswith("ValueError: model version loop/v0 points outside ")
    assert not ModelVersion.objects.filter(produced_by_run=run).exists()


def test_with_two_train_processes_the_worker_trains_under_torchrun(project, settings):
    settings.TRAIN_PROCESSES = 2
    judge_everything(project, UserFactory())

    run = training_run_start(project=project)  # huey immediate: runs at once
    run.refresh_from_db()

    assert run.status == "succeeded", run.error
    folder = training_runs.run_dir(run)
    assert (folder / "train.log").is_file() and (folder / "progress.jsonl").is_file()
    assert [m["step"] for m in run.metrics] == list(range(1, run.total_steps + 1))  # followed from rank 0's log
    version = run.produced_version
    assert version.metrics["steps"] == run.total_steps and "eval_after" in version.metrics
    weights = training_runs.settings.MODEL_VERSIONS_DIR / version.weights_path
    assert (weights / "config.json").is_file() and any(weights.glob("*.safetensors"))


def test_a_wrong_number_of_train_processes_stops_start_up_naming_it(tmp_path):
    show = "import django; django.setup(); from django.conf import settings; print(settings.TRAIN_PROCESSES)"
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")},
        "DJANGO_SETTINGS_MODULE": "config.settings",
        "SECRET_KEY": "k3Y-" * 16,
        "RANKWISE_DATA_DIR": str(tmp_path),
    }

    def start(**more: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", show], cwd=ROOT, env={**env, **more}, capture_output=True, text=True
        )

    assert start().stdout.strip() == "1"
    assert start(RANKWISE_TRAIN_PROCESSES="2").stdout.strip() == "2"
    for value in ("0", "two", "1.5"):
        wrong = start(RANKWISE_TRAIN_PROCESSES=value)
        message = f"RANKWISE_TRAIN_PROCESSES must be a whole number of at least 1, not {value!r}"
        assert wrong.returncode != 0 and message in wrong.stderr


def test_a_cancel_request_stops_the_train_processes_and_records_no_version(project, settings, monkeypatch):
    settings.TRAIN_PROCESSES = 2
    judge_everything(project, UserFactory())
    # asked at once: the stop file is there within a second, long before the processes have loaded the model
    monkeypatch.setattr(training_runs, "_cancel_checker", lambda run: lambda: True)

    run = training_run_start(project=project)
    run.refresh_from_db()

    assert run.status == "cancelled", run.error
    assert (training_runs.run_dir(run) / "stop").is_file() and not ModelVersion.objects.exists()


@pytest.mark.skipif(sys.platform != "linux", reason="the parent-death signal is Linux's")
def test_training_processes_end_when_the_worker_that_launched_them_is_killed(tmp_path):
    pid_file = tmp_path / "pid"
    sleeper = f"import os, pathlib, time; pathlib.Path({str(pid_file)!r}).write_text(str(os.getpid())); time.sleep(60)"
    launch = f"import subprocess; subprocess.Popen({[*ending_with_this_process(), '-c', sleeper]!r}); input()"
    worker = subprocess.Popen([sys.executable, "-c", launch], stdin=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while not (pid_file.is_file() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    launched = int(pid_file.read_text())
    assert running(launched)

    worker.kill()  # SIGKILL: the worker cannot stop anything itself
    worker.wait()
    while running(launched) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not running(launched)


def running(pid: int) -> bool:
    """Whether the process is there and not a zombie waiting to be reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_auto_promotion_compares_the_parent_and_the_trained_version_on_the_same_pairs():
    parent, better = {"logp_accuracy": 0.5, "pairs": 8}, {"logp_accuracy": 0.75, "accuracy": 1.0, "pairs": 8}
    assert training_runs._improved({"eval_before": parent, "eval_after": better})
    assert not training_runs._improved({"eval_before": better, "eval_after": parent | {"accuracy": 1.0}})
    # The implicit reward alone (0.5 before by construction) no longer promotes anything.
    assert not training_runs._improved({"eval_before": {"accuracy": 0.5}, "eval_after": {"accuracy": 1.0}})


def test_auto_promotion_of_an_online_run_asks_the_reward_gain_to_beat_twice_its_standard_error():
    def figures(before, after, stderr=0.1):
        return {
            "eval_before": {"reward": before, "reward_stderr": stderr, "prompts": 4},
            "eval_after": {"reward": after, "reward_stderr": stderr, "prompts": 4},
        }

    # The difference's standard error is hypot(0.1, 0.1) ≈ 0.141: a gain above 0.283 promotes.
    assert training_runs._improved(figures(-1.0, -0.7), online=True)
    assert not training_runs._improved(figures(-1.0, -0.75), online=True)  # within sampling luck
    assert not training_runs._improved(figures(-1.0, -1.5), online=True)
    assert not training_runs._improved(figures(-1.0, 5.0, stderr=None), online=True)  # one sample a prompt
    assert not training_runs._improved(figures(None, None, stderr=None), online=True)  # no held-out prompts
    # logp_accuracy is not what an online run reports, and the reward is not what DPO reports.
    assert not training_runs._improved(figures(-1.0, 5.0))
    assert not training_runs._improved(
        {"eval_before": {"logp_accuracy": 0.5}, "eval_after": {"logp_accuracy": 0.9}}, online=True
    )
