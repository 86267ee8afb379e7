"""Training runs over the API: list, start, read and cancel.

Members of a project (any role) and staff read; managers and staff start and cancel.
The views call the same services as the training page, and a service's refusal (TrainingRunError)
becomes a 400 with its message, or a 409 when another run is already queued or running, or the
run to cancel has already ended.
"""

from __future__ import annotations

from typing import Any

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import serializers, status
from rest_framework.exceptions import NotFound
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from feedback.api.serializers import (
    FORBIDDEN,
    NOT_AUTHENTICATED,
    NOT_FOUND,
    PAGE_PARAMETER,
    READ_ERRORS,
    ErrorSerializer,
    StrictPageNumberPagination,
    paginated,
)
from feedback.ids import MAX_ID, id_from
from feedback.models import Membership, ModelVersion, Project, TrainingRun
from feedback.selectors.access import project_for_role, project_role_check
from feedback.selectors.preferences import WEIGHTINGS
from feedback.selectors.side_by_side import side_by_side_read
from feedback.services.training_runs import (
    SNAPSHOT_LIMITS,
    TrainingRunError,
    training_run_cancel,
    training_run_start,
)

ACTIVE = (TrainingRun.Status.QUEUED, TrainingRun.Status.RUNNING)


class TrainingRunOutputSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    project = serializers.CharField(source="project.slug")
    algorithm = serializers.ChoiceField(choices=TrainingRun.Algorithm.choices)
    status = serializers.ChoiceField(choices=TrainingRun.Status.choices)
    step = serializers.IntegerField()
    total_steps = serializers.IntegerField(help_text="0 until the worker has counted the steps.")
    metrics = serializers.ListField(
        child=serializers.DictField(),
        help_text="One entry per step as the run goes: {step, loss, rewards/accuracies, kl, learning_rate, ...}.",
    )
    config = serializers.DictField(help_text="The run's complete configuration, defaults included.")
    error = serializers.CharField(allow_blank=True)
    data_counts = serializers.DictField(
        help_text="{train, held_out, format} of the data snapshot, and its limits ({rounds, since_round, writers}) "
        "when it was limited."
    )
    data_hash = serializers.CharField(allow_blank=True, help_text="SHA-256 of the snapshot's rows.")
    parent_version = serializers.IntegerField(source="parent_version_id", allow_null=True)
    produced_version = serializers.SerializerMethodField()
    trigger = serializers.ChoiceField(choices=TrainingRun.Trigger.choices)
    triggered_by = serializers.SerializerMethodField()
    cancel_requested = serializers.BooleanField()
    created_at = serializers.DateTimeField()
    started_at = serializers.DateTimeField(allow_null=True)
    finished_at = serializers.DateTimeField(allow_null=True)

    class Meta:
        ref_name = "TrainingRun"

    def get_produced_version(self, run: TrainingRun) -> int | None:
        version = getattr(run, "produced_version", None)
        return version.pk if version is not None else None

    def get_triggered_by(self, run: TrainingRun) -> str | None:
        return run.triggered_by.get_username() if run.triggered_by else None


def _id(value: str, what: str) -> int:
    """A path id as a number; anything that cannot be one is a 404, like an id that does not exist."""
    number = id_from(value)
    if number is None:
        raise NotFound(f"No such {what}.")
    return number


def _runs() -> Any:
    return TrainingRun.objects.select_related("project", "triggered_by", "produced_version")


def _run_for_role(request: Request, run_id: str, *, role: Membership.Role) -> TrainingRun:
    run = _runs().filter(pk=_id(run_id, "training run")).first()
    if run is None:
        raise NotFound("No such training run.")
    project_role_check(user=request.user, project=run.project, role=role, not_found="No such training run.")
    return run


def _run_data(run: TrainingRun) -> dict[str, Any]:
    return TrainingRunOutputSerializer(run).data


def _has_active_run(project: Project) -> TrainingRun | None:
    return project.training_runs.filter(status__in=ACTIVE).first()


def _conflict(detail: str) -> Response:
    return Response({"detail": detail}, status=status.HTTP_409_CONFLICT)


RUN_ID_PARAMETER = OpenApiParameter(
    "run_id", {"type": "integer", "minimum": 1, "maximum": MAX_ID}, OpenApiParameter.PATH, description="A run's id."
)
RUN_NOT_FOUND = OpenApiResponse(ErrorSerializer, description="No such run (or not one of your projects').")


class TrainingRunListApi(APIView):
    """GET lists a project's runs, newest first; POST starts one (managers)."""

    class InputSerializer(serializers.Serializer):
        algorithm = serializers.ChoiceField(
            choices=Project.Algorithm.choices,
            required=False,
            help_text="dpo, grpo (ranking projects), or dpo_rankings; the project's setting when left out.",
        )
        config = serializers.DictField(
            required=False,
            help_text='Hyperparameters over the project\'s own (e.g. {"epochs": 2, "beta": 0.1}); '
            "names and types as in training.dpo.DPOConfig / training.grpo.GRPOConfig.",
        )
        rounds = serializers.ListField(
            child=serializers.IntegerField(min_value=1, max_value=MAX_ID),
            required=False,
            max_length=200,
            help_text="Train only on completions of these round numbers (default: every round).",
        )
        since_round = serializers.IntegerField(
            required=False, min_value=1, max_value=MAX_ID, help_text="Train only on this round and later ones."
        )
        writers = serializers.ListField(
            child=serializers.CharField(min_length=1, max_length=100),
            required=False,
            max_length=200,
            help_text="Train only on completions by these writers: version names of the project, or base.",
        )
        weighting = serializers.ChoiceField(
            choices=WEIGHTINGS,
            required=False,
            help_text="What a vote counts when the DPO pairs are labelled: its annotator's reliability or one "
            "each (raw); the project's setting when left out.",
        )

        class Meta:
            ref_name = "TrainingRunStart"

    @extend_schema(
        operation_id="projects_training_runs_list",
        summary="A project's training runs, newest first",
        parameters=[PAGE_PARAMETER],
        responses={
            200: paginated(TrainingRunOutputSerializer(many=True), name="PaginatedTrainingRunList"),
            **READ_ERRORS,
        },
    )
    def get(self, request: Request, slug: str) -> Response:
        project = project_for_role(user=request.user, slug=slug, role=Membership.Role.ANNOTATOR)
        runs = _runs().filter(project=project).order_by("-created_at", "-id")
        paginator = StrictPageNumberPagination()
        page: list[TrainingRun] | None = paginator.paginate_queryset(runs, request, view=self)
        return paginator.get_paginated_response(TrainingRunOutputSerializer(page, many=True).data)

    @extend_schema(
        operation_id="projects_training_runs_start",
        summary="Start a training run (managers)",
        description="Snapshots the project's judgements and queues the run for the worker; poll "
        "`GET /training-runs/{id}/` for its progress. A project trains one run at a time.",
        request=InputSerializer,
        responses={
            201: TrainingRunOutputSerializer,
            400: OpenApiResponse(
                OpenApiTypes.OBJECT,
                description="Nothing was started. A malformed field answers {field: [message, ...]}; a refusal "
                "by the service answers {detail}: an unknown setting or a bad value in `config`, GRPO on a "
                "pairwise project, a writer that is not a version of the project, or no judgements to train "
                "on yet (within the rounds asked for).",
            ),
            401: NOT_AUTHENTICATED,
            403: FORBIDDEN,
            404: NOT_FOUND,
            409: OpenApiResponse(ErrorSerializer, description="Another run of the project is queued or running."),
        },
    )
    def post(self, request: Request, slug: str) -> Response:
        project = project_for_role(user=request.user, slug=slug, role=Membership.Role.MANAGER)
        body = self.InputSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        if (active := _has_active_run(project)) is not None:
            return _conflict(f"Run {active.pk} of {project.slug} is already {active.status}; wait or cancel it.")
        try:
            run = training_run_start(
                project=project,
                algorithm=body.validated_data.get("algorithm"),
                config=body.validated_data.get("config"),
                triggered_by=request.user if request.user.is_authenticated else None,
                trigger=TrainingRun.Trigger.API,
                limits={name: body.validated_data.get(name) for name in SNAPSHOT_LIMITS},
                weighting=body.validated_data.get("weighting"),
            )
        except TrainingRunError as error:
            if _has_active_run(project) is not None:  # another request started one meanwhile
                return _conflict(str(error))
            return Response({"detail": str(error)}, status=status.HTTP_400_BAD_REQUEST)
        return Response(_run_data(_runs().get(pk=run.pk)), status=status.HTTP_201_CREATED)


class TrainingRunDetailApi(APIView):
    @extend_schema(
        operation_id="training_runs_retrieve",
        summary="One training run: status, progress, metrics, config and error",
        parameters=[RUN_ID_PARAMETER],
        responses={200: TrainingRunOutputSerializer, 401: NOT_AUTHENTICATED, 404: RUN_NOT_FOUND},
    )
    def get(self, request: Request, run_id: str) -> Response:
        return Response(_run_data(_run_for_role(request, run_id, role=Membership.Role.ANNOTATOR)))


class TrainingRunCancelApi(APIView):
    @extend_schema(
        operation_id="training_runs_cancel",
        summary="Cancel a queued or running run (managers)",
        description="A queued run is cancelled at once; a running one stops before its next step "
        "(`cancel_requested` is true until it has).",
        parameters=[RUN_ID_PARAMETER],
        request=None,
        responses={
            200: TrainingRunOutputSerializer,
            401: NOT_AUTHENTICATED,
            403: FORBIDDEN,
            404: RUN_NOT_FOUND,
            409: OpenApiResponse(ErrorSerializer, description="The run has already ended."),
        },
    )
    def post(self, request: Request, run_id: str) -> Response:
        run = _run_for_role(request, run_id, role=Membership.Role.MANAGER)
        try:
            training_run_cancel(run=run)
        except TrainingRunError as error:
            return _conflict(str(error))
        return Response(_run_data(_runs().get(pk=run.pk)))


class SideBySidePairSerializer(serializers.Serializer):
    prompt_id = serializers.IntegerField()
    messages = serializers.ListField(child=serializers.DictField(child=serializers.CharField()))
    parent_text = serializers.CharField(allow_blank=True)
    parent_html = serializers.CharField(allow_blank=True, help_text="parent_text as sanitized HTML.")
    parent_truncated = serializers.BooleanField(help_text="The length limit cut the parent's answer.")
    candidate_text = serializers.CharField(allow_blank=True)
    candidate_html = serializers.CharField(allow_blank=True, help_text="candidate_text as sanitized HTML.")
    candidate_truncated = serializers.BooleanField(help_text="The length limit cut this version's answer.")

    class Meta:
        ref_name = "SideBySidePair"


class SideBySideOutputSerializer(serializers.Serializer):
    version = serializers.CharField(help_text="The version the run made.")
    parent_name = serializers.CharField(
        source="parent", help_text="The version it was trained from, or base for the base model."
    )
    status = serializers.ChoiceField(
        choices=["queued", "writing", "done", "failed"], help_text="pairs are filled in once it is done."
    )
    error = serializers.CharField(allow_blank=True, help_text="Why the answers could not be written (failed).")
    prompts_from = serializers.CharField(
        source="source",
        allow_blank=True,
        help_text="eval: the project's evaluation prompts; held_out: prompts held out of the run's data; "
        "empty until known.",
    )
    sampling = serializers.DictField(help_text="{temperature, top_p, max_new_tokens, seed}, the same for both.")
    pairs = SideBySidePairSerializer(many=True)

    class Meta:
        ref_name = "SideBySide"


class ModelVersionSideBySideApi(APIView):
    @extend_schema(
        operation_id="projects_model_versions_side_by_side",
        summary="A version's answers beside its parent's on a few held-out prompts (managers)",
        description="Written by the worker after the run that made the version: up to 5 of the project's "
        "evaluation prompts (else of the prompts held out of the run's data), answered by the parent and by the "
        "version with the project's sampling settings and one seed. Poll while `status` is queued or writing.",
        parameters=[
            OpenApiParameter("version_name", OpenApiTypes.STR, OpenApiParameter.PATH, description="e.g. v2."),
        ],
        responses={
            200: SideBySideOutputSerializer,
            401: NOT_AUTHENTICATED,
            403: FORBIDDEN,
            404: OpenApiResponse(
                ErrorSerializer,
                description="No such project (or not one of yours), no version of that name in it, or a version "
                "without side-by-side answers (a reward model, or one recorded before runs wrote them).",
            ),
        },
    )
    def get(self, request: Request, slug: str, version_name: str) -> Response:
        project = project_for_role(user=request.user, slug=slug, role=Membership.Role.MANAGER)
        # A name the column cannot hold (too long, or a NUL, which PostgreSQL refuses in a query) names no version.
        version = None
        if "\x00" not in version_name and len(version_name) <= (ModelVersion._meta.get_field("name").max_length or 0):
            version = ModelVersion.objects.filter(project=project, name=version_name).select_related("parent").first()
        if version is None:
            raise NotFound(f"{project.slug} has no version named '{version_name}'.")
        side_by_side = side_by_side_read(version=version)
        if side_by_side is None:
            reason = "it is a reward model" if version.kind == ModelVersion.Kind.REWARD else "none were written"
            raise NotFound(f"{version.name} has no side-by-side answers: {reason}.")
        return Response(SideBySideOutputSerializer(side_by_side).data)
