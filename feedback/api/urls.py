from django.urls import path

from feedback.api import annotation, evaluations, exports, projects, quality, review, rounds, training

app_name = "api"

urlpatterns: list = [
    path("projects/", projects.ProjectListApi.as_view(), name="projects"),
    path("projects/<str:slug>/", projects.ProjectDetailApi.as_view(), name="project"),
    path("projects/<str:slug>/prompts/", projects.PromptsApi.as_view(), name="project-prompts"),
    path(
        "projects/<str:slug>/prompts/<str:prompt_id>/gold/",
        projects.PromptGoldApi.as_view(),
        name="project-prompt-gold",
    ),
    path("projects/<str:slug>/completions/", projects.CompletionListApi.as_view(), name="project-completions"),
    path("projects/<str:slug>/model-versions/", projects.ModelVersionListApi.as_view(), name="project-model-versions"),
    path(
        "projects/<str:slug>/model-versions/<str:version_name>/side-by-side/",
        training.ModelVersionSideBySideApi.as_view(),
        name="project-model-version-side-by-side",
    ),
    path("projects/<str:slug>/next-task/", annotation.NextTaskApi.as_view(), name="project-next-task"),
    path("projects/<str:slug>/judgements/", annotation.JudgementSubmitApi.as_view(), name="project-judgements"),
    path("projects/<str:slug>/export/", exports.ExportApi.as_view(), name="project-export"),
    path("projects/<str:slug>/exports/", exports.ExportJobsApi.as_view(), name="project-exports"),
    path(
        "model-versions/<str:version_id>/promote/",
        projects.ModelVersionPromoteApi.as_view(),
        name="model-version-promote",
    ),
    path("projects/<str:slug>/quality/", quality.QualityApi.as_view(), name="project-quality"),
    path(
        "projects/<str:slug>/quality/annotators/<str:username>/",
        quality.AnnotatorQualityApi.as_view(),
        name="project-quality-annotator",
    ),
    path(
        "projects/<str:slug>/annotators/<str:username>/exclude/",
        quality.AnnotatorExcludeApi.as_view(),
        name="project-annotator-exclude",
    ),
    path(
        "projects/<str:slug>/annotators/<str:username>/include/",
        quality.AnnotatorIncludeApi.as_view(),
        name="project-annotator-include",
    ),
    path("projects/<str:slug>/review/", review.ReviewQueueApi.as_view(), name="project-review"),
    path("projects/<str:slug>/review/<str:item_key>/", review.ReviewItemApi.as_view(), name="project-review-item"),
    path(
        "projects/<str:slug>/review/<str:item_key>/verdict/",
        review.ReviewVerdictApi.as_view(),
        name="project-review-verdict",
    ),
    path("projects/<str:slug>/review/<str:item_key>/undo/", review.ReviewUndoApi.as_view(), name="project-review-undo"),
    path("projects/<str:slug>/rounds/", rounds.RoundListApi.as_view(), name="project-rounds"),
    path("projects/<str:slug>/evaluations/", evaluations.EvaluationStartApi.as_view(), name="project-evaluations"),
    path("projects/<str:slug>/leaderboard/", evaluations.LeaderboardApi.as_view(), name="project-leaderboard"),
    path("projects/<str:slug>/training-runs/", training.TrainingRunListApi.as_view(), name="project-training-runs"),
    path("training-runs/<str:run_id>/", training.TrainingRunDetailApi.as_view(), name="training-run"),
    path("training-runs/<str:run_id>/cancel/", training.TrainingRunCancelApi.as_view(), name="training-run-cancel"),
    path("exports/<str:job_id>/", exports.ExportJobApi.as_view(), name="export-job"),
    path("exports/<str:job_id>/download/", exports.ExportDownloadApi.as_view(), name="export-download"),
]
