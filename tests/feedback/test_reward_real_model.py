"""With the real default model: judgements -> reward model -> a PPO run of a few steps -> version -> its completions."""

import pytest

from feedback.models import CompletionScore, ModelVersion, Project
from feedback.services.model_versions import model_version_promote
from feedback.services.training_runs import training_run_start
from tests.factories import PromptFactory, UserFactory
from tests.feedback.test_training_runs import judge_everything

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

FEW_STEPS = {
    "epochs": 1,
    "min_steps": 0,
    "batch_size": 4,
    "max_length": 96,
    "max_prompt_length": 64,
    "eval_batch_size": 4,
    "learning_rate": 1e-4,
    "save_every": 0,
}


def test_the_default_model_learns_a_reward_model_and_ppo_trains_against_it(real_model_dir):
    project = Project.objects.create(
        slug="real-ppo",
        name="Real PPO",
        mode="pairwise",
        completions_per_prompt=2,
        base_model=str(real_model_dir),
        max_new_tokens=8,
        training_config=FEW_STEPS,
    )
    judge_everything(project, UserFactory(), prompts=8)

    reward = training_run_start(project=project, algorithm="reward", test_fraction=0.3)
    reward.refresh_from_db()
    assert reward.status == "succeeded", reward.error
    reward_model = reward.produced_version
    assert reward_model.kind == "reward" and not reward_model.is_active
    assert CompletionScore.objects.filter(reward_model=reward_model).count() == 16

    ppo = training_run_start(
        project=project,
        algorithm="ppo",
        config={"max_new_tokens": 6, "ppo_epochs": 2, "eval_samples": 1},
        test_fraction=0.3,
    )
    ppo.refresh_from_db()
    assert ppo.status == "succeeded", ppo.error
    assert ppo.config["reward_model"] == reward_model.name
    assert ppo.step == ppo.total_steps >= 2
    assert all(m["kl"] >= 0 for m in ppo.metrics)
    version = ppo.produced_version
    assert version.kind == "policy"

    prompt = PromptFactory(project=project, messages=[{"role": "user", "content": "What colour is the sky?"}])
    model_version_promote(version=version)  # the next round: the PPO version and the base model write
    written = list(prompt.completions.all())
    assert len(written) == 2 and all(c.text.strip() for c in written)
    assert {c.model_version for c in written} == {version, None}
    assert ModelVersion.objects.get(is_active=True) == version
    # the newest reward model scored the new completions after the generation
    assert CompletionScore.objects.filter(reward_model=reward_model, completion__prompt=prompt).count() == 2
