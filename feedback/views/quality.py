"""The Quality page: a project's agreement and annotator statistics, for its reviewers and managers."""

from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.contrib.auth.models import User
from django.core.exceptions import ValidationError
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_GET, require_POST

from feedback.models import AnnotatorExclusion, Membership
from feedback.selectors.access import project_for_role, user_manages_project
from feedback.selectors.quality import FILTER_NAMES, GOLD_NOTE, project_quality_cached, quality_filters_parse
from feedback.services.annotators import annotator_exclude, annotator_include


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
        "manages": user_manages_project(user=request.user, project=project),
        "excluded": set(
            AnnotatorExclusion.objects.filter(project=project).values_list("annotator__username", flat=True)
        ),
    }
    try:
        filters = quality_filters_parse(project=project, data=given)
    except ValidationError as error:
        context["errors"] = error.message_dict
        return render(request, "quality.html", context, status=400)
    context["report"] = project_quality_cached(project=project, filters=filters)
    return render(request, "quality.html", context)


@login_required
@require_POST
def quality_annotator_exclusion(request: HttpRequest, slug: str, username: str) -> HttpResponse:
    """The Quality page's Exclude / Include button (managers): then back to the page, saying what changed."""
    project = project_for_role(user=request.user, slug=slug, role=Membership.Role.MANAGER)
    include = request.POST.get("action") == "include"
    try:
        if include:
            annotator_include(project=project, username=username)
        else:
            by = request.user if isinstance(request.user, User) else None
            annotator_exclude(project=project, username=username, by=by, reason=request.POST.get("reason", ""))
    except ValidationError as error:
        messages.error(request, " ".join(error.messages))
        return redirect("quality", slug=project.slug)
    if include:
        messages.success(request, f"{username}'s judgements count again in exports, training and battles.")
    else:
        messages.success(request, f"{username}'s judgements are left out of exports, training and battles.")
    return redirect("quality", slug=project.slug)
