"""The demo project `make run` seeds once: varied prompts, an admin and two annotators."""

import json
import secrets
from dataclasses import dataclass
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


def _credentials_file() -> Path:
    return Path(settings.DATA_DIR) / "demo-credentials.json"


def demo_seed() -> DemoSeed:
    """Create the demo project and users once; later calls return what is there."""
    credentials_file = _credentials_file()
    existing = Project.objects.filter(slug=DEMO_SLUG).first()
    if existing is not None and credentials_file.is_file():
        return DemoSeed(project=existing, created=False, credentials=json.loads(credentials_file.read_text()))
    credentials = {name: secrets.token_urlsafe(9) for name, _ in USERS}
    user_model = get_user_model()
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
            user, _ = user_model.objects.get_or_create(username=name)
            user.is_staff = user.is_superuser = is_staff
            user.set_password(credentials[name])
            user.save()
            role = Membership.Role.MANAGER if is_staff else Membership.Role.ANNOTATOR
            Membership.objects.update_or_create(user=user, project=project, defaults={"role": role})
    credentials_file.write_text(json.dumps(credentials))
    credentials_file.chmod(0o600)
    return DemoSeed(project=project, created=existing is None, credentials=credentials)
