"""Writing rounds: sampling K completions for each of a round's prompts with its writers and settings."""

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import F, Value
from django.db.models.functions import Coalesce
from django.utils import timezone

from feedback.models import Completion, ModelVersion, Project, Prompt, Round, RoundPrompt
from feedback.queue import enqueue
from feedback.rendering import markdown_to_safe_html
from feedback.selectors.models import model_version_active, model_version_weights_dir
from feedback.selectors.rounds import round_judged_pairs, round_prompts_by_judgements, round_prompts_by_latest_round
from feedback.selectors.tasks import judgements_left
from feedback.services.rounds import BASE, round_request, round_writers_default, round_writers_mix

if TYPE_CHECKING:
    from training.generate import Sample, SamplingConfig


class GenerationError(Exception):
    pass


# A model ready to write: (conversations, k, sampling) -> k samples for each conversation, in order.
Writer = Callable[[list[list[dict[str, str]]], int, "SamplingConfig"], list[list["Sample"]]]


def writer_load(*, model: str) -> Writer:
    """``model`` (a directory or id) ready to write completions with the backend RANKWISE_GENERATION_BACKEND names.

    ``torch`` (the default): the weights loaded now on ``default_device()`` in ``inference_dtype``, and each
    write decodes all its rows as one batch with ``generate_completions``. ``vllm``: a vLLM engine started
    now (and kept for the model's later writes in this process), each write through
    ``generate_completions_vllm``. A model that cannot be loaded, or a vLLM backend without the vllm package or
    a CUDA GPU, is a GenerationError saying what is missing, raised before anything is written.
    """
    if settings.GENERATION_BACKEND == "vllm":
        return _vllm_writer(model=model)
    from training.generate import generate_completions, inference_dtype
    from training.models import ModelLoadError, default_device, load_model

    device = default_device()  # CUDA when the worker has a GPU
    try:
        loaded, tokenizer = load_model(model, dtype=inference_dtype(device), device=device)
    except ModelLoadError as error:
        raise GenerationError(str(error)) from None

    def write(conversations: list[list[dict[str, str]]], k: int, sampling: "SamplingConfig") -> list[list["Sample"]]:
        rows = max(len(conversations) * k, 1)
        return generate_completions(loaded, tokenizer, conversations, k=k, sampling=sampling, batch_size=rows)

    return write


def _vllm_writer(*, model: str) -> Writer:
    from training.generate_vllm import VllmUnavailable, generate_completions_vllm, vllm_engine
    from training.models import ModelLoadError

    try:
        vllm_engine(model)  # started here, so that a model vLLM cannot serve fails before prompts are chosen
    except VllmUnavailable as error:
        raise GenerationError(f"RANKWISE_GENERATION_BACKEND is vllm, but {error}") from None
    except ModelLoadError as error:  # a LoRA version whose adapter or base cannot be read to merge them
        raise GenerationError(str(error)) from None

    def write(conversations: list[list[dict[str, str]]], k: int, sampling: "SamplingConfig") -> list[list["Sample"]]:
        return generate_completions_vllm(model, conversations, k=k, sampling=sampling)

    return write


@dataclass
class GenerationResult:
    prompts: int
    completions: int
    model: str


def prompts_lacking_completions(*, project: Project, limit: int | None = None) -> list[Prompt]:
    """Training prompts no round has answered yet, oldest first (evaluation prompts are not for ordinary rounds)."""
    prompts = project.prompts.filter(split=Prompt.Split.TRAIN, completions__isnull=True).order_by("id")
    return list(prompts[:limit] if limit else prompts)


def _writer_models(*, project: Project, writers: list[str]) -> list[tuple[str, ModelVersion | None]]:
    """Each writer's model directory or id, and its version (None for the base model)."""
    versions = {v.name: v for v in ModelVersion.objects.filter(project=project, name__in=writers)}
    models: list[tuple[str, ModelVersion | None]] = []
    for name in writers:
        if name == BASE:
            models.append((project.base_model or settings.BASE_MODEL, None))
            continue
        version = versions.get(name)
        if version is None:
            raise GenerationError(f"version '{name}' of round writer list no longer exists in '{project.slug}'")
        try:
            models.append((str(model_version_weights_dir(version=version)), version))
        except ValueError as error:
            raise GenerationError(str(error)) from None
    return models


def _shares(missing: int, writers: int) -> list[int]:
    """Split the missing completions of a prompt between the writers, the first taking any extra."""
    base, extra = divmod(missing, writers)
    return [base + (1 if i < extra else 0) for i in range(writers)]


def prompts_by_uncertainty(*, project: Project, limit: int | None, model: Any, tokenizer: Any) -> list[int]:
    """Prompt ids by the model's own margin on their latest judged round, smallest (or most negative) first.

    A prompt's margin is the log-prob the model gives the completion people preferred minus the one they
    rejected, summed over that round's pairs: small where the model is unsure, negative where it disagrees
    with people. Prompts never judged (or judged only as ties) follow, oldest latest round first.
    """
    from training.logprobs import completion_logprob_sums

    training = round_prompts_by_latest_round(project=project, limit=None)
    allowed = set(training)
    pairs = {
        prompt_id: found
        for prompt_id, found in round_judged_pairs(project=project).items()
        if found and prompt_id in allowed  # a prompt marked for evaluation since it was judged is left out
    }
    completion_ids = sorted({c for found in pairs.values() for pair in found for c in pair})
    completions = Completion.objects.select_related("prompt").in_bulk(completion_ids)
    logps = dict(
        zip(
            completion_ids,
            completion_logprob_sums(
                model, tokenizer, [(completions[c].prompt.messages, completions[c].text) for c in completion_ids]
            ),
            strict=True,
        )
    )
    margins = {prompt_id: sum(logps[a] - logps[b] for a, b in found) for prompt_id, found in pairs.items()}
    ordered = sorted(margins, key=lambda prompt_id: (margins[prompt_id], prompt_id))
    ordered += [pk for pk in training if pk not in margins]
    return ordered[:limit] if limit else ordered


def _round_prompt_ids(*, round: Round) -> list[int]:
    project = round.project
    if round.strategy == Round.Strategy.EVALUATION:
        evaluation = Prompt.objects.filter(project=project, split=Prompt.Split.EVAL).order_by("pk")
        ids = evaluation.values_list("pk", flat=True)
        return list(ids[: round.prompt_limit] if round.prompt_limit else ids)
    if round.strategy == Round.Strategy.UNJUDGED_FIRST:
        return round_prompts_by_judgements(project=project, limit=round.prompt_limit)
    if round.strategy == Round.Strategy.UNCERTAIN_FIRST:
        from training.models import ModelLoadError, default_device, load_model

        active = model_version_active(project=project)
        if active is None:
            raise GenerationError("uncertain_first needs an active version, whose margins order the prompts")
        try:
            model, tokenizer = load_model(str(model_version_weights_dir(version=active)), device=default_device())
        except (ModelLoadError, ValueError) as error:
            raise GenerationError(str(error)) from None
        return prompts_by_uncertainty(project=project, limit=round.prompt_limit, model=model, tokenizer=tokenizer)
    return round_prompts_by_latest_round(project=project, limit=round.prompt_limit)


def _round_start(*, round_id: int) -> Round | None:
    """Claim a queued round (or one a dead worker left running) and fix its prompts once."""
    now = timezone.now()
    claimed = Round.objects.filter(pk=round_id, status__in=[Round.Status.QUEUED, Round.Status.RUNNING]).update(
        status=Round.Status.RUNNING, started_at=Coalesce(F("started_at"), Value(now))
    )
    if not claimed:
        return None  # replaced by a newer request before it started, or already finished
    return Round.objects.select_related("project").get(pk=round_id)


def round_write(
    *,
    round_id: int,
    first_batch: int = 2,
    batch_size: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> GenerationResult:
    """Write a round: choose its prompts when it starts, then K completions each, a batch of prompts at a time.

    Each batch's completions and its prompts' places in the round are committed together, so the
    queue only ever sees a prompt with all its completions, and a round whose worker was killed
    resumes from what it committed, without duplicates, when it is written again. The first batch
    is small (``first_batch`` prompts) so that the first tasks reach annotators within seconds; the
    later ones are large (``batch_size`` prompts, K rows each decoded together; by default as many as
    fill generate_completions' BATCH_ROWS), which is where batched decoding gets its speed. Each
    completion's generation_params say how many tokens it has and whether the length limit cut it. A
    round that cannot be written is marked failed with the reason, and the reason raised as a
    GenerationError; any other error fails it too, named by its type, and is raised as it is, so that
    a new round can be asked for. Only a process that is
    stopped (KeyboardInterrupt, SystemExit) leaves the round running, to be resumed.
    """
    round = _round_start(round_id=round_id)
    if round is None:
        return GenerationResult(prompts=0, completions=0, model="")
    try:
        return _round_write(round=round, first_batch=first_batch, batch_size=batch_size, progress=progress)
    except GenerationError as error:
        _round_fail(round=round, error=str(error))
        raise
    except Exception as error:
        _round_fail(round=round, error=f"{type(error).__name__}: {error}")
        raise


def _round_fail(*, round: Round, error: str) -> None:
    Round.objects.filter(pk=round.pk).update(status=Round.Status.FAILED, error=error, finished_at=timezone.now())


def _batches(count: int, *, first_batch: int, batch_size: int) -> list[tuple[int, int]]:
    """(start, end) of each batch of ``count`` prompts: a small first one, then full ones."""
    starts = [0, *range(first_batch, count, batch_size)] if first_batch < count else [0]
    return list(zip(starts, [*starts[1:], count], strict=True))


def _round_write(
    *, round: Round, first_batch: int, batch_size: int | None, progress: Callable[[int, int], None] | None
) -> GenerationResult:
    from training.generate import BATCH_ROWS, SamplingConfig

    project = round.project
    label = " + ".join(round.writers)
    loaded = [
        (writer_load(model=name), name, version)
        for name, version in _writer_models(project=project, writers=round.writers)
    ]
    if not round.prompt_ids:
        prompt_ids = _round_prompt_ids(round=round)
        Round.objects.filter(pk=round.pk).update(prompt_ids=prompt_ids, prompts_total=len(prompt_ids))
        round.prompt_ids, round.prompts_total = prompt_ids, len(prompt_ids)
    done = set(RoundPrompt.objects.filter(round=round).values_list("prompt_id", flat=True))
    remaining = [pk for pk in round.prompt_ids if pk not in done]
    k = int(round.sampling.get("k", project.completions_per_prompt))
    sampling = SamplingConfig(
        temperature=float(round.sampling.get("temperature", project.temperature)),
        top_p=float(round.sampling.get("top_p", project.top_p)),
        max_new_tokens=int(round.sampling.get("max_new_tokens", project.max_new_tokens)),
    )
    params = {"temperature": sampling.temperature, "top_p": sampling.top_p, "max_new_tokens": sampling.max_new_tokens}
    prompts_by_id = Prompt.objects.in_bulk(remaining)
    written = 0
    batch_size = batch_size or max(1, BATCH_ROWS // k)
    for start, end in _batches(len(remaining), first_batch=first_batch, batch_size=batch_size):
        batch = [prompts_by_id[pk] for pk in remaining[start:end] if pk in prompts_by_id]
        shares = _shares(k, len(loaded))
        rows = []
        for share, (write, name, version) in zip(shares, loaded, strict=True):
            if not share or not batch:
                continue
            samples = write([p.messages for p in batch], share, sampling)
            for prompt, written_for in zip(batch, samples, strict=True):
                for sample in written_for[:share]:
                    # A byte-level tokenizer can decode a NUL, which PostgreSQL cannot store (and imports refuse).
                    text = sample.text.replace("\x00", "")
                    rows.append(
                        Completion(
                            prompt=prompt,
                            round=round,
                            text=text,
                            html=markdown_to_safe_html(text),
                            model_version=version,
                            source_model="" if version else name,
                            generation_params={**params, "new_tokens": sample.tokens, "truncated": sample.truncated},
                        )
                    )
        # A prompt's completions get their ids in random order, so that no id says which writer wrote which.
        by_prompt: dict[int, list[Completion]] = {}
        for row in rows:
            by_prompt.setdefault(row.prompt.pk, []).append(row)
        rows = []
        for shuffled in by_prompt.values():
            random.shuffle(shuffled)
            rows += shuffled
        with transaction.atomic():
            Completion.objects.bulk_create(rows)
            RoundPrompt.objects.bulk_create(RoundPrompt(round=round, prompt=prompt) for prompt in batch)
            Round.objects.filter(pk=round.pk).update(prompts_written=F("prompts_written") + len(batch))
        written += len(rows)
        if progress:
            progress(len(done) + end, len(round.prompt_ids))
    Round.objects.filter(pk=round.pk).update(status=Round.Status.DONE, finished_at=timezone.now())
    return GenerationResult(prompts=len(remaining), completions=written, model=label)


def answers_sample(
    *,
    model: str,
    conversations: list[list[dict[str, str]]],
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    seed: int,
) -> list[tuple[str, bool]]:
    """One answer per conversation by ``model`` (a directory or id), loaded and decoded as round writers are.

    Returns each answer's text and whether the length limit cut it. The seed is set before sampling,
    so two models given the same conversations and settings draw from the same random stream.
    """
    from training.generate import SamplingConfig

    write = writer_load(model=model)
    sampling = SamplingConfig(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed)
    samples = write(conversations, 1, sampling)
    # A byte-level tokenizer can decode a NUL, which PostgreSQL cannot store.
    return [(written[0].text.replace("\x00", ""), written[0].truncated) for written in samples]


def completions_generate(
    *,
    project: Project,
    prompt_limit: int | None = None,
    k: int | None = None,
    mix_previous: bool = False,
    first_batch: int = 2,
    batch_size: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> GenerationResult:
    """Write a round over the prompts no round has answered yet (at most ``prompt_limit``), here and now.

    The writer is the active version, or the base model; with ``mix_previous`` also the model it
    was trained from, so people compare the two. Nothing is asked for when every prompt has completions.
    """
    unanswered = len(prompts_lacking_completions(project=project, limit=prompt_limit))
    writers = round_writers_mix(project=project) if mix_previous else round_writers_default(project=project)
    if not unanswered:
        return GenerationResult(prompts=0, completions=0, model=" + ".join(writers))
    try:
        round = round_request(project=project, prompts=unanswered, writers=writers, k=k)
    except ValidationError as error:
        raise GenerationError(" ".join(error.messages)) from None
    return round_write(round_id=round.pk, first_batch=first_batch, batch_size=batch_size, progress=progress)


def generation_schedule_tick(*, low_water: int, round_prompts: int) -> list[Project]:
    """Projects whose annotation queue runs low and that have prompts waiting for completions.

    For each, the worker is asked to write the next round (`round_prompts` prompts).
    """
    due = []
    for project in Project.objects.all():
        if judgements_left(project=project) >= low_water:
            continue
        if not prompts_lacking_completions(project=project, limit=1):
            continue
        enqueue("generate_completions_task", project.pk, round_prompts, None, True)
        due.append(project)
    return due
