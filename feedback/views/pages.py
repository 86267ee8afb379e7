from django.contrib.auth.decorators import login_required
from django.contrib.auth.models import User
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from feedback.selectors.projects import project_list_for_user
from feedback.selectors.tasks import task_progress


class AuthenticatedRequest(HttpRequest):
    user: User


@login_required
def home(request: AuthenticatedRequest) -> HttpResponse:
    """The user's projects (every project for staff) with their progress and a way in."""
    projects = [
        (project, task_progress(project=project, annotator=request.user))
        for project in project_list_for_user(user=request.user)
    ]
    return render(request, "home.html", {"projects": projects})
