from django.contrib.auth.decorators import login_required
from django.contrib.auth.models import User
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django_htmx.middleware import HtmxDetails

from feedback.selectors.projects import generation_progress, project_list_for_user
from feedback.selectors.tasks import task_progress


class AuthenticatedRequest(HttpRequest):
    """A request that went through login_required and django-htmx's middleware."""

    user: User
    htmx: HtmxDetails


@login_required
def home(request: AuthenticatedRequest) -> HttpResponse:
    """The user's projects (every project for staff) with their progress and a way in.

    While the worker writes completions for a project, its row counts the prompts that have
    them, and the table refreshes itself (htmx) until the writing ends.
    """
    rows = [
        (project, task_progress(project=project, annotator=request.user), generation_progress(project=project))
        for project in project_list_for_user(user=request.user)
    ]
    context = {"projects": rows, "writing": any(generating for _, _, generating in rows)}
    return render(request, "home.html#projects" if request.htmx else "home.html", context)
