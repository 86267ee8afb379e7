"""The export page: a project's managers and staff pick the options and download the dataset.

A JSONL export streams straight from the API; a file (Parquet, or JSONL for very large sets)
is built by the worker, and the page shows its status and then the download link.
"""

from __future__ import annotations

from datetime import datetime, time, timedelta
from typing import Any, cast
from urllib.parse import urlencode

from django import forms
from django.contrib.auth import get_user_model
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.http import require_http_methods

from feedback.models import Membership, ModelVersion, Project
from feedback.selectors.access import project_for_role
from feedback.selectors.preferences import FORMATS, PAIR_MODES, PreferenceExportOptions
from feedback.services.exports import export_job_get, export_job_start


class ExportForm(forms.Form):
    format = forms.ChoiceField(choices=[(f, f) for f in FORMATS], initial="dpo")
    pairs = forms.ChoiceField(
        choices=[(m, m.replace("_", " ")) for m in PAIR_MODES], initial="all", help_text="dpo: pairs from rankings"
    )
    conversational = forms.BooleanField(required=False, help_text="message lists instead of strings")
    min_agreement = forms.FloatField(min_value=0, max_value=1, initial=0, help_text="dpo: leave out pairs below this")
    created_from = forms.DateField(required=False, help_text="judgements from this day")
    created_until = forms.DateField(required=False, help_text="to this day, inclusive")
    annotators = forms.ModelMultipleChoiceField(queryset=get_user_model().objects.none(), required=False)
    model_versions = forms.ModelMultipleChoiceField(queryset=ModelVersion.objects.none(), required=False)
    split = forms.ChoiceField(choices=[("", "all prompts"), ("train", "train"), ("test", "test")], required=False)
    test_fraction = forms.FloatField(min_value=0.001, max_value=0.999, initial=0.1)
    pseudonymise = forms.BooleanField(required=False, help_text="judgements: pseudonyms instead of user ids")

    def __init__(self, *args: Any, project: Project, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        annotators = cast(forms.ModelMultipleChoiceField, self.fields["annotators"])
        annotators.queryset = get_user_model().objects.filter(memberships__project=project)
        versions = cast(forms.ModelMultipleChoiceField, self.fields["model_versions"])
        versions.queryset = project.model_versions.all()

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean() or {}
        start, end = cleaned.get("created_from"), cleaned.get("created_until")
        if start and end and start > end:
            self.add_error("created_until", "must not be before the first day")
        return cleaned

    def _moments(self) -> tuple[datetime | None, datetime | None]:
        start, end = self.cleaned_data.get("created_from"), self.cleaned_data.get("created_until")
        zone = timezone.get_current_timezone()
        first = datetime.combine(start, time.min, tzinfo=zone) if start else None
        after = datetime.combine(end, time.min, tzinfo=zone) + timedelta(days=1) if end else None
        return first, after

    def options(self) -> PreferenceExportOptions:
        data = self.cleaned_data
        created_from, created_before = self._moments()
        return PreferenceExportOptions(
            format=data["format"],
            conversational=data["conversational"],
            pairs=data["pairs"],
            min_agreement=data["min_agreement"],
            created_from=created_from,
            created_before=created_before,
            annotator_ids=tuple(u.pk for u in data["annotators"]) or None,
            model_version_ids=tuple(v.pk for v in data["model_versions"]) or None,
            split=data["split"] or None,
            test_fraction=data["test_fraction"],
            pseudonymise=data["pseudonymise"],
        )

    def api_query(self) -> str:
        """The same options as query parameters of the export API."""
        options = self.options()
        params: list[tuple[str, Any]] = [
            ("format", options.format),
            ("pairs", options.pairs),
            ("conversational", str(options.conversational).lower()),
            ("min_agreement", options.min_agreement),
            ("test_fraction", options.test_fraction),
            ("pseudonymise", str(options.pseudonymise).lower()),
        ]
        if options.created_from:
            params.append(("created_from", options.created_from.isoformat()))
        if options.created_before:
            params.append(("created_before", options.created_before.isoformat()))
        params += [("annotators", pk) for pk in options.annotator_ids or ()]
        params += [("model_versions", pk) for pk in options.model_version_ids or ()]
        if options.split:
            params.append(("split", options.split))
        return urlencode(params)


ACTIONS = ("link", "parquet", "jsonl")


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
            context["download_url"] = f"{reverse('api:project-export', args=[project.slug])}?{form.api_query()}"
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
