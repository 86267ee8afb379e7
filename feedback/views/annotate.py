"""The annotate page: one task on screen, the next one already leased and hidden behind it.

Plain form posts work without JavaScript (post, redirect, show the next task). With htmx the
page swaps in a freshly prefetched task after each submit or skip, and tells the counters
through an HX-Trigger event; the script shows the prefetched task at once.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.contrib.auth.models import User
from django.core.exceptions import ValidationError
from django.http import HttpRequest, HttpResponse, HttpResponseBadRequest
from django.shortcuts import redirect, render
from django.template.loader import render_to_string
from django.urls import reverse
from django.views.decorators.http import require_GET, require_POST
from django_htmx.middleware import HtmxDetails

from feedback.ids import id_from
from feedback.models import Membership, Project, Round
from feedback.selectors.access import project_for_role
from feedback.selectors.gold import gold_feedback
from feedback.selectors.projects import generation_progress
from feedback.selectors.tasks import Task, task_kind_by_id, task_progress
from feedback.services.assignments import assignment_lease_next, assignment_lease_renew, assignment_skip
from feedback.services.judgements import JudgementSubmission, judgement_submit
from feedback.views.forms import JudgementForm, SkipForm

BAD_SHOWN = "shown: expected the ids of the tasks on the page, whole numbers"
SHORTCUTS = {
    "pairwise": [
        ("1", "A is better"),
        ("2", "B is better"),
        ("3", "Tie"),
        ("4", "Both bad"),
        ("S / C", "Slightly / clearly (press again to clear)"),
    ],
    "ranking": [
        ("↑ / ↓", "Focus the previous / next completion"),
        ("Shift + ↑ / ↓", "Move the focused completion up / down"),
        ("T", "Tie the focused completion with the one above"),
        ("U", "Untie the focused completion"),
    ],
    "common": [
        ("Enter", "Submit (Ctrl + Enter inside the rationale)"),
        ("K", "Skip this task"),
        ("R", "Write a rationale"),
        ("G", "Show or hide the guidelines"),
        ("?", "Show or hide this help"),
        ("Esc", "Close the help, leave a text field"),
    ],
}


class AnnotatorRequest(HttpRequest):
    """A request that went through login_required and django-htmx's middleware."""

    user: User
    htmx: HtmxDetails


def _task_context(task: Task | None) -> dict[str, Any] | None:
    if task is None:
        return None
    return {"task": task, "client_uuid": uuid.uuid4(), "ranks": range(1, len(task.completions) + 1)}


def _shortcuts(project: Project) -> list[tuple[str, str]]:
    """The keys of the project's tasks: a ranking project's battles are pairs."""
    battles = project.mode == Project.Mode.RANKING and Round.objects.filter(project=project, kind=Round.Kind.BATTLE)
    pairs = SHORTCUTS["pairwise"] if battles and battles.exists() else []
    return SHORTCUTS[project.mode] + pairs + SHORTCUTS["common"]


def _page(
    request: AnnotatorRequest,
    project: Project,
    *,
    current: Task | None,
    errors: dict[str, list[str]] | None = None,
    status: int = 200,
) -> HttpResponse:
    prefetch = (
        assignment_lease_next(project=project, annotator=request.user, exclude_ids=[current.task_id])
        if current
        else None
    )
    context = {
        "project": project,
        "progress": task_progress(project=project, annotator=request.user),
        "generating": generation_progress(project=project),
        "current": _task_context(current),
        "prefetch": _task_context(prefetch),
        "errors": errors or {},
        "shortcuts": _shortcuts(project),
        "config": {
            "mode": project.mode,
            "nextUrl": reverse("annotate-next", args=[project.slug]),
        },
    }
    return render(request, "annotate.html", context, status=status)


@login_required
@require_GET
def annotate(request: AnnotatorRequest, slug: str) -> HttpResponse:
    project = project_for_role(user=request.user, slug=slug, role=Membership.Role.ANNOTATOR)
    current = assignment_lease_next(project=project, annotator=request.user)
    if request.htmx:  # the "being written" card polling: wait on, or reload once there is a task or nothing to wait for
        generating = generation_progress(project=project)
        if current is None and generating:
            return render(request, "annotate.html#waiting", {"project": project, "generating": generating})
        response = HttpResponse()
        response["HX-Refresh"] = "true"
        return response
    return _page(request, project, current=current)


@login_required
@require_GET
def annotate_next(request: AnnotatorRequest, slug: str) -> HttpResponse:
    """A task to prefetch, other than the one the page shows (``shown``)."""
    project = project_for_role(user=request.user, slug=slug, role=Membership.Role.ANNOTATOR)
    if (shown := _shown(request)) is None:
        return HttpResponseBadRequest(BAD_SHOWN)
    return _prefetched(request, project, shown=shown)


def _shown(request: AnnotatorRequest) -> list[int] | None:
    """The ids of the tasks on the page (``shown``), or None when one of them is not an id."""
    source = request.POST if request.method == "POST" else request.GET
    numbers = [id_from(value) for value in source.getlist("shown")]
    shown = [number for number in numbers if number is not None]
    return shown if len(shown) == len(numbers) else None


def _prefetched(
    request: AnnotatorRequest, project: Project, *, shown: list[int], event: str | None = None
) -> HttpResponse:
    # the page has just put the prefetched task on screen: its lease starts again from now
    assignment_lease_renew(project=project, annotator=request.user, task_ids=shown)
    task = assignment_lease_next(project=project, annotator=request.user, exclude_ids=shown)
    response = render(request, "annotate.html#prefetched", {"project": project, "prefetch": _task_context(task)})
    if event:
        response["HX-Trigger"] = json.dumps({event: {}})
    return response


def _rejected(
    request: AnnotatorRequest, project: Project, task_id: int | None, errors: dict[str, list[str]]
) -> HttpResponse:
    if request.htmx:
        # The page has already moved on to the prefetched task; say what went wrong above it.
        response = render(request, "annotate.html#notice", {"errors": errors})
        response["HX-Retarget"] = "#notice"
        response["HX-Reswap"] = "innerHTML"
        response["HX-Trigger"] = json.dumps({"rankwise:rejected": {}})
        return response
    # the task whose answer was refused comes back first, if it is still leased to them
    current = assignment_lease_next(project=project, annotator=request.user, resume_id=task_id)
    return _page(request, project, current=current, errors=errors, status=400)


def _error_dict(error: ValidationError) -> dict[str, list[str]]:
    return error.message_dict if hasattr(error, "error_dict") else {"task_id": error.messages}


@login_required
@require_POST
def annotate_submit(request: AnnotatorRequest, slug: str) -> HttpResponse:
    project = project_for_role(user=request.user, slug=slug, role=Membership.Role.ANNOTATOR)
    if (shown := _shown(request)) is None:  # before anything is saved
        return HttpResponseBadRequest(BAD_SHOWN)
    form = JudgementForm(request.POST)
    if not form.is_valid():
        errors = {
            ("ranking" if name == "__all__" else name): [str(m) for m in messages]
            for name, messages in form.errors.items()
        }
        return _rejected(request, project, form.cleaned_data.get("task_id"), errors)
    # the page shows one task: its kind is the lease's (a battle is a pair in a ranking project too)
    kind = task_kind_by_id(project=project, task_id=form.cleaned_data["task_id"])
    submission = JudgementSubmission(kind=kind, **form.cleaned_data)
    try:
        result = judgement_submit(project=project, annotator=request.user, submission=submission)
    except ValidationError as error:
        return _rejected(request, project, submission.task_id, _error_dict(error))
    expected = gold_feedback(project=project, judgement=result.judgement) if result.created else None
    if request.htmx:
        response = _prefetched(request, project, shown=shown, event="rankwise:judged")
        if expected:  # above the next task, out of band: the page has already moved on
            notice = render_to_string("annotate.html#notice", {"gold_feedback": expected}, request=request)
            response.content += f'<div id="notice" hx-swap-oob="innerHTML">{notice}</div>'.encode()
        return response
    if expected:
        messages.info(request, expected)
    return redirect("annotate", slug=project.slug)


@login_required
@require_POST
def annotate_skip(request: AnnotatorRequest, slug: str) -> HttpResponse:
    project = project_for_role(user=request.user, slug=slug, role=Membership.Role.ANNOTATOR)
    if (shown := _shown(request)) is None:  # before anything is saved
        return HttpResponseBadRequest(BAD_SHOWN)
    form = SkipForm(request.POST)
    if not form.is_valid():
        return _rejected(request, project, None, {k: [str(m) for m in v] for k, v in form.errors.items()})
    data = form.cleaned_data
    try:
        assignment_skip(project=project, annotator=request.user, task_id=data["task_id"], reason=data["reason"])
    except ValidationError as error:
        return _rejected(request, project, data["task_id"], _error_dict(error))
    if request.htmx:
        return _prefetched(request, project, shown=shown, event="rankwise:skipped")
    return redirect("annotate", slug=project.slug)
