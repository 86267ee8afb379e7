"""The demo project `make run` seeds once: varied prompts, an admin and two annotators."""

import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import transaction

from feedback.models import Membership, Project
from feedback.services.prompts import prompts_import_jsonl

DEMO_SLUG = "demo"
DEMO_PROMPTS = Path(__file__).resolve().parent.parent / "demo" / "prompts.jsonl"
GUIDELINES = """\
Rank the answers from best to worst for a person who asked this question.

- **Correct** beats fluent: a wrong answer ranks below a short right one.
- Prefer answers that do what was asked (format, length, language).
- Put answers that are equally good in a tie.
"""
USERS = [("admin", True), ("alice", False), ("bob", False)]


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
    user_model = get_user_model()
    taken = set(user_model.objects.filter(username__in=[name for name, _ in USERS]).values_list("username", flat=True))
    credentials = {name: secrets.token_urlsafe(9) for name, _ in USERS if name not in taken}
    with transaction.atomic():
        project = existing or Project.objects.create(
            name="Demo: everyday questions",
            slug=DEMO_SLUG,
            mode=Project.Mode.RANKING,
            completions_per_prompt=4,
            overlap=2,
            guidelines=GUIDELINES,
            max_new_tokens=192,
        )
        if existing is None:
            with DEMO_PROMPTS.open("rb") as lines:
                prompts_import_jsonl(project=project, lines=lines)
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
