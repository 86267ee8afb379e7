"""Preference exports over the API: streamed JSONL, or a file built by the worker and downloaded when ready.

Exports hold every annotator's judgements, so they are for the project's managers and staff.
``GET .../export/`` only ever reads; a background file is started with ``POST .../exports/``,
so no link or image a manager's browser follows can start work.
"""

from __future__ import annotations

from typing import Any

from django.http import FileResponse, StreamingHttpResponse
from django.urls import reverse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import serializers, status
from rest_framework.exceptions import NotFound, ValidationError
from rest_framework.negotiation import DefaultContentNegotiation
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from feedback.api.serializers import (
    FORBIDDEN,
    NOT_AUTHENTICATED,
    READ_ERRORS,
    VALIDATION_ERROR,
    ErrorSerializer,
    query_data,
)
from feedback.ids import MAX_ID
from feedback.models import Membership, Project
from feedback.selectors.access import project_for_role, project_role_check
from feedback.selectors.preferences import (
    FORMATS,
    PAIR_MODES,
    SPLITS,
    WEIGHTINGS,
    ExportOptionsError,
    PreferenceExportOptions,
)
from feedback.services.exports import FILE_TYPES, ExportJob, export_job_get, export_job_start, export_jsonl

JSONL = "application/jsonl"
PARQUET = "application/vnd.apache.parquet"


class ExportOptionsSerializer(serializers.Serializer):
    """The export options as query parameters (PreferenceExportOptions)."""

    format = serializers.ChoiceField(choices=FORMATS, default="dpo")
    conversational = serializers.BooleanField(default=False, help_text="Message lists instead of strings.")
    pairs = serializers.ChoiceField(choices=PAIR_MODES, default="all", help_text="dpo: pairs from rankings.")
    min_agreement = serializers.FloatField(default=0.0, min_value=0.0, max_value=1.0)
    weighting = serializers.ChoiceField(
        choices=WEIGHTINGS,
        default="reliability",
        help_text="dpo: a vote counts its annotator's reliability (from gold items and agreement), or one (raw).",
    )
    created_from = serializers.DateTimeField(required=False, help_text="Judgements created at or after.")
    created_before = serializers.DateTimeField(required=False, help_text="Judgements created before.")
    annotators = serializers.ListField(
        child=serializers.IntegerField(min_value=1, max_value=MAX_ID),
        required=False,
        max_length=200,
        help_text="User ids.",
    )
    model_versions = serializers.ListField(
        child=serializers.IntegerField(min_value=1, max_value=MAX_ID),
        required=False,
        max_length=200,
        help_text="Model version ids.",
    )
    rounds = serializers.ListField(
        child=serializers.IntegerField(min_value=1, max_value=MAX_ID),
        required=False,
        max_length=200,
        help_text="Only completions of these round numbers.",
    )
    since_round = serializers.IntegerField(
        required=False, min_value=1, max_value=MAX_ID, help_text="Only this round and later ones."
    )
    writers = serializers.ListField(
        child=serializers.CharField(min_length=1, max_length=100),
        required=False,
        max_length=200,
        help_text="Only completions by these writers: version names, or base.",
    )
    split = serializers.ChoiceField(
        choices=SPLITS,
        required=False,
        help_text="Only the train or the test part of the training prompts, or eval: the evaluation prompts alone "
        "(for analysis; left out, every training prompt).",
    )
    test_fraction = serializers.FloatField(default=0.1, min_value=0.001, max_value=0.999)
    split_seed = serializers.CharField(default="rankwise", min_length=1, max_length=100)
    pseudonymise = serializers.BooleanField(default=False, help_text="judgements: HMAC pseudonyms.")
    gold = serializers.BooleanField(
        default=False, help_text="Also the gold items (prompts with a known answer), left out by default."
    )
    reward_scores = serializers.BooleanField(
        default=False,
        help_text="Each completion's score by the newest reward model (null if unscored): dpo chosen_reward and "
        "rejected_reward, grpo and judgements reward_scores beside completion_ids.",
    )

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        try:
            attrs["options"] = PreferenceExportOptions.from_mapping(
                {name: value for name, value in attrs.items() if name != "file"}
            )
        except ExportOptionsError as error:
            raise serializers.ValidationError({error.field: [error.message]}) from None
        return attrs


def export_stream_response(*, project: Project, options: PreferenceExportOptions) -> StreamingHttpResponse:
    response = StreamingHttpResponse(export_jsonl(project=project, options=options), content_type=JSONL)
    response["Content-Disposition"] = f'attachment; filename="{project.slug}-{options.format}.jsonl"'
    return response


class ExportJobOutputSerializer(serializers.Serializer):
    id = serializers.CharField()
    status = serializers.ChoiceField(choices=["queued", "running", "succeeded", "failed"])
    file_type = serializers.ChoiceField(choices=FILE_TYPES)
    rows = serializers.IntegerField(allow_null=True)
    error = serializers.CharField(allow_blank=True)
    created_at = serializers.DateTimeField()
    finished_at = serializers.DateTimeField(allow_null=True)
    status_url = serializers.CharField()
    download_url = serializers.CharField(allow_null=True, help_text="Set once the file is ready.")


def _job_data(job: ExportJob) -> dict[str, Any]:
    return ExportJobOutputSerializer(
        {
            **job.__dict__,
            "status_url": reverse("api:export-job", args=[job.id]),
            "download_url": reverse("api:export-download", args=[job.id]) if job.status == "succeeded" else None,
        }
    ).data


class _FormatIsNotARenderer:
    URL_FORMAT_OVERRIDE = None


class ExportFormatNegotiation(DefaultContentNegotiation):
    """`?format=` names the export format (DESIGN.md), so DRF must not read it as a renderer choice."""

    settings = _FormatIsNotARenderer  # type: ignore[assignment]  # only URL_FORMAT_OVERRIDE is read


class ExportApi(APIView):
    content_negotiation_class = ExportFormatNegotiation

    class InputSerializer(ExportOptionsSerializer):
        class Meta:
            ref_name = "ExportQuery"

    @extend_schema(
        operation_id="projects_export",
        summary="Export preference data (managers): streamed JSONL",
        description="Rows as DESIGN.md 'Formats' defines them, prompt by prompt. A `file` parameter is refused "
        "(400): background files are started with POST .../exports/.",
        parameters=[InputSerializer],
        responses={
            (200, JSONL): OpenApiResponse(OpenApiTypes.STR, description="One JSON object per line."),
            (400, "application/json"): VALIDATION_ERROR,
            (401, "application/json"): NOT_AUTHENTICATED,
            (403, "application/json"): FORBIDDEN,
            (404, "application/json"): READ_ERRORS[404],
        },
    )
    def get(self, request: Request, slug: str) -> StreamingHttpResponse:
        project = project_for_role(user=request.user, slug=slug, role=Membership.Role.MANAGER)
        if "file" in request.query_params:
            jobs_url = reverse("api:project-exports", args=[project.slug])
            raise ValidationError(
                {"file": [f"GET only streams JSONL: to build a file, POST the options to {jobs_url}"]}
            )
        params = self.InputSerializer(
            data=query_data(request, lists=("annotators", "model_versions", "rounds", "writers"))
        )
        params.is_valid(raise_exception=True)
        return export_stream_response(project=project, options=params.validated_data["options"])


class ExportJobsApi(APIView):
    class InputSerializer(ExportOptionsSerializer):
        file = serializers.ChoiceField(choices=FILE_TYPES, help_text="The kind of file the worker builds.")

        def to_internal_value(self, data: Any) -> dict[str, Any]:
            # DRF's fields read a JSON body like a query string (true or "1" for a number, 0 for a string);
            # from_mapping holds the options to their JSON types first, naming the field of a wrong one.
            if isinstance(data, dict):
                try:
                    PreferenceExportOptions.from_mapping(
                        {k: v for k, v in data.items() if k in self.fields and k != "file"}
                    )
                except ExportOptionsError as error:
                    raise ValidationError({error.field: [error.message]}) from None
            return super().to_internal_value(data)

        class Meta:
            ref_name = "ExportJobInput"

    @extend_schema(
        operation_id="projects_exports_create",
        summary="Start a background export file (managers)",
        description="The export's options (as GET .../export/ takes them) and `file`; the worker builds the file. "
        "Answers 202 with the job: poll its status_url, then fetch its download_url.",
        request=InputSerializer,
        responses={
            (202, "application/json"): OpenApiResponse(ExportJobOutputSerializer, description="File job queued."),
            (400, "application/json"): VALIDATION_ERROR,
            (401, "application/json"): NOT_AUTHENTICATED,
            (403, "application/json"): FORBIDDEN,
            (404, "application/json"): READ_ERRORS[404],
        },
    )
    def post(self, request: Request, slug: str) -> Response:
        project = project_for_role(user=request.user, slug=slug, role=Membership.Role.MANAGER)
        body = self.InputSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        job = export_job_start(
            project=project,
            options=body.validated_data["options"],
            file_type=body.validated_data["file"],
            requested_by_id=request.user.pk,
        )
        data = _job_data(job)
        return Response(data, status=status.HTTP_202_ACCEPTED, headers={"Location": data["status_url"]})


def _job_for_manager(request: Request, job_id: str) -> ExportJob:
    job = export_job_get(job_id=job_id)
    project = Project.objects.filter(pk=job.project_id).first() if job else None
    if job is None or project is None:
        raise NotFound("No such export.")
    project_role_check(user=request.user, project=project, role=Membership.Role.MANAGER, not_found="No such export.")
    return job


JOB_ID_PARAMETER = OpenApiParameter(
    "job_id", str, OpenApiParameter.PATH, pattern="^[0-9a-f]{32}$", description="As returned by the export."
)
JOB_ERRORS = {
    401: NOT_AUTHENTICATED,
    403: FORBIDDEN,
    404: OpenApiResponse(ErrorSerializer, description="No such export (or not one of your projects')."),
}


class ExportJobApi(APIView):
    @extend_schema(
        operation_id="exports_retrieve",
        summary="The status of a background export",
        parameters=[JOB_ID_PARAMETER],
        responses={200: ExportJobOutputSerializer, **JOB_ERRORS},
    )
    def get(self, request: Request, job_id: str) -> Response:
        return Response(_job_data(_job_for_manager(request, job_id)))


class ExportDownloadApi(APIView):
    @extend_schema(
        operation_id="exports_download",
        summary="Download a finished background export",
        parameters=[JOB_ID_PARAMETER],
        responses={
            (200, PARQUET): OpenApiResponse(OpenApiTypes.BINARY, description="A Parquet file."),
            (200, JSONL): OpenApiResponse(OpenApiTypes.BINARY, description="A JSONL file."),
            (409, "application/json"): OpenApiResponse(ErrorSerializer, description="The file is not ready."),
            **{(code, "application/json"): response for code, response in JOB_ERRORS.items()},
        },
    )
    def get(self, request: Request, job_id: str) -> Response | FileResponse:
        job = _job_for_manager(request, job_id)
        if job.status != "succeeded":
            return Response({"detail": f"The export is {job.status}."}, status=status.HTTP_409_CONFLICT)
        return FileResponse(
            job.file_path.open("rb"),
            as_attachment=True,
            filename=job.file_name,
            content_type=PARQUET if job.file_type == "parquet" else JSONL,
        )
