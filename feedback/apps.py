from django.apps import AppConfig
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db.models import CharField


class FeedbackConfig(AppConfig):
    name = "feedback"
    verbose_name = "Rankwise"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # The deploy checks, and the huey tasks in every process so that feedback.queue can send them by name.
        from feedback import checks, tasks  # noqa: F401

        # A longer limit would let a model name pass the import's check and then fail to save.
        source_model = self.get_model("Completion")._meta.get_field("source_model")
        assert isinstance(source_model, CharField) and source_model.max_length is not None
        column = source_model.max_length
        if column < settings.RANKWISE_MAX_MODEL_NAME_CHARS:
            raise ImproperlyConfigured(
                f"RANKWISE_MAX_MODEL_NAME_CHARS must be at most {column} (the length of Completion.source_model), "
                f"not {settings.RANKWISE_MAX_MODEL_NAME_CHARS}"
            )
