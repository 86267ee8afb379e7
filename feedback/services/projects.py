from django.core.exceptions import ValidationError
from django.utils.text import slugify

from feedback.models import Project


def project_get_or_create(*, slug: str, mode: str | None = None, k: int | None = None) -> tuple[Project, bool]:
    """The project with this slug, created with the given mode and K when it is new.

    For an existing project, a mode or K that differs from its own is an error rather
    than a silent change: its judgements were made under the old settings.
    """
    if slugify(slug) != slug:
        raise ValidationError(f"'{slug}' is not a valid project slug: use lowercase letters, digits and hyphens")
    if mode is not None and mode not in Project.Mode.values:
        raise ValidationError(f"mode must be one of {', '.join(Project.Mode.values)}, not '{mode}'")
    if k is not None and not 2 <= k <= 16:
        raise ValidationError(f"K (completions per prompt) must be between 2 and 16, not {k}")
    project = Project.objects.filter(slug=slug).first()
    if project is None:
        project = Project(name=slug.replace("-", " ").capitalize(), slug=slug)
        if mode:
            project.mode = mode
        if k:
            project.completions_per_prompt = k
        project.full_clean()
        project.save()
        return project, True
    if mode is not None and mode != project.mode:
        raise ValidationError(f"project '{slug}' is in {project.mode} mode, not {mode}")
    if k is not None and k != project.completions_per_prompt:
        raise ValidationError(f"project '{slug}' has K = {project.completions_per_prompt}, not {k}")
    return project, False
