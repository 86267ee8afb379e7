from django.apps import AppConfig


class FeedbackConfig(AppConfig):
    name = "feedback"
    verbose_name = "Rankwise"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from feedback import checks  # noqa: F401  (registers the deploy checks)
