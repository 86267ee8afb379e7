"""Sampling completions for prompts that lack them, with the project's model and settings."""

from collections.abc import Callable
from dataclasses import dataclass

from django.db import transaction
from django.db.models import Count

from feedback.models import Completion, Project, Prompt
from feedback.rendering import markdown_to_safe_html
from feedback.selectors.models import model_for_generation


class GenerationError(Exception):
    pass


@dataclass
class GenerationResult:
    prompts: int
    completions: int
    model: str


def prompts_lacking_completions(*, project: Project, k: int, limit: int | None = None) -> list[Prompt]:
    prompts = project.prompts.annotate(n=Count("completions")).filter(n__lt=k).order_by("id")
    return list(prompts[:limit] if limit else prompts)


def completions_generate(
    *,
    project: Project,
    prompt_limit: int | None = None,
    k: int | None = None,
    batch_size: int = 8,
    progress: Callable[[int, int], None] | None = None,
) -> GenerationResult:
    """Write completions until each chosen prompt has K, one batch of prompts at a time.

    Each batch is committed on its own, so an interrupted run keeps what it wrote and a
    second run picks up where it stopped.
    """
    k = k or project.completions_per_prompt
    if not 1 <= k <= 16:
        raise GenerationError(f"K must be between 1 and 16, not {k}")
    if prompt_limit is not None and prompt_limit < 1:
        raise GenerationError(f"the number of prompts must be positive, not {prompt_limit}")
    prompts = prompts_lacking_completions(project=project, k=k, limit=prompt_limit)
    try:
        model_name, version = model_for_generation(project=project)
    except ValueError as error:
        raise GenerationError(str(error)) from None
    if not prompts:
        return GenerationResult(prompts=0, completions=0, model=model_name)

    from training.generate import SamplingConfig, generate_completions
    from training.models import ModelLoadError, load_model

    try:
        model, tokenizer = load_model(model_name)
    except ModelLoadError as error:
        raise GenerationError(str(error)) from None
    sampling = SamplingConfig(
        temperature=project.temperature, top_p=project.top_p, max_new_tokens=project.max_new_tokens
    )
    params = {
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "max_new_tokens": sampling.max_new_tokens,
    }
    source = "" if version else model_name
    written = 0
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        have = dict(
            Prompt.objects.filter(pk__in=[p.pk for p in batch]).annotate(n=Count("completions")).values_list("pk", "n")
        )
        wanted = [p for p in batch if have[p.pk] < k]
        if not wanted:
            continue
        texts = generate_completions(
            model,
            tokenizer,
            [p.messages for p in wanted],
            k=max(k - have[p.pk] for p in wanted),
            sampling=sampling,
        )
        rows = [
            Completion(
                prompt=prompt,
                text=text,
                html=markdown_to_safe_html(text),
                model_version=version,
                source_model=source,
                generation_params=params,
            )
            for prompt, samples in zip(wanted, texts, strict=True)
            for text in samples[: k - have[prompt.pk]]
        ]
        with transaction.atomic():
            Completion.objects.bulk_create(rows)
        written += len(rows)
        if progress:
            progress(min(start + batch_size, len(prompts)), len(prompts))
    return GenerationResult(prompts=len(prompts), completions=written, model=str(version or model_name))
