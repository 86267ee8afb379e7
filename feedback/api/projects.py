"""Projects and what they hold: prompts (list, bulk import), completions, model versions.

One view per URL; each method is one operation with its own nested Input/Output serializers.
Members of a project (any role) and staff read; managers and staff write.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db.models import CharField, Count, F, IntegerField, QuerySet, Value
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema, inline_serializer
from rest_framework import serializers, status
from rest_framework.exceptions import NotFound, ParseError
from rest_framework.parsers import BaseParser
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.throttling import ScopedRateThrottle
from rest_framework.views import APIView

from feedback.api.parsers import BoundedJSONParser
from feedback.api.serializers import (
    FORBIDDEN,
    NOT_AUTHENTICATED,
    NOT_FOUND,
    PAGE_PARAMETER,
    READ_ERRORS,
    THROTTLED,
    VALIDATION_ERROR,
    ErrorSerializer,
    StrictBooleanField,
    StrictPageNumberPagination,
    paginated,
    query_data,
)
from feedback.ids import MAX_ID, id_from
from feedback.models import Completion, Membership, ModelVersion, Project, Prompt
from feedback.selectors.access import project_for_role, project_role_check, user_manages_project
from feedback.selectors.models import completion_reward_scores, reward_model_newest
from feedback.selectors.projects import project_list_for_user
from feedback.services.model_versions import ModelVersionError, model_version_promote
from feedback.services.prompts import PromptImportError, prompt_gold_set, prompts_import_records

MAX_IMPORT_RECORDS = 10_000


def _page(request: Request, view: APIView, queryset: QuerySet, serializer: type[serializers.Serializer]) -> Response:
    paginator = StrictPageNumberPagination()
    page = paginator.paginate_queryset(queryset, request, view=view)
    return paginator.get_paginated_response(serializer(page, many=True).data)


def _flat(errors: Any, prefix: str = "") -> list[tuple[str, str]]:
    """DRF's nested error structure as (field path, message) pairs."""
    if isinstance(errors, dict):
        return [
            pair for key, value in errors.items() for pair in _flat(value, f"{prefix}.{key}" if prefix else str(key))
        ]
    if isinstance(errors, list):
        return [pair for item in errors for pair in _flat(item, prefix)]
    return [(prefix or "body", str(errors))]


class MessageSerializer(serializers.Serializer):
    role = serializers.CharField(help_text="system, user or assistant")
    content = serializers.CharField()


class ProjectOutputSerializer(serializers.Serializer):
    slug = serializers.SlugField()
    name = serializers.CharField()
    mode = serializers.ChoiceField(choices=Project.Mode.choices)
    completions_per_prompt = serializers.IntegerField()
    overlap = serializers.IntegerField()
    prompt_count = serializers.IntegerField()
    completion_count = serializers.IntegerField()
    role = serializers.ChoiceField(choices=Membership.Role.choices, help_text="Yours; staff count as managers.")


def _project_data(project: Project) -> dict[str, Any]:
    """A project annotated by project_list_for_user (the caller's role, prompt and completion counts)."""
    fields = ("slug", "name", "mode", "completions_per_prompt", "overlap", "prompt_count", "completion_count", "role")
    return {name: getattr(project, name) for name in fields}


class ProjectListApi(APIView):
    class OutputSerializer(ProjectOutputSerializer):
        class Meta:
            ref_name = "ProjectListItem"

    @extend_schema(
        operation_id="projects_list",
        summary="The projects you belong to (every project for staff)",
        parameters=[PAGE_PARAMETER],
        responses={
            200: paginated(OutputSerializer(many=True), name="PaginatedProjectList"),
            401: NOT_AUTHENTICATED,
            404: OpenApiResponse(ErrorSerializer, description="No such page."),
        },
    )
    def get(self, request: Request) -> Response:
        projects = project_list_for_user(user=request.user)
        paginator = StrictPageNumberPagination()
        page = paginator.paginate_queryset(projects, request, view=self) or []
        items = [_project_data(p) for p in page]
        return paginator.get_paginated_response(self.OutputSerializer(items, many=True).data)


class ProjectDetailApi(APIView):
    class OutputSerializer(ProjectOutputSerializer):
        guidelines = serializers.CharField()

        class Meta:
            ref_name = "ProjectDetail"

    @extend_schema(
        operation_id="projects_retrieve",
        summary="One project",
        responses={200: OutputSerializer, **READ_ERRORS},
    )
    def get(self, request: Request, slug: str) -> Response:
        project = project_for_role(user=request.user, slug=slug, role=Membership.Role.ANNOTATOR)
        counted = project_list_for_user(user=request.user).get(pk=project.pk)
        data = _project_data(counted)
        return Response(self.OutputSerializer({**data, "guidelines": counted.guidelines}).data)


class ImportJSONParser(BaseParser):
    """The API's JSON parser, fed from the request's stream rather than from request.body.

    DRF hands a JSONParser request.body, which Django refuses over DATA_UPLOAD_MAX_MEMORY_SIZE
    (2.5 MB, for every request) with a bare 400 page; an import has its own limit,
    RANKWISE_MAX_UPLOAD_BYTES, which the view checks from Content-Length before the body is read.
    """

    media_type = "application/json"

    def parse(self, stream: Any, media_type: str | None = None, parser_context: Any = None) -> Any:
        return BoundedJSONParser().parse(stream, media_type, parser_context)


class PromptsApi(APIView):
    """GET lists a project's prompts; POST imports prompts (and completions) all or nothing."""

    def get_throttles(self):  # type: ignore[no-untyped-def]
        return [ScopedRateThrottle()] if self.request.method == "POST" else []

    throttle_scope = "submit"
    parser_classes = [ImportJSONParser]

    class ListInputSerializer(serializers.Serializer):
        ordering = serializers.ChoiceField(choices=["id", "-id", "created_at", "-created_at"], default="id")
        external_id = serializers.RegexField(
            r"^[^\x00]*$", required=False, max_length=200, allow_blank=True, trim_whitespace=False
        )

        class Meta:
            ref_name = "PromptListQuery"

    class ListOutputSerializer(serializers.Serializer):
        id = serializers.IntegerField()
        messages = MessageSerializer(many=True)
        external_id = serializers.CharField()
        metadata = serializers.DictField()
        split = serializers.ChoiceField(
            choices=Prompt.Split.choices, help_text="eval: an evaluation prompt, never in training data."
        )
        completion_count = serializers.IntegerField()
        created_at = serializers.DateTimeField()

        class Meta:
            ref_name = "Prompt"

    class ImportInputSerializer(serializers.Serializer):
        records = serializers.ListField(
            child=serializers.JSONField(),
            min_length=1,
            max_length=MAX_IMPORT_RECORDS,
            help_text=(
                "Import records as in DESIGN.md: {prompt: string or [{role, content}] ending with a user turn, "
                "completions?: [string or {text, model}], id?: string, metadata?: object, split?: train|eval}; "
                "a record without split is an evaluation prompt for the project's eval_prompt_share of prompts."
            ),
        )

        class Meta:
            ref_name = "PromptImport"

    class ImportOutputSerializer(serializers.Serializer):
        prompts = serializers.IntegerField()
        completions = serializers.IntegerField()

        class Meta:
            ref_name = "PromptImportResult"

    class ImportProblemSerializer(serializers.Serializer):
        line = serializers.IntegerField(help_text="1-based position of the record in `records`.")
        field = serializers.CharField()
        message = serializers.CharField()

        class Meta:
            ref_name = "PromptImportProblem"

    @extend_schema(
        operation_id="projects_prompts_list",
        summary="A project's prompts",
        parameters=[ListInputSerializer, PAGE_PARAMETER],
        responses={
            200: paginated(ListOutputSerializer(many=True), name="PaginatedPromptList"),
            400: VALIDATION_ERROR,
            **READ_ERRORS,
        },
    )
    def get(self, request: Request, slug: str) -> Response:
        project = project_for_role(user=request.user, slug=slug, role=Membership.Role.ANNOTATOR)
        params = self.ListInputSerializer(data=query_data(request))
        params.is_valid(raise_exception=True)
        prompts = Prompt.objects.filter(project=project).annotate(completion_count=Count("completions"))
        if "external_id" in params.validated_data:
            prompts = prompts.filter(external_id=params.validated_data["external_id"])
        return _page(request, self, prompts.order_by(params.validated_data["ordering"]), self.ListOutputSerializer)

    @extend_schema(
        operation_id="projects_prompts_import",
        summary="Import prompts, all or nothing (managers)",
        request=ImportInputSerializer,
        responses={
            201: ImportOutputSerializer,
            400: OpenApiResponse(
                inline_serializer(
                    name="PromptImportErrors",
                    fields={
                        "detail": serializers.CharField(),
                        "problems": ImportProblemSerializer(many=True),
                    },
                ),
                description="Nothing was imported: `problems` names each bad record (1-based `line`; 0 when the "
                "body itself is wrong) and field.",
            ),
            401: NOT_AUTHENTICATED,
            403: FORBIDDEN,
            404: NOT_FOUND,
            413: OpenApiResponse(
                inline_serializer(
                    name="PromptImportTooLarge",
                    fields={
                        "detail": serializers.CharField(),
                        "problems": ImportProblemSerializer(many=True),
                    },
                ),
                description="Nothing was imported: the body is larger than RANKWISE_MAX_UPLOAD_BYTES.",
            ),
            429: THROTTLED,
        },
    )
    def post(self, request: Request, slug: str) -> Response:
        project = project_for_role(user=request.user, slug=slug, role=Membership.Role.MANAGER)
        limit = settings.RANKWISE_MAX_UPLOAD_BYTES
        length = request.META.get("CONTENT_LENGTH") or "0"
        # Decided from the header, before any of the body is read.
        if length.isascii() and length.isdigit() and (len(length) > len(str(limit)) or int(length) > limit):
            message = f"the body is larger than {limit:,} bytes (RANKWISE_MAX_UPLOAD_BYTES)"
            return Response(
                {
                    "detail": f"Nothing was imported: {message}; send the records in smaller parts.",
                    "problems": [{"line": 0, "field": "body", "message": message}],
                },
                status=status.HTTP_413_REQUEST_ENTITY_TOO_LARGE,
            )
        try:
            body = self.ImportInputSerializer(data=request.data)
        except ParseError as error:
            problems = [{"line": 0, "field": "body", "message": str(error.detail)}]
            return Response(
                {"detail": "Nothing was imported: the body is not JSON.", "problems": problems},
                status=status.HTTP_400_BAD_REQUEST,
            )
        if not body.is_valid():
            problems = [{"line": 0, "field": field, "message": str(message)} for field, message in _flat(body.errors)]
            return Response(
                {"detail": "Nothing was imported: the body must be {records: [...]}.", "problems": problems},
                status=status.HTTP_400_BAD_REQUEST,
            )
        try:
            result = prompts_import_records(project=project, records=body.validated_data["records"])
        except PromptImportError as error:
            problems = [{"line": p.line, "field": p.field, "message": p.message} for p in error.problems]
            detail = "Nothing was imported: fix these records and send them again."
            if error.more:
                detail += f" {error.more} more problems are not listed."
            return Response({"detail": detail, "problems": problems}, status=status.HTTP_400_BAD_REQUEST)
        return Response(
            self.ImportOutputSerializer({"prompts": result.prompts, "completions": result.completions}).data,
            status=status.HTTP_201_CREATED,
        )


class CompletionListApi(APIView):
    class InputSerializer(serializers.Serializer):
        prompt = serializers.IntegerField(
            required=False, min_value=1, max_value=MAX_ID, help_text="Only this prompt's completions."
        )
        model_version = serializers.IntegerField(required=False, min_value=1, max_value=MAX_ID)
        ordering = serializers.ChoiceField(choices=["id", "-id", "created_at", "-created_at"], default="id")

        class Meta:
            ref_name = "CompletionListQuery"

    class OutputSerializer(serializers.Serializer):
        id = serializers.IntegerField()
        prompt = serializers.IntegerField(source="prompt_id")
        text = serializers.CharField()
        html = serializers.CharField(help_text="Sanitised HTML rendered from the Markdown text.")
        model_version = serializers.IntegerField(
            source="writer_version", allow_null=True, help_text="The version that wrote it; for managers only."
        )
        source_model = serializers.CharField(
            source="writer_model", help_text="The model that wrote it when no version did; for managers only."
        )
        reward = serializers.FloatField(
            allow_null=True,
            help_text="The project's newest reward model's score, for its managers; null for others and until "
            "the worker has scored it.",
        )
        created_at = serializers.DateTimeField()

        class Meta:
            ref_name = "Completion"

    @extend_schema(
        operation_id="projects_completions_list",
        summary="A project's completions",
        parameters=[InputSerializer, PAGE_PARAMETER],
        responses={
            200: paginated(OutputSerializer(many=True), name="PaginatedCompletionList"),
            400: VALIDATION_ERROR,
            **READ_ERRORS,
        },
    )
    def get(self, request: Request, slug: str) -> Response:
        project = project_for_role(user=request.user, slug=slug, role=Membership.Role.ANNOTATOR)
        params = self.InputSerializer(data=query_data(request))
        params.is_valid(raise_exception=True)
        manager = user_manages_project(user=request.user, project=project)
        completions = Completion.objects.filter(prompt__project=project)
        if "prompt" in params.validated_data:
            completions = completions.filter(prompt_id=params.validated_data["prompt"])
        if "model_version" in params.validated_data:
            if not manager:  # battles are blind: only managers may ask who wrote what
                return Response(
                    {
                        "model_version": [
                            "Only the project's managers can filter completions by the version that wrote them."
                        ]
                    },
                    status=status.HTTP_400_BAD_REQUEST,
                )
            completions = completions.filter(model_version_id=params.validated_data["model_version"])
        completions = completions.annotate(
            reward=completion_reward_scores(reward_model=reward_model_newest(project=project) if manager else None),
            writer_version=F("model_version_id") if manager else Value(None, output_field=IntegerField()),
            writer_model=F("source_model") if manager else Value("", output_field=CharField()),
        )
        return _page(request, self, completions.order_by(params.validated_data["ordering"]), self.OutputSerializer)


class ModelVersionOutputSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    name = serializers.CharField()
    parent_version = serializers.IntegerField(source="parent_id", allow_null=True)
    produced_by_run = serializers.IntegerField(source="produced_by_run_id", allow_null=True)
    metrics = serializers.DictField(
        help_text="The run's figures. DPO and GRPO: eval_before (the parent) and eval_after (this version) on the "
        "same held-out pairs, each {logp_accuracy, logp_accuracy_per_token, logp_margin, pairs}, GRPO also "
        "{kendall_tau, groups}; eval_after alone adds the implicit reward's {accuracy, margin}. Reward models: "
        "{accuracy, margin, pairs}; online GRPO and PPO: {reward, reward_stderr, response_length, prompts}."
    )
    kind = serializers.ChoiceField(
        choices=ModelVersion.Kind.choices, help_text="policy (writes completions) or reward (scores them)."
    )
    is_active = serializers.BooleanField()
    gate = serializers.DictField(
        help_text="The promotion gate's decision when the project promotes only what people prefer: {decision: "
        "wait|promote|reject, against, wins, losses, ties, log_likelihood_ratio, promote_above, reject_below, "
        "round, problem, opened_at, checked_at, decided_at}; {} otherwise, and for non-managers."
    )
    created_at = serializers.DateTimeField()

    class Meta:
        ref_name = "ModelVersion"


class ModelVersionListApi(APIView):
    OutputSerializer = ModelVersionOutputSerializer

    @extend_schema(
        operation_id="projects_model_versions_list",
        summary="A project's model versions, newest first",
        parameters=[PAGE_PARAMETER],
        responses={
            200: paginated(OutputSerializer(many=True), name="PaginatedModelVersionList"),
            **READ_ERRORS,
        },
    )
    def get(self, request: Request, slug: str) -> Response:
        project = project_for_role(user=request.user, slug=slug, role=Membership.Role.ANNOTATOR)
        versions = ModelVersion.objects.filter(project=project).order_by("-created_at", "-id")
        response = _page(request, self, versions, self.OutputSerializer)
        if not user_manages_project(user=request.user, project=project):
            for row in response.data["results"]:
                row["gate"] = {}  # it names the versions a battle is between; battles are blind to annotators
        return response


class PromptGoldApi(APIView):
    """POST gives a training prompt its known answer (managers); a gold item then checks the annotators who meet it."""

    class InputSerializer(serializers.Serializer):
        gold = serializers.JSONField(
            allow_null=True,
            help_text='{"choice": "a"|"b"} for a prompt imported with two completions, or {"ranking": [[0], [1, 2], '
            "[3]]}: groups of the imported completions' indices, best first; null takes the gold answer away.",
        )

        class Meta:
            ref_name = "PromptGold"

    class OutputSerializer(serializers.Serializer):
        id = serializers.IntegerField()
        gold = serializers.JSONField(allow_null=True)

        class Meta:
            ref_name = "PromptGoldAnswer"

    @extend_schema(
        operation_id="projects_prompts_gold",
        summary="Set or clear a prompt's gold answer (managers)",
        request=InputSerializer,
        responses={
            200: OutputSerializer,
            400: VALIDATION_ERROR,
            401: NOT_AUTHENTICATED,
            403: FORBIDDEN,
            404: NOT_FOUND,
        },
    )
    def post(self, request: Request, slug: str, prompt_id: str) -> Response:
        project = project_for_role(user=request.user, slug=slug, role=Membership.Role.MANAGER)
        number = id_from(prompt_id)
        prompt = Prompt.objects.filter(pk=number, project=project).first() if number is not None else None
        if prompt is None:
            raise NotFound("No such prompt.")
        body = self.InputSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        try:
            prompt = prompt_gold_set(prompt=prompt, gold=body.validated_data["gold"])
        except ValidationError as error:
            return Response(error.message_dict, status=status.HTTP_400_BAD_REQUEST)
        return Response(self.OutputSerializer({"id": prompt.pk, "gold": prompt.gold}).data)


class ModelVersionPromoteApi(APIView):
    """Make a version its project's active one; the worker then writes the next round of completions."""

    class InputSerializer(serializers.Serializer):
        generate = StrictBooleanField(
            default=True, help_text="Queue completions for prompts that lack them, from the new version."
        )

        class Meta:
            ref_name = "ModelVersionPromote"

    @extend_schema(
        operation_id="model_versions_promote",
        summary="Promote a model version (managers)",
        parameters=[
            OpenApiParameter("version_id", {"type": "integer", "minimum": 1}, OpenApiParameter.PATH),
        ],
        request=InputSerializer,
        responses={
            200: ModelVersionOutputSerializer,
            400: VALIDATION_ERROR,
            401: NOT_AUTHENTICATED,
            403: FORBIDDEN,
            404: OpenApiResponse(
                ErrorSerializer, description="No such model version (or not in one of your projects)."
            ),
        },
    )
    def post(self, request: Request, version_id: str) -> Response:
        number = id_from(version_id)
        version = ModelVersion.objects.filter(pk=number).select_related("project").first() if number else None
        if version is None:
            raise NotFound("No such model version.")
        project_role_check(
            user=request.user, project=version.project, role=Membership.Role.MANAGER, not_found="No such model version."
        )
        body = self.InputSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        try:
            version = model_version_promote(version=version, generate=body.validated_data["generate"])
        except ModelVersionError as error:
            return Response({"detail": str(error)}, status=status.HTTP_400_BAD_REQUEST)
        return Response(ModelVersionOutputSerializer(version).data)
