"""Asking for rounds: which writers, how many prompts, by which strategy; one round writes at a time.

A request is validated before anything is written; a mistake is a ValidationError keyed by the
field at fault (``prompts``, ``strategy``, ``versions``, ``round``). The one-open-round constraint
is the arbiter between concurrent requests: a queued round nobody has started yet is replaced by
the newer request, a running one refuses it. The worker (``round_write`` in services/generation.py)
chooses the prompts when the round starts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.db.models import Max
from django.utils import timezone

from feedback.models import ModelVersion, Project, Prompt, Round
from feedback.queue import enqueue
from feedback.selectors.models import model_version_active

BASE = "base"  # the writer name of the project's base model
# The most prompts a round may ask for: the largest number Round.prompt_limit holds on every database.
MAX_ROUND_PROMPTS = 2**31 - 1
MIN_BATTLE_PROMPTS = 10  # fewer battles than this say little about which version people prefer
STRATEGIES: tuple[str, ...] = (
    Round.Strategy.OLDEST_ROUND_FIRST,
    Round.Strategy.UNJUDGED_FIRST,
    Round.Strategy.UNCERTAIN_FIRST,
)


def round_writers_default(*, project: Project) -> list[str]:
    """The active version, or the base model when none is active."""
    active = model_version_active(project=project)
    return [active.name] if active is not None else [BASE]


def round_writers_mix(*, project: Project) -> list[str]:
    """The active version and the model it was trained from (its parent version, or the base model)."""
    active = model_version_active(project=project)
    if active is None:
        return [BASE]
    return [active.name, active.parent.name if active.parent is not None else BASE]


def _writers_problem(*, project: Project, writers: Sequence[str], role: str = "writer") -> str | None:
    if not writers:
        return "Name at least one writer: a model version of this project, or 'base'."
    repeated = sorted({name for name in writers if writers.count(name) > 1})
    if repeated:
        return f"Each writer is named once; {', '.join(repeated)} appear more than once."
    named = [name for name in writers if name != BASE]
    versions = ModelVersion.objects.filter(project=project, name__in=named)
    known = set(versions.values_list("name", flat=True))
    reward_models = set(versions.filter(kind=ModelVersion.Kind.REWARD).values_list("name", flat=True))
    for name in named:
        if name in reward_models:
            return f"'{name}' is a reward model: it scores completions and writes none, so it cannot be a {role}."
        if name in known:
            continue
        elsewhere = ModelVersion.objects.filter(name=name).exclude(project=project).first()
        if elsewhere is not None:
            return f"'{name}' is a version of project '{elsewhere.project.slug}', not of '{project.slug}'."
        return f"'{name}' is not a version of project '{project.slug}'; use a version name or 'base'."
    return None


def _round_number_next(*, project: Project) -> int:
    return (Round.objects.filter(project=project).aggregate(last=Max("number"))["last"] or 0) + 1


def _sampling(*, project: Project, k: int | None) -> dict[str, float | int]:
    return {
        "k": k or project.completions_per_prompt,
        "temperature": project.temperature,
        "top_p": project.top_p,
        "max_new_tokens": project.max_new_tokens,
    }


def _open_message(open_round: Round) -> str:
    name = f"Round {open_round.number}" + (" (a battle)" if open_round.kind == Round.Kind.BATTLE else "")
    if open_round.status == Round.Status.QUEUED:
        return f"{name} is queued; ask for a new round when it has been written."
    return (
        f"{name} is being written ({open_round.prompts_written} of {open_round.prompts_total} prompts); "
        "ask for a new round when it has finished."
    )


def round_request(
    *,
    project: Project,
    prompts: int | None = None,
    strategy: str = Round.Strategy.OLDEST_ROUND_FIRST,
    writers: Sequence[str] | None = None,
    k: int | None = None,
) -> Round:
    """Queue a round of K fresh completions for ``prompts`` prompts (all when None), chosen by ``strategy``.

    ``writers`` are version names of the project or ``base``; by default the active version, else the
    base model. Each chosen prompt's K completions are split between the writers, the first taking
    any extra. The round is written by the worker (enqueue it with ``round_enqueue``) or by the caller.
    """
    errors: dict[str, str] = {}
    if prompts is not None and prompts < 1:
        errors["prompts"] = f"The number of prompts must be at least 1, not {prompts}."
    if prompts is not None and prompts > MAX_ROUND_PROMPTS:
        errors["prompts"] = f"The number of prompts must be at most {MAX_ROUND_PROMPTS}, not {prompts}."
    if strategy not in STRATEGIES:
        errors["strategy"] = f"'{strategy}' is not a strategy; use one of {', '.join(STRATEGIES)}."
    if strategy == Round.Strategy.UNCERTAIN_FIRST and model_version_active(project=project) is None:
        errors["strategy"] = "uncertain_first orders prompts by the active version's margins; promote a version first."
    if k is not None and not 1 <= k <= 16:
        errors["k"] = f"K must be between 1 and 16, not {k}."
    names = list(writers) if writers is not None else round_writers_default(project=project)
    problem = _writers_problem(project=project, writers=names)
    if problem:
        errors["versions"] = problem
    if errors:
        raise ValidationError(errors)
    return _round_create(
        project=project,
        writers=names,
        strategy=strategy,
        prompt_limit=prompts,
        sampling=_sampling(project=project, k=k),
    )


def battle_request(
    *, project: Project, candidate: str, against: str | None = None, prompts: int | None = None
) -> Round:
    """Queue a blind battle: ``candidate`` against ``against`` (the active version, else the base model) on
    the project's evaluation prompts (the first ``prompts`` of them; all when None, at least
    MIN_BATTLE_PROMPTS), one completion from each writer per prompt with the project's sampling settings.

    The two completions of a prompt are judged as a pair whatever the project's mode, and never trained on.
    """
    errors: dict[str, str] = {}
    opponent = against if against else round_writers_default(project=project)[0]
    problem = _writers_problem(project=project, writers=[candidate], role="candidate")
    if problem:
        errors["candidate"] = problem
    elif candidate == BASE:
        errors["candidate"] = "The candidate is a version of the project; the base model can only be the opponent."
    problem = _writers_problem(project=project, writers=[opponent], role="opponent")
    if problem:
        errors["against"] = problem
    elif opponent == candidate:
        errors["against"] = f"A version cannot battle itself; choose an opponent other than '{candidate}'."
    available = Prompt.objects.filter(project=project, split=Prompt.Split.EVAL).count()
    if prompts is not None and not MIN_BATTLE_PROMPTS <= prompts <= MAX_ROUND_PROMPTS:
        errors["prompts"] = f"A battle needs at least {MIN_BATTLE_PROMPTS} evaluation prompts, not {prompts}."
    elif available < (prompts or MIN_BATTLE_PROMPTS):
        errors["prompts"] = (
            f"A battle needs {prompts or MIN_BATTLE_PROMPTS} evaluation prompts; project '{project.slug}' has "
            f"{available}. Import prompts with split 'eval', or mark some for evaluation in the admin."
        )
    if errors:
        raise ValidationError(errors)
    return _round_create(
        project=project,
        kind=Round.Kind.BATTLE,
        writers=[candidate, opponent],
        strategy=Round.Strategy.EVALUATION,
        prompt_limit=prompts,
        sampling=_sampling(project=project, k=2),
    )


def _round_create(*, project: Project, kind: str = Round.Kind.TRAINING, **fields: Any) -> Round:
    """Create the project's next round, queued; the one-open-round constraint decides between requests."""
    try:
        with transaction.atomic():
            # Requests of one project take turns (on PostgreSQL; SQLite's write lock already does that), so
            # the later one replaces the earlier one's queued round of the same kind rather than colliding with it.
            Project.objects.select_for_update().get(pk=project.pk)
            Round.objects.filter(project=project, status=Round.Status.QUEUED, kind=kind).delete()
            open_round = Round.objects.filter(
                project=project, status__in=[Round.Status.QUEUED, Round.Status.RUNNING]
            ).first()
            if open_round is not None:
                raise ValidationError({"round": _open_message(open_round)})
            return Round.objects.create(
                project=project, number=_round_number_next(project=project), kind=kind, **fields
            )
    except IntegrityError:
        # Another request made its round between our read and our insert: one round, theirs.
        other = Round.objects.filter(project=project, status__in=[Round.Status.QUEUED, Round.Status.RUNNING]).first()
        if other is not None and (other.status == Round.Status.RUNNING or other.kind != kind):
            raise ValidationError({"round": _open_message(other)}) from None
        raise ValidationError(
            {"round": "Another round was asked for at the same moment and is queued; it will be written first."}
        ) from None


def round_enqueue(*, round: Round) -> None:
    """Have the worker write the round once the request's transaction has committed."""
    enqueue("round_write_task", round.pk)


def round_of_imported_completions(*, project: Project, writers: list[str], prompts: int) -> Round:
    """A finished round for completions that come with imported prompts: the project's newest round."""
    now = timezone.now()
    return Round.objects.create(
        project=project,
        number=_round_number_next(project=project),
        writers=writers,
        strategy=Round.Strategy.IMPORTED,
        sampling={},
        status=Round.Status.DONE,
        prompts_total=prompts,
        prompts_written=prompts,
        started_at=now,
        finished_at=now,
    )
