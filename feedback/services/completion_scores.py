"""Scores of completions by a reward model, written in the worker so staff see them beside each completion."""

from __future__ import annotations

from feedback.models import Completion, CompletionScore, ModelVersion
from feedback.selectors.models import model_version_weights_dir

CHUNK = 256  # completions scored and written at a time


def completion_scores_compute(*, version: ModelVersion) -> int:
    """Score every completion of the version's project that it has not scored yet; returns how many it scored.

    Running it twice scores nothing twice (the pending ones are those without a score, and the
    unique constraint drops a row another worker wrote meanwhile).
    """
    if version.kind != ModelVersion.Kind.REWARD:
        raise ValueError(f"{version.name} is not a reward model")
    from training.models import default_device
    from training.reward import load_reward_model, score_texts

    model, tokenizer = load_reward_model(model_version_weights_dir(version=version), device=default_device())
    pending = (
        Completion.objects.filter(prompt__project_id=version.project_id)
        .exclude(scores__reward_model=version)
        .select_related("prompt")
        .order_by("id")
    )
    scored = 0
    while chunk := list(pending[:CHUNK]):
        scores = score_texts(model, tokenizer, [c.prompt.messages for c in chunk], [c.text for c in chunk])
        CompletionScore.objects.bulk_create(
            [CompletionScore(completion=c, reward_model=version, score=s) for c, s in zip(chunk, scores, strict=True)],
            ignore_conflicts=True,
        )
        scored += len(chunk)
    return scored
