import math
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db.models import FloatField, OuterRef, Subquery, Value

from feedback.models import CompletionScore, ModelVersion, Project


def model_version_active(*, project: Project) -> ModelVersion | None:
    return project.model_versions.filter(is_active=True).first()


def model_version_weights_dir(*, version: ModelVersion) -> Path:
    """A version's weights directory, which must lie inside the data dir's versions folder."""
    root = Path(settings.MODEL_VERSIONS_DIR).resolve()
    path = (root / version.weights_path).resolve()
    if not path.is_relative_to(root):
        raise ValueError(f"model version {version} points outside {root}")
    return path


def model_for_generation(*, project: Project) -> tuple[str, ModelVersion | None]:
    """The model that writes a project's completions: its active version, else its base model."""
    version = model_version_active(project=project)
    if version is not None:
        return str(model_version_weights_dir(version=version)), version
    return project.base_model or settings.BASE_MODEL, None


def accuracy_interval(*, accuracy: float | None, pairs: int | None, z: float = 1.96) -> tuple[float, float] | None:
    """The Wilson score interval (95 % by default) of a held-out accuracy measured on ``pairs`` pairs; None without one.

    A run's held-out pairs come from a few held-out prompts, and the pairs of one prompt share completions, so
    they are not independent: read the interval as the least uncertainty there is, wider still when the pairs
    come from few prompts. Two accuracies whose intervals overlap widely do not show a change.
    """
    if accuracy is None or not pairs:
        return None
    centre = (accuracy + z * z / (2 * pairs)) / (1 + z * z / pairs)
    half = z * math.sqrt(accuracy * (1 - accuracy) / pairs + z * z / (4 * pairs * pairs)) / (1 + z * z / pairs)
    return max(centre - half, 0.0), min(centre + half, 1.0)


def reward_model_newest(*, project: Project) -> ModelVersion | None:
    """The project's newest reward model: the one PPO and online GRPO use by default and whose scores staff see."""
    return project.model_versions.filter(kind=ModelVersion.Kind.REWARD).order_by("-created_at", "-id").first()


def completion_reward_scores(*, reward_model: ModelVersion | None) -> Any:
    """An expression for a completion queryset's ``annotate``: its score by ``reward_model`` (null without one)."""
    if reward_model is None:
        return Value(None, output_field=FloatField())
    scores = CompletionScore.objects.filter(completion=OuterRef("pk"), reward_model=reward_model)
    return Subquery(scores.values("score")[:1], output_field=FloatField())


def completion_newest_reward_scores() -> Any:
    """An expression for completions of any projects: each one's score by its own project's newest reward model."""
    reward_models = ModelVersion.objects.filter(
        project=OuterRef(OuterRef("prompt__project")), kind=ModelVersion.Kind.REWARD
    )
    newest = reward_models.order_by("-created_at", "-id").values("pk")[:1]
    scores = CompletionScore.objects.filter(completion=OuterRef("pk"), reward_model=Subquery(newest))
    return Subquery(scores.values("score")[:1], output_field=FloatField())
