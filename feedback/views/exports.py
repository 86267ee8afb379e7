"""The export page: a project's managers and staff pick the options and download the dataset.

A JSONL export streams straight from the API; a file (Parquet, or JSONL for very large sets)
is built by the worker, and the page shows its status and then the download link.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlencode

from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_http_methods

from feedback.models import Membership
from feedback.selectors.access import project_for_role
from feedback.selectors.preferences import PreferenceExportOptions
from feedback.services.exports import FILE_TYPES, export_job_get, export_job_start
from feedback.views.forms import ExportForm

ACTIONS = ("link", *FILE_TYPES)  # a download link to the streamed export, or a file the worker builds


def _api_query(options: PreferenceExportOptions) -> str:
    """The options as the export API's query string (booleans as true/false, lists as repeated names)."""
    params = [
        (name, json.dumps(item) if isinstance(item, bool) else item)
        for name, value in options.as_mapping().items()
        for item in (value if isinstance(value, list) else [value])
    ]
    return urlencode(params)


@login_required
@require_http_methods(["GET", "POST"])
def export_page(request: HttpRequest, slug: str) -> HttpResponse:
    """GET shows the options (and a file job's status); POST makes a download link or starts a file job."""
    project = project_for_role(user=request.user, slug=slug, role=Membership.Role.MANAGER)
    form = ExportForm(request.POST if request.method == "POST" else None, project=project)
    action = request.POST.get("action")
    context: dict[str, Any] = {"project": project, "form": form, "download_url": None, "job": None}
    if request.method == "POST":
        if action not in ACTIONS or not form.is_valid():
            context["action_error"] = action not in ACTIONS
            return render(request, "export.html", context, status=400)
        if action == "link":
            context["download_url"] = (
                f"{reverse('api:project-export', args=[project.slug])}?{_api_query(form.options())}"
            )
            return render(request, "export.html", context)
        started = export_job_start(
            project=project, options=form.options(), file_type=action, requested_by_id=request.user.pk
        )
        return redirect(f"{reverse('export', args=[project.slug])}?job={started.id}")
    job = export_job_get(job_id=request.GET.get("job", ""))
    if job is not None and job.project_id == project.pk:
        context["job"] = job
        context["job_download_url"] = reverse("api:export-download", args=[job.id])
    return render(request, "export.html", context)
