"""Reward models in the app: trained from judgements, recorded as versions of kind reward, never promoted."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from django.core.management import call_command
from rest_framework.test import APIClient

from feedback.models import CompletionScore, ModelVersion, TrainingRun
from feedback.services import training_runs
from feedback.services.completion_scores import completion_scores_compute
from feedback.services.model_versions import ModelVersionError, model_version_promote
from feedback.services.training_runs import TrainingRunError, run_dir, training_run_execute, training_run_start
from tests.factories import MembershipFactory, ProjectFactory, PromptFactory, UserFactory
from tests.feedback.test_training_runs import ROOT, SMALL, judge_everything, wait_for
from tests.processes import database_url_for_subprocesses
from training.reward import HEAD_FILE, load_reward_model, score_texts
from training.runs import TrainResult

pytestmark = pytest.mark.django_db(transaction=True)

REWARD = {**SMALL, "epochs": 4, "learning_rate": 3e-3}
FILES = ("train.jsonl", "held_out.jsonl")


@pytest.fixture
def project(tiny_model_dir):
    return ProjectFactory(
        slug="rm",
        mode="pairwise",
        completions_per_prompt=2,
        base_model=str(tiny_model_dir),
        training_config=REWARD,
        auto_promote=True,
    )


def test_judgements_train_a_reward_model_that_is_never_promoted(project, settings):
    judge_everything(project, UserFactory())

    # Prompts are held out by a hash of their id: half of them, so that some are whatever the ids.
    run = training_run_start(project=project, algorithm="reward", enqueue=False, test_fraction=0.5)
    run = training_run_execute(run_id=run.pk)

    assert run.status == "succeeded", run.error
    assert run.algorithm == "reward" and run.data_counts["format"] == "dpo"
    version = run.produced_version
    assert version.kind == "reward" and version.name == "reward-1"
    assert not version.is_active  # auto_promote is on, and still a reward model is not promoted
    assert version.metrics["eval_after"]["pairs"] == run.data_counts["held_out"] > 0  # one pair per prompt
    assert 0 <= version.metrics["eval_after"]["accuracy"] <= 1
    assert set(version.metrics["eval_before"]) == {"accuracy", "margin", "pairs"}
    weights = settings.MODEL_VERSIONS_DIR / version.weights_path
    assert (weights / HEAD_FILE).is_file() and not list(weights.glob("*.bin"))
    model, tokenizer = load_reward_model(weights)
    good, bad = score_texts(model, tokenizer, ["Question 0: tell me about cats"] * 2, ["Cats are great.", "No."])
    assert good > bad

    with pytest.raises(
        ModelVersionError, match="reward-1 is a reward model: it scores completions and is never promoted"
    ):
        model_version_promote(version=version)
    assert not ModelVersion.objects.filter(is_active=True).exists()

    policy = training_run_start(project=project, algorithm="dpo", config={"learning_rate": 1e-3}, enqueue=False)
    policy = training_run_execute(run_id=policy.pk)
    assert policy.parent_version is None  # a reward model never becomes what the next policy starts from
    assert policy.produced_version.name == "v1" and policy.produced_version.kind == "policy"


def test_a_ranking_project_without_rankings_is_a_clear_error(tiny_model_dir):
    project = ProjectFactory(slug="ranked", mode="ranking", base_model=str(tiny_model_dir), training_config=REWARD)
    with pytest.raises(TrainingRunError, match="no pairs or ranked groups to train on yet"):
        training_run_start(project=project, algorithm="reward", enqueue=False)
    assert not TrainingRun.objects.exists()


def test_the_api_and_the_command_start_reward_runs(project, capsys):
    judge_everything(project, UserFactory())
    api = APIClient()
    api.force_authenticate(UserFactory(is_staff=True))
    response = api.post(
        "/api/v1/projects/rm/training-runs/", {"algorithm": "reward", "config": {"center_rewards": -1}}, format="json"
    )
    assert response.status_code == 400
    assert response.json() == {"detail": "reward settings: center_rewards must not be negative"}
    assert not TrainingRun.objects.exists()

    call_command("train", "rm", "--algorithm", "reward", "--sync")
    out = capsys.readouterr().out
    assert "(reward): " in out
    assert "succeeded: model version reward-1" in out
    version = ModelVersion.objects.get()
    response = api.get("/api/v1/projects/rm/model-versions/")
    assert response.json()["results"][0]["kind"] == "reward"
    response = api.post(f"/api/v1/model-versions/{version.pk}/promote/", {}, format="json")
    assert response.status_code == 400
    assert response.json() == {"detail": "reward-1 is a reward model: it scores completions and is never promoted"}
    assert not ModelVersion.objects.filter(is_active=True).exists()


def test_the_training_page_offers_no_promotion_of_a_reward_model(client, project):
    manager = UserFactory()
    MembershipFactory(user=manager, project=project, role="manager")
    version = ModelVersion.objects.create(project=project, name="reward-1", weights_path="rm/x", kind="reward")
    client.force_login(manager)
    page = client.get("/projects/rm/training/").content.decode()
    row = page.split(f'id="version-{version.pk}"')[1].split("</tr>")[0]
    assert "reward model" in row and "Promote" not in row
    response = client.post(f"/projects/rm/training/versions/{version.pk}/promote/", follow=True)
    assert "reward-1 is a reward model" in response.content.decode()
    version.refresh_from_db()
    assert not version.is_active


def test_online_grpo_refuses_to_start_without_a_reward_model_and_uses_the_newest(project):
    judge_everything(project, UserFactory())
    with pytest.raises(TrainingRunError, match=r"grpo_online needs a reward model and rm has none: train one first"):
        training_run_start(project=project, algorithm="grpo_online", enqueue=False)
    with pytest.raises(TrainingRunError, match="grpo_online settings: reward_model: rm has no reward model named 'x'"):
        training_run_start(project=project, algorithm="grpo_online", config={"reward_model": "x"}, enqueue=False)
    assert not TrainingRun.objects.exists()

    reward = training_run_execute(run_id=training_run_start(project=project, algorithm="reward", enqueue=False).pk)
    assert reward.status == "succeeded", reward.error
    online = {"max_new_tokens": 4, "num_generations": 2, "batch_size": 4, "eval_samples": 1}
    run = training_run_start(project=project, algorithm="grpo_online", config=online, enqueue=False)
    assert run.config["reward_model"] == "reward-1"
    run = training_run_execute(run_id=run.pk)
    assert run.status == "succeeded", run.error
    assert run.produced_version.kind == "policy" and run.produced_version.name == "v1"
    held_out = (run_dir(run) / "held_out.jsonl").read_text().splitlines()
    before = run.produced_version.metrics["eval_before"]
    assert set(before) == {"reward", "reward_stderr", "response_length", "prompts"}
    assert before["prompts"] == len({json.loads(row)["prompt_id"] for row in held_out})
    assert {"reward", "kl", "response_length"} <= set(run.metrics[-1])


def test_ppo_runs_against_the_project_reward_model_it_names(project):
    judge_everything(project, UserFactory())
    with pytest.raises(TrainingRunError, match="ppo needs a reward model and rm has none: train one first"):
        training_run_start(project=project, algorithm="ppo", enqueue=False)
    reward = training_run_execute(run_id=training_run_start(project=project, algorithm="reward", enqueue=False).pk)
    second = training_run_execute(run_id=training_run_start(project=project, algorithm="reward", enqueue=False).pk)
    assert (reward.produced_version.name, second.produced_version.name) == ("reward-1", "reward-2")

    ppo = {"max_new_tokens": 4, "batch_size": 6, "ppo_epochs": 2, "eval_samples": 1}
    assert training_run_start(project=project, algorithm="ppo", config=ppo, enqueue=False).config["reward_model"] == (
        "reward-2"
    )
    TrainingRun.objects.filter(status="queued").delete()
    run = training_run_start(
        project=project, algorithm="ppo", config={**ppo, "reward_model": "reward-1"}, enqueue=False
    )
    run = training_run_execute(run_id=run.pk)
    assert run.status == "succeeded", run.error
    assert run.produced_version.kind == "policy"
    assert run.produced_version.metrics["reward_model"].endswith("run-" + str(reward.pk))
    assert {"reward", "kl", "value_loss", "response_length"} <= set(run.metrics[-1])


def reward_version_trained_on(project, base_model, settings):
    """A reward version whose saved config says which base model it was trained on (its weights are not needed)."""
    folder = settings.MODEL_VERSIONS_DIR / project.slug / "reward-1"
    folder.mkdir(parents=True)
    (folder / "training_config.json").write_text(json.dumps({"algorithm": "reward", "base_model": base_model}))
    return ModelVersion.objects.create(
        project=project, name="reward-1", weights_path=f"{project.slug}/reward-1", kind="reward"
    )


@pytest.mark.parametrize("algorithm", ["ppo", "grpo_online"])
def test_a_reward_model_of_another_base_model_is_refused_naming_both(project, settings, tmp_path, algorithm):
    judge_everything(project, UserFactory())
    other = tmp_path / "other-base"
    other.mkdir()
    reward_version_trained_on(project, str(other), settings)
    with pytest.raises(TrainingRunError) as refused:
        training_run_start(project=project, algorithm=algorithm, enqueue=False)
    assert str(refused.value) == (
        f"{algorithm} settings: reward_model: reward-1 was trained on base model {other.resolve()}, "
        f"but the policy is of base model {Path(project.base_model).resolve()}: "
        f"train a reward model from {Path(project.base_model).resolve()}"
    )
    assert not TrainingRun.objects.exists()


@pytest.mark.parametrize(("after", "promoted"), [(0.5, True), (-0.9, False)])
def test_auto_promotion_promotes_an_online_version_whose_held_out_reward_clearly_rose(
    project, monkeypatch, settings, after, promoted
):
    judge_everything(project, UserFactory())
    reward_version_trained_on(project, project.base_model, settings)
    run = training_run_start(project=project, algorithm="ppo", enqueue=False)
    metrics = {
        "steps": 2,
        "eval_before": {"reward": -1.0, "reward_stderr": 0.1, "response_length": 4.0, "prompts": 3},
        "eval_after": {"reward": after, "reward_stderr": 0.1, "response_length": 4.0, "prompts": 3},
    }
    monkeypatch.setattr(training_runs, "_train", lambda run, out_dir, progress: TrainResult(out_dir, metrics))
    promotions = []
    monkeypatch.setattr(training_runs, "model_version_promote", lambda *, version: promotions.append(version.name))

    run = training_run_execute(run_id=run.pk)

    assert run.status == "succeeded", run.error
    assert promotions == (["v1"] if promoted else [])


@pytest.mark.parametrize("algorithm", ["ppo", "grpo_online"])
def test_online_runs_roll_out_every_training_prompt_judged_or_not_and_never_evaluation_prompts(
    project, settings, algorithm
):
    judge_everything(project, UserFactory(), prompts=4)
    unjudged = [PromptFactory(project=project, messages=[{"role": "user", "content": f"New {i}"}]) for i in range(8)]
    evaluation = PromptFactory(project=project, split="eval")
    reward_version_trained_on(project, project.base_model, settings)

    run = training_run_start(project=project, algorithm=algorithm, enqueue=False, test_fraction=0.5)

    train, held_out = ([json.loads(row) for row in (run_dir(run) / name).read_text().splitlines()] for name in FILES)
    training_prompts = set(project.prompts.filter(split="train").values_list("pk", flat=True))
    assert {row["prompt_id"] for row in train + held_out} == training_prompts
    assert {p.pk for p in unjudged} <= training_prompts and evaluation.pk not in training_prompts
    assert train and held_out and not {row["prompt_id"] for row in train} & {row["prompt_id"] for row in held_out}
    assert {"prompt": "New 0", "prompt_id": unjudged[0].pk} in train + held_out
    assert run.data_counts == {"train": len(train), "held_out": len(held_out), "format": "prompts"}


def test_an_online_run_needs_prompts_and_takes_no_round_limits(tiny_model_dir, settings):
    project = ProjectFactory(slug="empty", base_model=str(tiny_model_dir), training_config=REWARD)
    reward_version_trained_on(project, project.base_model, settings)
    with pytest.raises(TrainingRunError, match="no training prompts to train on yet: import prompts first"):
        training_run_start(project=project, algorithm="ppo", enqueue=False)
    PromptFactory(project=project)
    with pytest.raises(TrainingRunError, match="since_round does not limit a ppo run: it rolls out every training"):
        training_run_start(project=project, algorithm="ppo", limits={"since_round": 2}, enqueue=False)
    assert not TrainingRun.objects.exists()


def test_the_training_page_charts_a_ppo_run_and_shows_its_versions_score(client, project):
    manager = UserFactory()
    MembershipFactory(user=manager, project=project, role="manager")
    run = TrainingRun.objects.create(
        project=project,
        algorithm="ppo",
        status="succeeded",
        step=2,
        total_steps=2,
        metrics=[{"step": 1, "loss": 0.5, "reward": -1.0, "kl": 0.01, "value_loss": 0.3, "response_length": 12.0}],
    )
    ModelVersion.objects.create(
        project=project,
        name="v1",
        weights_path="rm/v1",
        produced_by_run=run,
        metrics={"eval_before": {"reward": -1.25, "prompts": 3}, "eval_after": {"reward": -0.5, "prompts": 3}},
    )
    client.force_login(manager)
    page = client.get(f"/projects/rm/training/?run={run.pk}").content.decode()
    assert 'data-chart="rollout" aria-label="Response length and value loss by step"' in page
    assert 'aria-label="Reward model score and KL to the reference by step"' in page
    assert "reward model score -1.250 → -0.500" in page


def test_managers_see_the_newest_reward_models_score_beside_each_completion(project):
    judge_everything(project, UserFactory())
    run = training_run_execute(run_id=training_run_start(project=project, algorithm="reward", enqueue=False).pk)
    version = run.produced_version
    # the worker scored every completion once the reward model was recorded (huey runs at once in tests)
    scores = {s.completion_id: s.score for s in CompletionScore.objects.filter(reward_model=version)}
    assert CompletionScore.objects.filter(reward_model=version).count() == 24
    assert completion_scores_compute(version=version) == 0  # nothing scored twice

    manager, annotator = UserFactory(), UserFactory()
    MembershipFactory(user=manager, project=project, role="manager")
    MembershipFactory(user=annotator, project=project, role="annotator")
    api = APIClient()
    api.force_authenticate(manager)
    rows = api.get("/api/v1/projects/rm/completions/").json()["results"]
    assert {row["id"]: row["reward"] for row in rows} == scores
    great = [row["reward"] for row in rows if row["text"] == "Cats are great."]
    bad = [row["reward"] for row in rows if row["text"] == "No."]
    assert min(great) > max(bad)
    api.force_authenticate(annotator)
    assert {row["reward"] for row in api.get("/api/v1/projects/rm/completions/").json()["results"]} == {None}


def test_a_worker_killed_mid_ppo_leaves_no_run_stuck_and_the_next_run_succeeds(project, settings, shared_queue):
    judge_everything(project, UserFactory())
    training_run_execute(run_id=training_run_start(project=project, algorithm="reward", enqueue=False).pk)
    env = {
        **os.environ,
        "DATABASE_URL": database_url_for_subprocesses(),
        "RANKWISE_DATA_DIR": str(settings.DATA_DIR),
        "RANKWISE_TRAINING_RUN_STALE_SECONDS": "2",
        "RANKWISE_MAX_TRAINING_EPOCHS": "500",  # a run long enough to be killed in the middle
    }
    log = (settings.DATA_DIR / "worker.log").open("ab")

    def manage(*args):
        return subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env=env, check=True, capture_output=True)

    def worker():
        return subprocess.Popen(
            [sys.executable, "manage.py", "run_huey", "--flush-locks"], cwd=ROOT, env=env, stdout=log, stderr=log
        )

    short = ["--max-new-tokens", "4", "--eval-samples", "1", "--ppo-epochs", "1"]
    manage("train", "rm", "--algorithm", "ppo", "--epochs", "500", "--batch-size", "1", *short)
    run = TrainingRun.objects.get(algorithm="ppo")
    first = worker()
    try:
        wait_for(lambda: TrainingRun.objects.get(pk=run.pk).step >= 1, seconds=120, what="the run to make progress")
    finally:
        first.kill()  # SIGKILL: no clean-up in the worker at all
        first.wait()
    assert TrainingRun.objects.get(pk=run.pk).status == "running"  # stuck, as huey will not re-run it

    time.sleep(2.5)  # the heartbeat goes stale
    second = worker()
    try:
        wait_for(lambda: TrainingRun.objects.get(pk=run.pk).status == "failed", seconds=60, what="the reaper")
        manage("train", "rm", "--algorithm", "ppo", "--epochs", "1", "--batch-size", "6", *short)
        next_run = TrainingRun.objects.filter(algorithm="ppo").exclude(pk=run.pk).get()
        wait_for(
            lambda: TrainingRun.objects.get(pk=next_run.pk).status in ("succeeded", "failed"),
            seconds=180,
            what="the next run to end",
        )
    finally:
        second.terminate()
        second.wait(timeout=30)
    next_run.refresh_from_db()
    assert next_run.status == "succeeded", next_run.error + (settings.DATA_DIR / "worker.log").read_text()[-3000:]
    assert "worker stopped" in TrainingRun.objects.get(pk=run.pk).error
    assert not ModelVersion.objects.filter(produced_by_run=run).exists()
