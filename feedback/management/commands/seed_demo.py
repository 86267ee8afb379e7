from typing import Any

from django.core.management.base import BaseCommand, CommandError

from feedback.queue import enqueue
from feedback.services.demo import DemoSeedError, demo_seed
from feedback.services.generation import prompts_lacking_completions


class Command(BaseCommand):
    help = "Seed the demo project and its users once, queue its completions, and print the logins."

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            seed = demo_seed()
        except DemoSeedError as error:
            raise CommandError(str(error)) from None
        project = seed.project
        lacking = len(prompts_lacking_completions(project=project))
        if lacking:
            enqueue("generate_completions_task", project.pk)
            self.stdout.write(
                f"Queued completions for {lacking} demo prompts; the worker writes them in the background."
            )
        self.stdout.write(("Seeded" if seed.created else "Found") + f" the demo project '{project.slug}'. Logins:")
        for name, password in seed.credentials.items():
            self.stdout.write(f"  {name:<6} {password}")
        for name in seed.existing_users:
            self.stdout.write(
                f"  {name:<6} is an account that existed before the demo: left as it is, with no demo password."
            )
