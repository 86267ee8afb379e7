"""Sampling completions for prompts that lack them, with the project's model and settings."""

from collections.abc import Callable
from dataclasses import dataclass

from django.conf import settings
from django.db import transaction
from django.db.models import Count

from feedback.models import Completion, ModelVersion, Project, Prompt
from feedback.queue import enqueue
from feedback.rendering import markdown_to_safe_html
from feedback.selectors.models import model_for_generation, model_version_weights_dir


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


def _writers(project: Project, mix_previous: bool) -> list[tuple[str, ModelVersion | None]]:
    """The models that write: the active one, and with `mix_previous` the one it was trained from."""
    try:
        name, version = model_for_generation(project=project)
        writers = [(name, version)]
        if mix_previous and version is not None:
            parent = version.parent
            if parent is not None:
                writers.append((str(model_version_weights_dir(version=parent)), parent))
            else:
                writers.append((project.base_model or settings.BASE_MODEL, None))
    except ValueError as error:
        raise GenerationError(str(error)) from None
    return writers


def _shares(missing: int, writers: int) -> list[int]:
    """Split the missing completions of a prompt between the writers, the first taking any extra."""
    base, extra = divmod(missing, writers)
    return [base + (1 if i < extra else 0) for i in range(writers)]


def completions_generate(
    *,
    project: Project,
    prompt_limit: int | None = None,
    k: int | None = None,
    mix_previous: bool = False,
    first_batch: int = 2,
    batch_size: int = 16,
    progress: Callable[[int, int], None] | None = None,
) -> GenerationResult:
    """Write completions until each chosen prompt has K, one batch of prompts at a time.

    With `mix_previous`, half of each prompt's new completions come from the active
    version and half from the model it was trained from, so people compare the two.
    Each batch is committed on its own, so an interrupted run keeps what it wrote and a
    second run picks up where it stopped. The first batch is small (`first_batch`
    prompts) so that the first tasks reach annotators within seconds; the later ones are
    large (`batch_size` prompts, K rows each decoded together), which is where batched
    decoding gets its speed. Each completion's generation_params say how many tokens it
    has and whether the length limit cut it.
    """
    k = k or project.completions_per_prompt
    if not 1 <= k <= 16:
        raise GenerationError(f"K must be between 1 and 16, not {k}")
    if prompt_limit is not None and prompt_limit < 1:
        raise GenerationError(f"the number of prompts must be positive, not {prompt_limit}")
    writers = _writers(project, mix_previous)
    label = " + ".join(str(version or name) for name, version in writers)
    prompts = prompts_lacking_completions(project=project, k=k, limit=prompt_limit)
    if not prompts:
        return GenerationResult(prompts=0, completions=0, model=label)

    import torch

    from training.generate import SamplingConfig, generate_completions, inference_dtype
    from training.models import ModelLoadError, load_model

    dtype = inference_dtype(torch.device("cpu"))
    loaded = []
    for name, version in writers:
        try:
            loaded.append((load_model(name, dtype=dtype), name, version))
        except ModelLoadError as error:
            raise GenerationError(str(error)) from None
    sampling = SamplingConfig(
        temperature=project.temperature, top_p=project.top_p, max_new_tokens=project.max_new_tokens
    )
    params = {"temperature": sampling.temperature, "top_p": sampling.top_p, "max_new_tokens": sampling.max_new_tokens}
    written = 0
    starts = [0, *range(first_batch, len(prompts), batch_size)] if first_batch < len(prompts) else [0]
    for start, end in zip(starts, [*starts[1:], len(prompts)], strict=True):
        batch = prompts[start:end]
        have = dict(
            Prompt.objects.filter(pk__in=[p.pk for p in batch]).annotate(n=Count("completions")).values_list("pk", "n")
        )
        wanted = [p for p in batch if have[p.pk] < k]
        shares = {p.pk: _shares(k - have[p.pk], len(loaded)) for p in wanted}
        rows = []
        for i, ((model, tokenizer), name, version) in enumerate(loaded):
            takers = [p for p in wanted if shares[p.pk][i]]
            if not takers:
                continue
            k_rows = max(shares[p.pk][i] for p in takers)
            samples = generate_completions(
                model,
                tokenizer,
                [p.messages for p in takers],
                k=k_rows,
                sampling=sampling,
                batch_size=len(takers) * k_rows,
            )
            rows += [
                Completion(
                    prompt=prompt,
                    text=sample.text,
                    html=markdown_to_safe_html(sample.text),
                    model_version=version,
                    source_model="" if version else name,
                    generation_params={**params, "new_tokens": sample.tokens, "truncated": sample.truncated},
                )
                for prompt, written_for in zip(takers, samples, strict=True)
                for sample in written_for[: shares[prompt.pk][i]]
            ]
        with transaction.atomic():
            Completion.objects.bulk_create(rows)
        written += len(rows)
        if progress:
            progress(end, len(prompts))
    return GenerationResult(prompts=len(prompts), completions=written, model=label)


def generation_schedule_tick(*, low_water: int, round_prompts: int) -> list[Project]:
    """Projects whose annotation queue runs low and that have prompts waiting for completions.

    For each, the worker is asked to write the next round (`round_prompts` prompts).
    """
    from feedback.selectors.tasks import judgements_left

    due = []
    for project in Project.objects.all():
        if judgements_left(project=project) >= low_water:
            continue
        if not prompts_lacking_completions(project=project, k=project.completions_per_prompt, limit=1):
            continue
        enqueue("generate_completions_task", project.pk, round_prompts, None, True)
        due.append(project)
    return due
