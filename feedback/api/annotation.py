"""Annotating through the API: lease the next task, submit a judgement on it.

The same services as the annotate page: a task is a lease (its id is the task_id), a repeated
client_uuid returns the first judgement with 200 instead of 201.
"""

from __future__ import annotations

from typing import Any

from django.contrib.auth.models import User
from django.core.exceptions import ValidationError as DjangoValidationError
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import serializers, status
from rest_framework.exceptions import NotAuthenticated, ValidationError
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.throttling import ScopedRateThrottle
from rest_framework.views import APIView

from feedback.api.serializers import CSRF_FAILED, NOT_AUTHENTICATED, NOT_FOUND, THROTTLED, VALIDATION_ERROR
from feedback.models import COMPLETIONS_PER_PROMPT_MAX, Membership, PairwiseJudgement, Project
from feedback.selectors.access import project_for_role
from feedback.selectors.gold import gold_feedback
from feedback.services.assignments import assignment_lease_next
from feedback.services.judgements import RATIONALE_MAX, TIME_MS_MAX, JudgementSubmission, judgement_submit


def _annotator(request: Request) -> User:
    """The signed-in user (IsAuthenticated has let only those through)."""
    if not isinstance(request.user, User):
        raise NotAuthenticated
    return request.user


def _one_of(values: list[str]) -> str:
    return f"Not a valid choice; use one of {', '.join(values)}."


class BoundedListField(serializers.ListField):
    """A list field that refuses a list longer than ``max_length`` before validating any of its items."""

    def to_internal_value(self, data: Any) -> list[Any]:
        if self.max_length is not None and isinstance(data, list) and len(data) > self.max_length:
            self.fail("max_length", max_length=self.max_length)
        return super().to_internal_value(data)


class TaskMessageSerializer(serializers.Serializer):
    role = serializers.CharField()
    content = serializers.CharField()


class TaskCompletionSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    text = serializers.CharField(help_text="The completion as written (untrusted).")
    html = serializers.CharField(help_text="Sanitized HTML rendered from the Markdown text.")


class NextTaskApi(APIView):
    class OutputSerializer(serializers.Serializer):
        task_id = serializers.IntegerField()
        kind = serializers.ChoiceField(choices=Project.Mode.choices)
        prompt = TaskMessageSerializer(
            source="messages", many=True, help_text="The conversation, ending with a user turn."
        )
        completions = TaskCompletionSerializer(
            many=True, help_text="In display order; in pairwise mode the first is A and the second B."
        )
        lease_expires_at = serializers.DateTimeField()

        class Meta:
            ref_name = "Task"

    @extend_schema(
        operation_id="projects_next_task",
        summary="Lease the next task (your unfinished one first)",
        responses={
            200: OutputSerializer,
            204: OpenApiResponse(description="Nothing is left for you in this project."),
            401: NOT_AUTHENTICATED,
            404: NOT_FOUND,
        },
    )
    def get(self, request: Request, slug: str) -> Response:
        project = project_for_role(user=request.user, slug=slug, role=Membership.Role.ANNOTATOR)
        task = assignment_lease_next(project=project, annotator=_annotator(request))
        if task is None:
            return Response(status=status.HTTP_204_NO_CONTENT)
        return Response(self.OutputSerializer(task).data)


class JudgementSubmitApi(APIView):
    throttle_classes = [ScopedRateThrottle]
    throttle_scope = "submit"

    class InputSerializer(serializers.Serializer):
        task_id = serializers.IntegerField(min_value=1)
        client_uuid = serializers.UUIDField(help_text="Made by the client once per judgement; a retry sends it again.")
        # The choice errors name the valid values instead of echoing the input, which may not be encodable
        # (a lone surrogate) and would turn the 400 into a 500 when rendered.
        kind = serializers.ChoiceField(
            choices=Project.Mode.choices, error_messages={"invalid_choice": _one_of(Project.Mode.values)}
        )
        choice = serializers.ChoiceField(
            choices=PairwiseJudgement.Choice.choices,
            required=False,
            error_messages={"invalid_choice": _one_of(PairwiseJudgement.Choice.values)},
        )
        strength = serializers.ChoiceField(
            choices=PairwiseJudgement.Strength.choices,
            required=False,
            allow_blank=True,
            error_messages={"invalid_choice": _one_of(PairwiseJudgement.Strength.values)},
        )
        ranking = BoundedListField(
            child=BoundedListField(
                child=serializers.IntegerField(), allow_empty=False, max_length=COMPLETIONS_PER_PROMPT_MAX
            ),
            required=False,
            allow_empty=False,
            max_length=COMPLETIONS_PER_PROMPT_MAX,
            help_text="Groups of completion ids, best first; completions in one group are tied.",
        )
        rationale = serializers.CharField(required=False, allow_blank=True, max_length=RATIONALE_MAX)
        time_ms = serializers.IntegerField(required=False, allow_null=True, min_value=0, max_value=TIME_MS_MAX)

        class Meta:
            ref_name = "JudgementInput"

    class OutputSerializer(serializers.Serializer):
        id = serializers.IntegerField()
        task_id = serializers.IntegerField(source="assignment_id")
        kind = serializers.SerializerMethodField()
        client_uuid = serializers.UUIDField()
        choice = serializers.CharField(required=False)
        strength = serializers.CharField(required=False)
        ranking = serializers.ListField(
            child=serializers.ListField(child=serializers.IntegerField()),
            required=False,
            help_text="Ranking judgements: groups of completion ids, best first.",
        )
        rationale = serializers.CharField()
        time_ms = serializers.IntegerField(allow_null=True)
        created_at = serializers.DateTimeField()
        gold_feedback = serializers.CharField(
            allow_null=True,
            default=None,
            help_text="After a wrong answer on a check item with a known answer, in projects that say so: the "
            "expected answer; otherwise null.",
        )

        class Meta:
            ref_name = "Judgement"

        def get_kind(self, judgement) -> str:  # type: ignore[no-untyped-def]
            return Project.Mode.PAIRWISE if isinstance(judgement, PairwiseJudgement) else Project.Mode.RANKING

    @extend_schema(
        operation_id="projects_judgements_create",
        summary="Submit a judgement on a task leased to you",
        request=InputSerializer,
        responses={
            201: OutputSerializer,
            200: OpenApiResponse(OutputSerializer, description="A repeated client_uuid: the first judgement."),
            400: VALIDATION_ERROR,
            401: NOT_AUTHENTICATED,
            403: CSRF_FAILED,
            404: NOT_FOUND,
            429: THROTTLED,
        },
    )
    def post(self, request: Request, slug: str) -> Response:
        project = project_for_role(user=request.user, slug=slug, role=Membership.Role.ANNOTATOR)
        serializer = self.InputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        submission = JudgementSubmission(**serializer.validated_data)
        try:
            result = judgement_submit(project=project, annotator=_annotator(request), submission=submission)
        except DjangoValidationError as error:
            raise ValidationError(error.message_dict) from None
        body = self.OutputSerializer(result.judgement).data
        if result.ranking is not None:
            body["ranking"] = result.ranking
        body["gold_feedback"] = gold_feedback(project=project, judgement=result.judgement)
        return Response(body, status=status.HTTP_201_CREATED if result.created else status.HTTP_200_OK)
