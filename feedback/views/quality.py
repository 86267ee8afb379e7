"""The Quality page: a project's agreement and annotator statistics, for its reviewers and managers."""

from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.core.exceptions import ValidationError
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET

from feedback.models import Membership
from feedback.selectors.access import project_for_role
from feedback.selectors.quality import FILTER_NAMES, GOLD_NOTE, project_quality_cached, quality_filters_parse


@login_required
@require_GET
def quality_page(request: HttpRequest, slug: str) -> HttpResponse:
    """The same figures as GET /api/v1/projects/{slug}/quality/, with the same filters in the query string."""
    project = project_for_role(user=request.user, slug=slug, role=Membership.Role.REVIEWER)
    given: dict[str, str] = {name: str(value) for name, value in request.GET.items() if value != ""}
    context = {
        "project": project,
        "given": given,
        "filter_names": FILTER_NAMES,
        "versions": project.model_versions.order_by("name").values_list("name", flat=True),
        "gold": GOLD_NOTE,
    }
    try:
        filters = quality_filters_parse(project=project, data=given)
    except ValidationError as error:
        context["errors"] = error.message_dict
        return render(request, "quality.html", context, status=400)
    context["report"] = project_quality_cached(project=project, filters=filters)
    return render(request, "quality.html", context)
