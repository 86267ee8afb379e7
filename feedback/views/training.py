"""The training page: a project's runs (live while one goes), its model versions, and its training settings.

Every member of the project may look; only its managers and staff start, cancel, promote or
change the settings. Each button is a plain form post that redirects back to the page, and with
htmx the same post answers with the page's `main` partial. While a run is queued or running its
panel polls itself every two seconds; the poll that sees the run end tells the page (an
HX-Trigger event) to refresh the run and version tables. While none goes, the page asks every
ten seconds whether a run was started elsewhere (the schedule, the admin, the API or the
command) and shows it when one was.
"""

from __future__ import annotations

import json
from typing import Any

from django import forms
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.contrib.auth.models import User
from django.core.exceptions import ValidationError
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseBadRequest
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_http_methods, require_POST
from django_htmx.middleware import HtmxDetails

from feedback.ids import whole_number
from feedback.models import Membership, ModelVersion, Project, Round, TrainingRun
from feedback.selectors.access import project_for_role, user_manages_project
from feedback.selectors.models import accuracy_interval
from feedback.selectors.rounds import round_list
from feedback.selectors.side_by_side import side_by_side_read
from feedback.services.model_versions import ModelVersionError, model_version_promote
from feedback.services.rounds import MAX_ROUND_PROMPTS, STRATEGIES, round_enqueue, round_request
from feedback.services.training_runs import (
    TrainingRunError,
    training_config_build,
    training_run_cancel,
    training_run_start,
)

ACTIVE = (TrainingRun.Status.QUEUED, TrainingRun.Status.RUNNING)
ROUND_OPEN = (Round.Status.QUEUED, Round.Status.RUNNING)
RUN_ENDED_EVENT = "rankwise:run-ended"


class TrainingRequest(HttpRequest):
    """A request that went through login_required and django-htmx's middleware."""

    user: User
    htmx: HtmxDetails


class RetrainForm(forms.Form):
    algorithm = forms.ChoiceField(choices=[("", "Project default")] + Project.Algorithm.choices, required=False)


class NewRoundForm(forms.Form):
    prompts = forms.IntegerField(
        required=False, min_value=1, max_value=MAX_ROUND_PROMPTS, help_text="All prompts when empty."
    )
    strategy = forms.ChoiceField(
        choices=[(value, label) for value, label in Round.Strategy.choices if value in STRATEGIES], required=False
    )
    versions = forms.CharField(
        required=False, help_text="Comma-separated version names or 'base'; the active version when empty."
    )


class TrainingSettingsForm(forms.ModelForm):
    class Meta:
        model = Project
        fields = [
            "auto_train",
            "auto_train_threshold",
            "auto_promote",
            "promote_when_preferred",
            "battle_share",
            "round_size",
            "training_algorithm",
            "training_config",
            "weighting",
        ]
        widgets = {"training_config": forms.Textarea(attrs={"rows": 4})}
        labels = {
            "auto_train": "Train automatically",
            "auto_train_threshold": "after this many new judgements",
            "auto_promote": "Promote a new version when its held-out accuracy improves",
            "promote_when_preferred": "Promote only when people prefer it (blind battles; replaces the rule above)",
            "battle_share": "Share of an annotator's tasks that are battles (0 to 1)",
            "round_size": "Prompts in the round a promotion starts (empty: all)",
            "training_algorithm": "Algorithm",
            "training_config": "Hyperparameters (JSON)",
            "weighting": "A DPO pair's votes count",
        }

    def clean(self) -> dict[str, Any]:
        super().clean()
        cleaned = self.cleaned_data
        if cleaned.get("training_config") is None and "training_config" not in self.errors:
            cleaned["training_config"] = {}
        config, choice = cleaned.get("training_config"), cleaned.get("training_algorithm")
        if isinstance(config, dict) and choice:
            try:
                training_config_build(algorithm=choice, values=config)
            except TrainingRunError as error:
                self.add_error("training_config", str(error))
        elif config is not None and not isinstance(config, dict):
            self.add_error("training_config", "must be a JSON object of setting names and values")
        return cleaned


def _duration(run: TrainingRun) -> float | None:
    if run.started_at is None:
        return None
    end = run.finished_at or run.heartbeat_at or run.started_at
    return max((end - run.started_at).total_seconds(), 0.0)


def _run_context(run: TrainingRun | None, manages: bool) -> dict[str, Any]:
    if run is None:
        return {"run": None}
    version = ModelVersion.objects.filter(produced_by_run=run).first()
    return {
        "run": run,
        "run_active": run.status in ACTIVE,
        "run_duration": _duration(run),
        "run_config": json.dumps(run.config, indent=2, sort_keys=True),
        # A data attribute, not json_script: htmx (allowScriptTags off) drops script elements from swapped content.
        "run_chart": json.dumps({"algorithm": run.algorithm, "metrics": run.metrics}),
        # Managers only: they promote, and annotators are not shown which model wrote what.
        "side_by_side": side_by_side_read(version=version) if manages and version is not None else None,
    }


def _versions(project: Project) -> list[dict[str, Any]]:
    versions = list(project.model_versions.select_related("parent", "produced_by_run").order_by("-created_at", "-id"))
    active = next((v for v in versions if v.is_active), None)
    rows = []
    for version in versions:
        before = version.metrics.get("eval_before") or {}
        after = version.metrics.get("eval_after") or {}
        figure = "logp_accuracy" if "logp_accuracy" in after else "accuracy"  # DPO and GRPO, or a reward model
        rows.append(
            {
                "version": version,
                "before": before,
                "after": after,
                "before_interval": accuracy_interval(accuracy=before.get(figure), pairs=before.get("pairs")),
                "after_interval": accuracy_interval(accuracy=after.get(figure), pairs=after.get("pairs")),
                "action": None
                if version.is_active or version.kind == ModelVersion.Kind.REWARD
                else ("Roll back" if active and version.created_at < active.created_at else "Promote"),
            }
        )
    return rows


def _page_context(
    project: Project,
    manages: bool,
    *,
    selected: str = "",
    settings_form: TrainingSettingsForm | None = None,
) -> dict[str, Any]:
    """Everything the page shows; `selected` is the id of the run in the panel (default: the newest)."""
    runs = list(project.training_runs.select_related("triggered_by", "produced_version").order_by("-created_at")[:50])
    run = None
    if (selected_id := whole_number(selected)) is not None:
        listed = next((r for r in runs if r.pk == selected_id), None)
        run = listed or project.training_runs.filter(pk=selected_id).first()
    if run is None and runs:
        run = runs[0]
    return {
        "project": project,
        "manages": manages,
        "runs": [{"run": listed, "duration": _duration(listed)} for listed in runs],
        "versions": _versions(project),
        "active_run": next((r for r in runs if r.status in ACTIVE), None),
        "run_ended_event": RUN_ENDED_EVENT,
        "retrain_form": RetrainForm(),
        "round_form": NewRoundForm(),
        **_rounds_context(project),
        "settings_form": settings_form or TrainingSettingsForm(instance=project),
        **_run_context(run, manages),
    }


def _rounds_context(project: Project) -> dict[str, Any]:
    rounds = round_list(project=project)
    return {"rounds": rounds, "round_open": any(row.round.status in ROUND_OPEN for row in rounds)}


def _bad_run_parameter(request: TrainingRequest) -> HttpResponse | None:
    """A 400 when `?run=` names no run id (empty means the newest)."""
    run = request.GET.get("run", "")
    if run and whole_number(run) is None:
        return HttpResponseBadRequest("run: expected the id of a run, a whole number")
    return None


def _page_url(project: Project, run: TrainingRun | None = None) -> str:
    url = reverse("training", args=[project.slug])
    return f"{url}?run={run.pk}" if run is not None else url


def _after_action(request: TrainingRequest, project: Project, run: TrainingRun | None = None) -> HttpResponse:
    """Back to the page: a redirect for a plain post, the page's main partial for htmx."""
    if not request.htmx:
        return redirect(_page_url(project, run))
    selected = str(run.pk) if run is not None else ""
    response = render(request, "training.html#main", _page_context(project, True, selected=selected))
    response["HX-Push-Url"] = _page_url(project, run)
    return response


@login_required
@require_GET
def training_page(request: TrainingRequest, slug: str) -> HttpResponse:
    project = project_for_role(user=request.user, slug=slug, role=Membership.Role.ANNOTATOR)
    manages = user_manages_project(user=request.user, project=project)
    if (bad := _bad_run_parameter(request)) is not None:
        return bad
    return render(request, "training.html", _page_context(project, manages, selected=request.GET.get("run", "")))


@login_required
@require_GET
def training_history(request: TrainingRequest, slug: str) -> HttpResponse:
    """The runs and versions tables, refreshed when a run ends."""
    project = project_for_role(user=request.user, slug=slug, role=Membership.Role.ANNOTATOR)
    manages = user_manages_project(user=request.user, project=project)
    if (bad := _bad_run_parameter(request)) is not None:
        return bad
    context = _page_context(project, manages, selected=request.GET.get("run", ""))
    return render(request, "training.html#history", context)


@login_required
@require_GET
def training_watch(request: TrainingRequest, slug: str) -> HttpResponse:
    """Polled while no run goes: the runs part of the page once a run newer than `after` exists, else 204."""
    project = project_for_role(user=request.user, slug=slug, role=Membership.Role.ANNOTATOR)
    manages = user_manages_project(user=request.user, project=project)
    after = whole_number(request.GET.get("after", ""))
    if after is None:
        return HttpResponseBadRequest("after: expected the id of the newest run shown, a whole number")
    if not project.training_runs.filter(pk__gt=after).exists():
        return HttpResponse(status=204)
    return render(request, "training.html#runs", _page_context(project, manages))


@login_required
@require_GET
def training_rounds(request: TrainingRequest, slug: str) -> HttpResponse:
    """The rounds table with each round's progress; polled while a round is queued or being written."""
    project = project_for_role(user=request.user, slug=slug, role=Membership.Role.ANNOTATOR)
    manages = user_manages_project(user=request.user, project=project)
    return render(request, "training.html#rounds", {"project": project, "manages": manages, **_rounds_context(project)})


@login_required
@require_POST
def training_round_new(request: TrainingRequest, slug: str) -> HttpResponse:
    project = project_for_role(user=request.user, slug=slug, role=Membership.Role.MANAGER)
    form = NewRoundForm(request.POST)
    if not form.is_valid():
        messages.error(request, f"Could not ask for a round: {form.errors.as_text()}")
        return _after_action(request, project)
    versions = form.cleaned_data["versions"]
    try:
        requested = round_request(
            project=project,
            prompts=form.cleaned_data["prompts"],
            strategy=form.cleaned_data["strategy"] or Round.Strategy.OLDEST_ROUND_FIRST,
            writers=[name.strip() for name in versions.split(",")] if versions else None,
        )
    except ValidationError as error:
        messages.error(
            request,
            "Could not ask for a round: "
            + "; ".join(f"{field}: {' '.join(problems)}" for field, problems in error.message_dict.items()),
        )
        return _after_action(request, project)
    round_enqueue(round=requested)
    messages.success(request, f"Round {requested.number} by {' + '.join(requested.writers)} is queued.")
    return _after_action(request, project)


@login_required
@require_GET
def training_run_live(request: TrainingRequest, slug: str, run_id: int) -> HttpResponse:
    """A run's live panel (progress, status, error, metrics for the charts); polled while the run goes."""
    project = project_for_role(user=request.user, slug=slug, role=Membership.Role.ANNOTATOR)
    manages = user_manages_project(user=request.user, project=project)
    run = get_object_or_404(TrainingRun, pk=run_id, project=project)
    context = {"project": project, "manages": manages, **_run_context(run, manages)}
    response = render(request, "training.html#run_live", context)
    if request.htmx and not context["run_active"]:
        response["HX-Trigger"] = json.dumps({RUN_ENDED_EVENT: {"run": run.pk}})
    return response


@login_required
@require_GET
def training_side_by_side(request: TrainingRequest, slug: str, version_id: int) -> HttpResponse:
    """A version's side-by-side answers (managers); polled while they are being written."""
    project = project_for_role(user=request.user, slug=slug, role=Membership.Role.MANAGER)
    version = get_object_or_404(ModelVersion, pk=version_id, project=project)
    side_by_side = side_by_side_read(version=version)
    if side_by_side is None:
        raise Http404(f"{version.name} has no side-by-side answers")
    return render(request, "training.html#side_by_side", {"project": project, "side_by_side": side_by_side})


@login_required
@require_POST
def training_retrain(request: TrainingRequest, slug: str) -> HttpResponse:
    project = project_for_role(user=request.user, slug=slug, role=Membership.Role.MANAGER)
    form = RetrainForm(request.POST)
    if not form.is_valid():
        messages.error(request, f"Could not start a run: {form.errors.as_text()}")
        return _after_action(request, project)
    try:
        run = training_run_start(
            project=project,
            algorithm=form.cleaned_data["algorithm"] or None,
            triggered_by=request.user,
            trigger=TrainingRun.Trigger.MANUAL,
        )
    except TrainingRunError as error:
        messages.error(request, f"Could not start a run: {error}")
        return _after_action(request, project)
    messages.success(request, f"Run #{run.pk} ({run.algorithm}) is queued with {run.data_counts.get('train')} items.")
    return _after_action(request, project, run)


@login_required
@require_POST
def training_run_cancel_view(request: TrainingRequest, slug: str, run_id: int) -> HttpResponse:
    project = project_for_role(user=request.user, slug=slug, role=Membership.Role.MANAGER)
    run = get_object_or_404(TrainingRun, pk=run_id, project=project)
    try:
        run = training_run_cancel(run=run)
    except TrainingRunError as error:
        messages.error(request, f"Could not cancel: {error}")
        return _after_action(request, project, run)
    if run.status == TrainingRun.Status.CANCELLED:
        messages.success(request, f"Run #{run.pk} is cancelled.")
    else:
        messages.success(request, f"Run #{run.pk} stops before its next step.")
    return _after_action(request, project, run)


@login_required
@require_POST
def training_version_promote(request: TrainingRequest, slug: str, version_id: int) -> HttpResponse:
    project = project_for_role(user=request.user, slug=slug, role=Membership.Role.MANAGER)
    version = get_object_or_404(ModelVersion, pk=version_id, project=project)
    try:
        version = model_version_promote(version=version)
    except ModelVersionError as error:
        messages.error(request, str(error))
        return _after_action(request, project)
    messages.success(request, f"{version.name} is now the active version; it writes the next completions.")
    return _after_action(request, project)


@login_required
@require_http_methods(["POST"])
def training_settings(request: TrainingRequest, slug: str) -> HttpResponse:
    project = project_for_role(user=request.user, slug=slug, role=Membership.Role.MANAGER)
    form = TrainingSettingsForm(request.POST, instance=project)
    if not form.is_valid():
        messages.error(request, "The training settings were not saved; see the errors below.")
        context = _page_context(project, True, settings_form=form)
        # htmx swaps only successful responses, so it gets the form with its errors as a 200.
        if request.htmx:
            return render(request, "training.html#main", context)
        return render(request, "training.html", context, status=400)
    form.save()
    messages.success(request, "Training settings saved.")
    return _after_action(request, project)
