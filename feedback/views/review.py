"""The reviewer's queue and one item's page, where reviewers and managers record or undo a verdict.

Plain forms that post and redirect back to the item (saying what changed); a mistake renders the item
again with a 400 naming the field. The same services as the API's review endpoints.
"""

from __future__ import annotations

from typing import Any

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.contrib.auth.models import User
from django.core.exceptions import ValidationError
from django.core.paginator import Paginator
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_GET, require_POST

from feedback.ids import whole_number
from feedback.models import Adjudication, Membership, Project
from feedback.selectors.access import project_for_role
from feedback.selectors.review import STATES, prompt_previews, review_item, review_queue
from feedback.services.adjudications import NOTE_MAX, adjudication_record, adjudication_undo

PAGE_SIZE = 50
PAIRWISE_LABELS = {
    "a": "A is better",
    "b": "B is better",
    "tie": "Tie",
    "both_bad": "Both bad",
    "unusable": "Unusable (leave it out of training)",
}
VERDICT_KEYS = ("1", "2", "3", "4", "u")  # as the annotate page's keys, and u for unusable


@login_required
@require_GET
def review_page(request: HttpRequest, slug: str) -> HttpResponse:
    """The queue: open items (no verdict in force) or adjudicated ones, most contentious first, 50 a page."""
    project = project_for_role(user=request.user, slug=slug, role=Membership.Role.REVIEWER)
    state = request.GET.get("state", "open")
    if state not in STATES:
        state = "open"
    paginator = Paginator(review_queue(project=project, state=state), PAGE_SIZE)
    page = paginator.get_page(whole_number(request.GET.get("page", "1")) or 1)
    previews = prompt_previews(prompt_ids=[item.prompt_id for item in page])
    context = {
        "project": project,
        "state": state,
        "states": STATES,
        "page": page,
        "rows": [(item, previews.get(item.prompt_id, "")) for item in page],
    }
    return render(request, "review.html", context)


@login_required
@require_GET
def review_item_page(request: HttpRequest, slug: str, item_key: str) -> HttpResponse:
    project = project_for_role(user=request.user, slug=slug, role=Membership.Role.REVIEWER)
    return _render_item(request, project, item_key)


def _render_item(
    request: HttpRequest,
    project: Project,
    item_key: str,
    *,
    errors: dict[str, list[str]] | None = None,
    status: int = 200,
) -> HttpResponse:
    try:
        item = review_item(project=project, item_key=item_key)
    except Http404:
        if not errors:
            raise
        # a verdict on an item that cannot be reviewed: say why, on the page the form was on
        unreviewable = {"project": project, "item": None, "item_key": item_key, "errors": errors}
        return render(request, "review_item.html", unreviewable, status=status)
    given = request.POST if request.method == "POST" else {}
    in_force_ranks = (item.verdict.ranks or {}) if item.verdict else {}
    context: dict[str, Any] = {
        "project": project,
        "item": item,
        "errors": errors or {},
        "given_verdict": given.get("verdict", item.verdict.verdict if item.verdict else ""),
        "rank_rows": [
            (completion, str(given.get(f"rank-{completion.id}", "") or in_force_ranks.get(str(completion.id), "")))
            for completion in item.completions
        ],
        "given_note": given.get("note", ""),
        "note_max": NOTE_MAX,
        "rank_choices": [str(n) for n in range(1, len(item.completions) + 1)],
        "verdict_options": [
            (value, PAIRWISE_LABELS[value], key) for value, key in zip(item.verdicts, VERDICT_KEYS, strict=True)
        ]
        if item.kind == "pairwise"
        else [],
    }
    return render(request, "review_item.html", context, status=status)


@login_required
@require_POST
def review_verdict(request: HttpRequest, slug: str, item_key: str) -> HttpResponse:
    """Record a verdict: `verdict`, for a ranking `rank-<completion id>` per completion, and an optional `note`."""
    project = project_for_role(user=request.user, slug=slug, role=Membership.Role.REVIEWER)
    verdict = request.POST.get("verdict", "")
    ranks = None
    if verdict == Adjudication.Verdict.RANKING:
        ranks = {
            name.removeprefix("rank-"): whole_number(str(value)) if value else None
            for name, value in request.POST.items()
            if name.startswith("rank-")
        }
    try:
        recorded = adjudication_record(
            project=project,
            reviewer=_user(request),
            item_key=item_key,
            verdict=verdict,
            ranks=ranks,
            note=request.POST.get("note", ""),
        )
    except ValidationError as error:
        return _render_item(request, project, item_key, errors=_errors(error), status=400)
    messages.success(request, f"Verdict “{recorded.get_verdict_display()}” is in force on {recorded.item_key}.")
    return redirect("review-item", slug=project.slug, item_key=recorded.item_key)


@login_required
@require_POST
def review_undo(request: HttpRequest, slug: str, item_key: str) -> HttpResponse:
    project = project_for_role(user=request.user, slug=slug, role=Membership.Role.REVIEWER)
    try:
        undone = adjudication_undo(project=project, user=_user(request), item_key=item_key)
    except ValidationError as error:
        return _render_item(request, project, item_key, errors=_errors(error), status=400)
    messages.success(request, f"Verdict undone on {undone.item_key}: the annotators' votes count again.")
    return redirect("review-item", slug=project.slug, item_key=undone.item_key)


def _user(request: HttpRequest) -> User:
    assert isinstance(request.user, User)  # login_required
    return request.user


def _errors(error: ValidationError) -> dict[str, list[str]]:
    return error.message_dict if hasattr(error, "error_dict") else {"verdict": error.messages}
