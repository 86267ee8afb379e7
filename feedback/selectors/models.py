from pathlib import Path

from django.conf import settings

from feedback.models import ModelVersion, Project


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
