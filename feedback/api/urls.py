from django.urls import path, re_path

from feedback.api import annotation, exports, projects

app_name = "api"

urlpatterns: list = [
    path("projects/", projects.ProjectListApi.as_view(), name="projects"),
    path("projects/<slug:slug>/", projects.ProjectDetailApi.as_view(), name="project"),
    path("projects/<slug:slug>/prompts/", projects.PromptsApi.as_view(), name="project-prompts"),
    path("projects/<slug:slug>/completions/", projects.CompletionListApi.as_view(), name="project-completions"),
    path("projects/<slug:slug>/model-versions/", projects.ModelVersionListApi.as_view(), name="project-model-versions"),
    path("projects/<slug:slug>/next-task/", annotation.NextTaskApi.as_view(), name="project-next-task"),
    path("projects/<slug:slug>/judgements/", annotation.JudgementSubmitApi.as_view(), name="project-judgements"),
    path("projects/<slug:slug>/export/", exports.ExportApi.as_view(), name="project-export"),
    re_path(r"^exports/(?P<job_id>[0-9a-f]{32})/$", exports.ExportJobApi.as_view(), name="export-job"),
    re_path(
        r"^exports/(?P<job_id>[0-9a-f]{32})/download/$", exports.ExportDownloadApi.as_view(), name="export-download"
    ),
]
