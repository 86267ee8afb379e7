from django.contrib import admin

from feedback import models


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


@admin.register(models.Membership)
class MembershipAdmin(admin.ModelAdmin):
    list_display = ["user", "project", "role"]
    list_filter = ["role", "project"]
    autocomplete_fields = ["user", "project"]


class CompletionInline(admin.StackedInline):
    model = models.Completion
    extra = 0
    fields = ["text", "source_model", "model_version", "generation_params"]
    readonly_fields = ["model_version", "generation_params"]


@admin.register(models.Prompt)
class PromptAdmin(admin.ModelAdmin):
    list_display = ["__str__", "project", "external_id", "created_at"]
    list_filter = ["project"]
    search_fields = ["external_id"]
    list_select_related = ["project"]
    inlines = [CompletionInline]


@admin.register(models.Completion)
class CompletionAdmin(admin.ModelAdmin):
    list_display = ["__str__", "prompt", "source_model", "model_version", "created_at"]
    list_filter = ["prompt__project", "source_model"]
    readonly_fields = ["html"]
    raw_id_fields = ["prompt"]


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
    list_display = ["name", "project", "is_active", "parent", "created_at"]
    list_filter = ["project", "is_active"]


@admin.register(models.TrainingRun)
class TrainingRunAdmin(admin.ModelAdmin):
    list_display = ["id", "project", "algorithm", "status", "step", "total_steps", "trigger", "created_at"]
    list_filter = ["project", "status", "algorithm"]
    readonly_fields = [
        "metrics",
        "error",
        "data_counts",
        "data_hash",
        "heartbeat_at",
        "started_at",
        "finished_at",
    ]
