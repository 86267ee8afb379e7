"""A huey consumer killed with SIGKILL in the middle of a round, then a new consumer started: the round is finished
from what the dead one committed, every chosen prompt with exactly K completions of the round.

Real processes (`manage.py run_huey`) on the test database, on huey's SQLite queue in the test's data dir, or on
Redis when REDIS_URL is set (`make test-services`). The round is slow enough to be killed in the middle by its
size alone: a first batch of 2 prompts, then batches of 16, each decoding 32 rows of up to 64 tokens with the tiny
model.
"""

import os
import subprocess
import sys
import time
from collections import Counter

import pytest

from feedback.models import Completion, Round, RoundPrompt
from tests.factories import ProjectFactory, PromptFactory
from tests.feedback.test_training_runs import wait_for
from tests.processes import ROOT, Consumer, database_url_for_subprocesses

pytestmark = pytest.mark.django_db(transaction=True)

K = 2
PROMPTS = 2 + 16 * 3  # round_write_task's batches: 2 prompts, then 3 batches of 16
STALE_SECONDS = 2


def per_prompt(round: Round) -> Counter:
    """How many completions of the round each prompt has."""
    return Counter(Completion.objects.filter(round=round).values_list("prompt_id", flat=True))


def test_a_worker_killed_mid_round_and_restarted_finishes_the_round_without_duplicates(
    settings, tiny_model_dir, shared_queue
):
    project = ProjectFactory(slug="killed", completions_per_prompt=K, base_model=str(tiny_model_dir), max_new_tokens=64)
    PromptFactory.create_batch(PROMPTS, project=project)
    env = {
        **os.environ,
        "DATABASE_URL": database_url_for_subprocesses(),
        "RANKWISE_DATA_DIR": str(settings.DATA_DIR),
        "RANKWISE_TRAINING_RUN_STALE_SECONDS": str(STALE_SECONDS),  # the dead worker's lock is freed soon
        "RANKWISE_GENERATION_LOW_WATER": "0",  # no generation but the round this test asks for
    }
    queued = subprocess.run(
        [sys.executable, "manage.py", "generate", "killed", "--round", "--versions", "base"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert queued.returncode == 0, queued.stderr
    round = Round.objects.get(project=project)
    assert f"Queued round {round.number} of 'killed'" in queued.stdout
    assert round.status == Round.Status.QUEUED

    consumers: list[Consumer] = []
    logs = lambda: "\n".join(f"--- {c.name}\n{c.log()[-3000:]}" for c in consumers)  # noqa: E731
    try:
        first = Consumer("first", env, settings.DATA_DIR)
        consumers.append(first)

        def a_batch_committed() -> bool:
            assert first.process.poll() is None, logs()
            return RoundPrompt.objects.filter(round=round).exists()

        wait_for(a_batch_committed, seconds=60, what="the first batch of the round: " + logs())
        first.process.kill()  # SIGKILL: the worker cleans nothing up, its lock and heartbeat stay behind
        first.process.wait(timeout=30)
        killed_at = time.monotonic()

        round.refresh_from_db()
        assert round.status == Round.Status.RUNNING
        assert round.prompts_total == PROMPTS and len(round.prompt_ids) == PROMPTS
        assert 0 < round.prompts_written < PROMPTS, logs()
        committed = set(RoundPrompt.objects.filter(round=round).values_list("prompt_id", flat=True))
        assert len(committed) == round.prompts_written
        assert per_prompt(round) == Counter({pk: K for pk in committed})  # whole batches only
        kept = set(Completion.objects.filter(round=round).values_list("pk", flat=True))
        chosen = list(round.prompt_ids)

        time.sleep(max(0.0, STALE_SECONDS + 0.5 - (time.monotonic() - killed_at)))  # its last heartbeat goes stale
        second = Consumer("second", env, settings.DATA_DIR)
        consumers.append(second)

        def round_ended() -> bool:
            assert second.process.poll() is None, logs()
            return Round.objects.get(pk=round.pk).status != Round.Status.RUNNING

        wait_for(round_ended, seconds=60, what="the restarted worker to finish the round: " + logs())
        round.refresh_from_db()
        assert round.status == Round.Status.DONE, round.error + logs()
        assert round.prompt_ids == chosen  # the prompts were chosen once, when the round started
        assert round.prompts_written == round.prompts_total == PROMPTS
        assert per_prompt(round) == Counter({pk: K for pk in chosen}), logs()  # no prompt written twice
        assert sorted(RoundPrompt.objects.filter(round=round).values_list("prompt_id", flat=True)) == sorted(chosen)
        assert Completion.objects.filter(prompt__project=project).count() == K * PROMPTS
        assert kept <= set(Completion.objects.filter(round=round).values_list("pk", flat=True))  # what it committed
        assert second.ran("round_write_task") >= 1, logs()
    finally:
        for consumer in consumers:
            if consumer.process.poll() is None:
                consumer.process.terminate()
            consumer.process.wait(timeout=60)
