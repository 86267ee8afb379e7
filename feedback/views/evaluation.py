"""The Models page: a project's versions ranked by blind battles, each version's gate, and a form to start a battle.

Reviewers, managers and staff look (it names which version won what; annotators judge the battles
blind and never see it); managers and staff start battles. Starting one is a plain form post that
redirects back to the page with what was queued or why nothing was.
"""

from __future__ import annotations

from django import forms
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import ValidationError
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_GET, require_POST

from feedback.models import Membership, ModelVersion, Project, Round
from feedback.selectors.access import project_for_role, user_manages_project
from feedback.selectors.battles import BASE, battle_rows, battle_writer_answers
from feedback.selectors.leaderboard import leaderboard
from feedback.services.rounds import MAX_ROUND_PROMPTS, MIN_BATTLE_PROMPTS, battle_request, round_enqueue


class EvaluationForm(forms.Form):
    candidate = forms.CharField(max_length=100)
    against = forms.CharField(max_length=100, required=False)
    prompts = forms.IntegerField(required=False, min_value=MIN_BATTLE_PROMPTS, max_value=MAX_ROUND_PROMPTS)


def _heat(rate: float) -> int:
    """A win rate as one of eleven colour steps (CSS classes heat-0 to heat-10; inline styles are not allowed)."""
    return round(rate * 10)


@login_required
@require_GET
def models_page(request: HttpRequest, slug: str) -> HttpResponse:
    project = project_for_role(user=request.user, slug=slug, role=Membership.Role.REVIEWER)
    return _render(request, project)


def _render(
    request: HttpRequest, project: Project, *, form: EvaluationForm | None = None, status: int = 200
) -> HttpResponse:
    rows = list(battle_rows(project=project))
    board = leaderboard([row.battle() for row in rows], anchor=BASE)
    names = [model["name"] for model in board["models"]]
    matrix = []  # (row name, [(column name, row's win rate over it or None, its colour step)])
    for name in names:
        rates = [board["matrix"].get(name, {}).get(other) for other in names]
        matrix.append(
            (
                name,
                [
                    (other, rate, None if rate is None else _heat(rate))
                    for other, rate in zip(names, rates, strict=True)
                ],
            )
        )
    figures = battle_writer_answers(project=project, rows=rows)
    versions = list(ModelVersion.objects.filter(project=project, kind=ModelVersion.Kind.POLICY).order_by("-created_at"))
    context = {
        "project": project,
        "manages": user_manages_project(user=request.user, project=project),
        "board": board,
        "chart": [
            {"name": m["name"], "score": m["score"], "ci_low": m["ci_low"], "ci_high": m["ci_high"]}
            for m in board["models"]
        ],
        "matrix": matrix,
        "models": [{**model, "figures": figures.get(model["name"])} for model in board["models"]],
        "versions": versions,
        "battles_open": Round.objects.filter(
            project=project, kind=Round.Kind.BATTLE, status__in=[Round.Status.QUEUED, Round.Status.RUNNING]
        ).first(),
        "evaluation_prompts": project.prompts.filter(split="eval").count(),
        "min_prompts": MIN_BATTLE_PROMPTS,
        "form": form or EvaluationForm(),
    }
    return render(request, "models.html", context, status=status)


@login_required
@require_POST
def models_evaluate(request: HttpRequest, slug: str) -> HttpResponse:
    project = project_for_role(user=request.user, slug=slug, role=Membership.Role.MANAGER)
    form = EvaluationForm(request.POST)
    if not form.is_valid():
        return _render(request, project, form=form, status=400)
    data = form.cleaned_data
    try:
        battle = battle_request(
            project=project, candidate=data["candidate"], against=data["against"] or None, prompts=data["prompts"]
        )
    except ValidationError as error:
        for field, problems in error.message_dict.items():
            form.add_error(field if field in form.fields else None, " ".join(problems))
        return _render(request, project, form=form, status=400)
    round_enqueue(round=battle)
    one, other = battle.writers
    messages.success(request, f"Battle round {battle.number} is queued: {one} against {other}, judged blind.")
    return redirect("models", slug=project.slug)
