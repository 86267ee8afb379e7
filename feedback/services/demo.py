"""The demo project `make run` seeds once: varied prompts, an admin and two annotators.

A few of its prompts come with a first round the default model wrote when the demo was made
(``first_round.jsonl``, written by ``manage.py demo_first_round``), so an annotator has tasks
before the worker has loaded the model; the worker writes the rest.
"""

import json
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import zip_longest
from pathlib import Path
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import transaction

from feedback.models import Completion, Membership, Project
from feedback.services.prompts import PromptImportError, prompts_import_records

DEMO_SLUG = "demo"
DEMO_DIR = Path(__file__).resolve().parent.parent / "demo"
DEMO_PROMPTS = DEMO_DIR / "prompts.jsonl"
DEMO_FIRST_ROUND = DEMO_DIR / "first_round.jsonl"
DEMO_K = 4
DEMO_MAX_NEW_TOKENS = 192
# The writer the shipped completions are recorded under: the rounds table, the review page and the API
# show staff this name, not `base`, since no model on this machine wrote them.
FIRST_ROUND_WRITER = "SmolLM2-135M-Instruct (shipped with the demo)"
GUIDELINES = """\
Rank the answers from best to worst for a person who asked this question.

- **Correct** beats fluent: a wrong answer ranks below a short right one.
- Prefer answers that do what was asked (format, length, language).
- Put answers that are equally good in a tie.
"""
USERS = [("admin", True), ("alice", False), ("bob", False)]


class DemoSeedError(Exception):
    pass


@dataclass
class DemoSeed:
    project: Project
    created: bool
    credentials: dict[str, str]
    # Demo names that were already taken by accounts of their own: those are never changed.
    existing_users: list[str] = field(default_factory=list)


def _credentials_file() -> Path:
    return Path(settings.DATA_DIR) / "demo-credentials.json"


def _credentials_write(path: Path, credentials: dict[str, str]) -> None:
    """Write the logins readable by the owner only, from the first byte (not chmod after writing)."""
    path.unlink(missing_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as file:
        json.dump(credentials, file)


def demo_seed() -> DemoSeed:
    """Create the demo project and users once; later calls return what is there.

    Only ever creates accounts: a user who already has a demo name (a real account, or a demo user
    whose password was changed since) keeps its password, rights and memberships.
    """
    credentials_file = _credentials_file()
    existing = Project.objects.filter(slug=DEMO_SLUG).first()
    if existing is not None and credentials_file.is_file():
        return DemoSeed(project=existing, created=False, credentials=json.loads(credentials_file.read_text()))
    records = _demo_records() if existing is None else []
    user_model = get_user_model()
    taken = set(user_model.objects.filter(username__in=[name for name, _ in USERS]).values_list("username", flat=True))
    credentials = {name: secrets.token_urlsafe(9) for name, _ in USERS if name not in taken}
    with transaction.atomic():
        project = existing or Project.objects.create(
            name="Demo: everyday questions",
            slug=DEMO_SLUG,
            mode=Project.Mode.RANKING,
            completions_per_prompt=DEMO_K,
            overlap=2,
            guidelines=GUIDELINES,
            max_new_tokens=DEMO_MAX_NEW_TOKENS,
        )
        if existing is None:
            _demo_import(project=project, records=records)
        for name, is_staff in USERS:
            if name in taken:
                continue
            user = user_model.objects.create_user(
                username=name, password=credentials[name], is_staff=is_staff, is_superuser=is_staff
            )
            role = Membership.Role.MANAGER if is_staff else Membership.Role.ANNOTATOR
            Membership.objects.create(user=user, project=project, role=role)
    _credentials_write(credentials_file, credentials)
    return DemoSeed(
        project=project,
        created=existing is None,
        credentials=credentials,
        existing_users=[name for name, _ in USERS if name in taken],
    )


def _jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise DemoSeedError(
            f"{path}: cannot be read ({error}); it ships with Rankwise, so restore it from the checkout"
        ) from None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as error:
            raise DemoSeedError(f"{path} line {number}: not valid JSON ({error.msg} at column {error.colno})") from None


def demo_prompt_records() -> list[dict[str, Any]]:
    """The demo's prompts as import records (no completions), in file order."""
    return [record for _, record in _jsonl(DEMO_PROMPTS)]


def _first_round_problem(record: Any, prompts: dict[str, dict[str, Any]]) -> str | None:
    if not isinstance(record, dict):
        return "must be a JSON object"
    prompt = prompts.get(str(record.get("id")))
    if prompt is None:
        return f"id {record.get('id')!r} is not a prompt of {DEMO_PROMPTS.name}"
    if {key: value for key, value in record.items() if key != "completions"} != prompt:
        return (
            f"prompt {prompt['id']} differs from {DEMO_PROMPTS.name}; write the file again (manage.py demo_first_round)"
        )
    completions = record.get("completions")
    if not isinstance(completions, list) or len(completions) != DEMO_K:
        return f"prompt {prompt['id']} must have {DEMO_K} completions (the demo's K)"
    for index, completion in enumerate(completions):
        if not isinstance(completion, dict) or not isinstance(completion.get("text"), str):
            return f"completions[{index}] must be an object with 'text'"
        if completion.get("model") != FIRST_ROUND_WRITER:
            return f"completions[{index}].model must be {FIRST_ROUND_WRITER!r}, the name staff see it under"
        params = completion.get("generation_params")
        if not isinstance(params, dict) or not isinstance(params.get("truncated"), bool):
            return f"completions[{index}].generation_params must say whether the length limit cut it ('truncated')"
    return None


def demo_first_round_records() -> list[dict[str, Any]]:
    """The shipped first round: import records of demo prompts with K completions each, checked.

    Each completion names its writer (``FIRST_ROUND_WRITER``) and carries the ``generation_params``
    it was written with; a file that does not fit raises a DemoSeedError naming it and the line.
    """
    prompts = {record["id"]: record for record in demo_prompt_records()}
    records = []
    for number, record in _jsonl(DEMO_FIRST_ROUND):
        problem = _first_round_problem(record, prompts)
        if problem is not None:
            raise DemoSeedError(f"{DEMO_FIRST_ROUND} line {number}: {problem}")
        records.append(record)
    if not records:
        raise DemoSeedError(f"{DEMO_FIRST_ROUND}: holds no prompts; write it with `python manage.py demo_first_round`")
    return records


def _demo_records() -> list[dict[str, Any]]:
    """The demo's prompts in file order, those of the shipped first round with their completions."""
    shipped = {record["id"]: record for record in demo_first_round_records()}
    return [shipped.get(record["id"], record) for record in demo_prompt_records()]


def _demo_import(*, project: Project, records: list[dict[str, Any]]) -> None:
    """Import the prompts; the shipped completions become a finished round of imported completions.

    The import stores a completion's text and model; the generation params each shipped completion
    was written with (tokens, the length limit's cut) are set on it after, in the same transaction.
    """
    try:
        prompts_import_records(project=project, records=records)
    except PromptImportError as error:
        raise DemoSeedError(f"{DEMO_PROMPTS} with {DEMO_FIRST_ROUND}: {error}") from None
    params = {
        record["id"]: [completion["generation_params"] for completion in record["completions"]]
        for record in records
        if record.get("completions")
    }
    completions = list(
        Completion.objects.filter(prompt__project=project).select_related("prompt").order_by("prompt_id", "id")
    )
    by_prompt: dict[str, list[Completion]] = {}
    for completion in completions:
        by_prompt.setdefault(completion.prompt.external_id, []).append(completion)
    for external_id, written in by_prompt.items():
        for completion, shipped in zip(written, params[external_id], strict=True):
            completion.generation_params = shipped
    Completion.objects.bulk_update(completions, ["generation_params"])


def demo_first_round_pick(records: list[dict[str, Any]], count: int) -> list[dict[str, Any]]:
    """``count`` prompts taken from each topic in turn (the first of each topic, then the second, ...)."""
    topics: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        topics.setdefault(record.get("metadata", {}).get("topic", ""), []).append(record)
    turns = [record for turn in zip_longest(*topics.values()) for record in turn if record is not None]
    return turns[:count]


def demo_first_round_write(*, model_dir: Path, prompts: int, seed: int, path: Path = DEMO_FIRST_ROUND) -> int:
    """Sample the shipped first round with the default model and the demo's settings; the prompts written.

    Sampled as the worker writes rounds (``writer_load``, with the configured backend) with a fixed seed;
    each completion's generation_params record the model, sampling, seed, dtype, device and library versions
    (vLLM's too, and ``backend: vllm``, when it wrote them), its new tokens and whether the length limit cut it.
    """
    import torch
    import transformers

    from feedback.services.generation import writer_load
    from training.generate import SamplingConfig, inference_dtype
    from training.models import default_device

    chosen = demo_first_round_pick(demo_prompt_records(), prompts)
    device = default_device()
    dtype = inference_dtype(device)  # what either backend writes in on this device
    write = writer_load(model=str(model_dir))
    sampling = SamplingConfig(  # the demo project's: the model's defaults but for the length limit
        temperature=Project._meta.get_field("temperature").get_default(),
        top_p=Project._meta.get_field("top_p").get_default(),
        max_new_tokens=DEMO_MAX_NEW_TOKENS,
        seed=seed,
    )
    conversations = [_messages(record["prompt"]) for record in chosen]
    samples = write(conversations, DEMO_K, sampling)
    written_with: dict[str, Any] = {
        "model": model_dir.name,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "max_new_tokens": sampling.max_new_tokens,
        "seed": seed,
        "dtype": str(dtype).removeprefix("torch."),
        "device": device.type,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "shipped": True,
    }
    if settings.GENERATION_BACKEND == "vllm":
        from importlib.metadata import version

        written_with |= {"backend": "vllm", "vllm": version("vllm")}
    lines = []
    for record, written in zip(chosen, samples, strict=True):
        completions = [
            {
                "text": sample.text.replace("\x00", ""),
                "model": FIRST_ROUND_WRITER,
                "generation_params": {**written_with, "new_tokens": sample.tokens, "truncated": sample.truncated},
            }
            for sample in written
        ]
        lines.append(json.dumps({**record, "completions": completions}, ensure_ascii=False))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return len(chosen)


def _messages(prompt: str | list[dict[str, str]]) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
