import json
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.db.models import JSONField, QuerySet
from django.forms.models import BaseInlineFormSet
from django.http import HttpRequest

from feedback import models
from feedback.selectors.models import completion_newest_reward_scores
from feedback.services.completions import completion_save
from feedback.services.prompts import completion_check, prompt_check, prompts_split_set
from feedback.services.training_runs import TrainingRunError, training_run_cancel, training_run_start


class MembershipInline(admin.TabularInline):
    model = models.Membership
    extra = 0
    autocomplete_fields = ["user"]


@admin.register(models.Project)
class ProjectAdmin(admin.ModelAdmin):
    list_display = ["name", "slug", "mode", "completions_per_prompt", "overlap", "auto_train", "created_at"]
    list_filter = ["mode", "auto_train"]
    search_fields = ["name", "slug"]
    prepopulated_fields = {"slug": ["name"]}
    inlines = [MembershipInline]
    actions = ["retrain_now"]

    @admin.action(description="Retrain now (the project's algorithm and settings)")
    def retrain_now(self, request: HttpRequest, queryset: QuerySet[models.Project]) -> None:
        for project in queryset:
            try:
                run = training_run_start(
                    project=project,
                    triggered_by=request.user if request.user.is_authenticated else None,
                    trigger=models.TrainingRun.Trigger.ADMIN,
                )
            except TrainingRunError as error:
                self.message_user(request, f"{project.name}: {error}", level=messages.ERROR)
            else:
                self.message_user(
                    request, f"{project.name}: run {run.pk} ({run.algorithm}) is queued.", messages.SUCCESS
                )


@admin.register(models.Membership)
class MembershipAdmin(admin.ModelAdmin):
    list_display = ["user", "project", "role"]
    list_filter = ["role", "project"]
    autocomplete_fields = ["user", "project"]


class ShownJSONField(forms.JSONField):
    """Django's JSON form field, except that text a page cannot hold (a lone surrogate) is shown escaped."""

    def prepare_value(self, value: Any) -> Any:
        shown = super().prepare_value(value)
        try:
            shown.encode()
        except UnicodeEncodeError:  # refused, or stored before the checks: escaped, it stays visible and editable
            return json.dumps(value, cls=self.encoder)
        return shown


class PromptAdminForm(forms.ModelForm):
    """A prompt passes the import's checks (text the pages can show, the RANKWISE_MAX_* limits) to be saved."""

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean() or {}
        if {"messages", "external_id", "metadata"} <= cleaned.keys():  # the fields parsed
            cleaned["messages"] = prompt_check(
                messages=cleaned["messages"], external_id=cleaned["external_id"], metadata=cleaned["metadata"]
            )
        return cleaned


class CompletionAdminForm(forms.ModelForm):
    """A completion passes the import's checks (text the pages can show, the RANKWISE_MAX_* limits) to be saved."""

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean() or {}
        if "text" in cleaned:
            completion_check(text=cleaned["text"], source_model=cleaned.get("source_model") or "")
        return cleaned


class CompletionInline(admin.StackedInline):
    model = models.Completion
    form = CompletionAdminForm
    extra = 0
    fields = ["round", "text", "source_model", "model_version", "generation_params"]
    readonly_fields = ["model_version", "generation_params"]
    raw_id_fields = ["round"]


@admin.register(models.Prompt)
class PromptAdmin(admin.ModelAdmin):
    form = PromptAdminForm
    formfield_overrides = {JSONField: {"form_class": ShownJSONField}}
    list_display = ["__str__", "project", "external_id", "split", "created_at"]
    list_filter = ["project", "split"]
    search_fields = ["external_id"]
    list_select_related = ["project"]
    inlines = [CompletionInline]
    actions = ["mark_as_evaluation", "mark_as_training"]

    @admin.action(description="Mark as evaluation prompts (never trained on)")
    def mark_as_evaluation(self, request: HttpRequest, queryset: QuerySet[models.Prompt]) -> None:
        changed = prompts_split_set(prompts=queryset, split=models.Prompt.Split.EVAL)
        self.message_user(request, f"{changed} prompt(s) marked as evaluation prompts.", messages.SUCCESS)

    @admin.action(description="Mark as training prompts")
    def mark_as_training(self, request: HttpRequest, queryset: QuerySet[models.Prompt]) -> None:
        changed = prompts_split_set(prompts=queryset, split=models.Prompt.Split.TRAIN)
        self.message_user(request, f"{changed} prompt(s) marked as training prompts.", messages.SUCCESS)

    def save_formset(
        self, request: HttpRequest, form: forms.ModelForm, formset: BaseInlineFormSet, change: bool
    ) -> None:
        if formset.model is not models.Completion:
            super().save_formset(request, form, formset, change)
            return
        for completion in formset.save(commit=False):
            completion_save(completion=completion)
        for removed in formset.deleted_objects:
            removed.delete()


@admin.register(models.Completion)
class CompletionAdmin(admin.ModelAdmin):
    form = CompletionAdminForm
    list_display = ["__str__", "prompt", "round", "source_model", "model_version", "reward", "created_at"]
    list_filter = ["prompt__project", "source_model"]
    readonly_fields = ["html"]
    raw_id_fields = ["prompt", "round"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[models.Completion]:
        return super().get_queryset(request).annotate(reward=completion_newest_reward_scores())

    @admin.display(description="reward", ordering="reward", empty_value="—")
    def reward(self, completion: models.Completion) -> str | None:
        """The project's newest reward model's score; empty before one is trained or while it scores."""
        score = getattr(completion, "reward", None)
        return None if score is None else f"{score:.3f}"

    def save_model(self, request: HttpRequest, obj: models.Completion, form: forms.ModelForm, change: bool) -> None:
        completion_save(completion=obj)


@admin.register(models.Assignment)
class AssignmentAdmin(admin.ModelAdmin):
    list_display = ["item_key", "annotator", "state", "slot", "expires_at"]
    list_filter = ["project", "state"]
    raw_id_fields = ["prompt", "completion_a", "completion_b"]


@admin.register(models.PairwiseJudgement)
class PairwiseJudgementAdmin(admin.ModelAdmin):
    list_display = ["item_key", "annotator", "choice", "strength", "time_ms", "created_at"]
    list_filter = ["project", "choice"]
    raw_id_fields = ["prompt", "left", "right", "assignment"]


class RankedCompletionInline(admin.TabularInline):
    model = models.RankedCompletion
    extra = 0
    raw_id_fields = ["completion"]


@admin.register(models.RankingJudgement)
class RankingJudgementAdmin(admin.ModelAdmin):
    list_display = ["prompt", "annotator", "time_ms", "created_at"]
    list_filter = ["project"]
    raw_id_fields = ["prompt", "assignment"]
    inlines = [RankedCompletionInline]


@admin.register(models.ModelVersion)
class ModelVersionAdmin(admin.ModelAdmin):
    list_display = ["name", "project", "kind", "is_active", "parent", "created_at"]
    list_filter = ["project", "kind", "is_active"]


@admin.register(models.TrainingRun)
class TrainingRunAdmin(admin.ModelAdmin):
    list_display = ["id", "project", "algorithm", "status", "step", "total_steps", "trigger", "created_at"]
    list_filter = ["project", "status", "algorithm"]
    actions = ["cancel_runs"]

    @admin.action(description="Cancel the selected queued or running runs")
    def cancel_runs(self, request: HttpRequest, queryset: QuerySet[models.TrainingRun]) -> None:
        for run in queryset:
            try:
                run = training_run_cancel(run=run)
            except TrainingRunError as error:
                self.message_user(request, f"Run {run.pk}: {error}", level=messages.ERROR)
            else:
                done = (
                    "cancelled" if run.status == models.TrainingRun.Status.CANCELLED else "stops before its next step"
                )
                self.message_user(request, f"Run {run.pk} {done}.", messages.SUCCESS)

    readonly_fields = [
        "metrics",
        "error",
        "data_counts",
        "data_hash",
        "heartbeat_at",
        "started_at",
        "finished_at",
    ]
