"""The reviewer's queue over the API: contentious items, one item with every judgement, verdicts and their undoing.

Reviewers, managers and staff; annotators get 403 and non-members 404. A verdict that cannot be recorded
(an item without judgements, a verdict that does not fit the item, ranks that do not cover its
completions) is a 400 naming the field ({field: [message]}), and nothing is written.
"""

from __future__ import annotations

from dataclasses import asdict

from django.contrib.auth.models import User
from django.core.exceptions import ValidationError
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import serializers, status
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from feedback.api.serializers import (
    NOT_AUTHENTICATED,
    PAGE_PARAMETER,
    ErrorSerializer,
    StrictCharField,
    StrictPageNumberPagination,
    paginated,
    query_data,
)
from feedback.models import COMPLETIONS_PER_PROMPT_MAX, Adjudication, Membership
from feedback.selectors.access import project_for_role
from feedback.selectors.review import STATES, prompt_previews, review_item, review_queue
from feedback.services.adjudications import NOTE_MAX, adjudication_record, adjudication_undo

ITEM_KEY_PARAMETER = OpenApiParameter(
    "item_key",
    {"type": "string", "maxLength": 64},
    OpenApiParameter.PATH,
    description="'c<low id>-<high id>' (a pair of completions) or 'p<prompt id>-r<round id>' (a ranked group).",
)
NO_ITEM = OpenApiResponse(
    ErrorSerializer, description="No such project (or not one of yours), or no reviewable item of that key in it."
)
FORBIDDEN_REVIEW = OpenApiResponse(
    ErrorSerializer,
    description="Annotators may not review (reviewers and managers only), or a signed-in session sent a write "
    "without its CSRF token.",
)
READ_FORBIDDEN = OpenApiResponse(
    ErrorSerializer, description="Annotators may not review (reviewers and managers only)."
)


class AdjudicationSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    item_key = serializers.CharField()
    verdict = serializers.ChoiceField(choices=Adjudication.Verdict.choices)
    ranks = serializers.DictField(
        child=serializers.IntegerField(), allow_null=True, help_text="Ranking verdicts: {completion id: rank}."
    )
    note = serializers.CharField(allow_blank=True)
    reviewer = serializers.CharField(source="reviewer.get_username")
    created_at = serializers.DateTimeField()
    undone_at = serializers.DateTimeField(allow_null=True, help_text="Null while the verdict is in force.")
    undone_by = serializers.CharField(source="undone_by.get_username", allow_null=True, default=None)

    class Meta:
        ref_name = "Adjudication"


class QueueItemSerializer(serializers.Serializer):
    item_key = serializers.CharField()
    kind = serializers.ChoiceField(choices=["pairwise", "ranking"])
    prompt_id = serializers.IntegerField()
    prompt = serializers.CharField(help_text="The start of the prompt's last turn.")
    round = serializers.IntegerField(source="round_number")
    votes = serializers.IntegerField()
    majority_share = serializers.FloatField(
        help_text="Pairwise: the most common choice's share; ranking: the lowest share of a completion's most "
        "common rank."
    )
    gold_failures = serializers.IntegerField(help_text="Judgements that fail the item's gold answer.")
    flagged_votes = serializers.IntegerField(help_text="Judgements by annotators the Quality figures flag.")
    contention = serializers.FloatField(
        help_text="(1 - majority_share) + 0.5 * gold_failures / votes + 0.25 * flagged_votes / votes."
    )
    reasons = serializers.ListField(child=serializers.ChoiceField(choices=["split", "gold", "flagged"]))
    verdict = serializers.CharField(allow_null=True, help_text="The verdict in force, if any.")

    class Meta:
        ref_name = "ReviewQueueItem"


class ReviewQueueApi(APIView):
    class ParametersSerializer(serializers.Serializer):
        state = serializers.ChoiceField(
            choices=list(STATES), required=False, help_text="open (default): no verdict in force; adjudicated."
        )

        class Meta:
            ref_name = "ReviewQueueParameters"

    @extend_schema(
        operation_id="projects_review_queue",
        summary="Items whose judgements disagree, most contentious first (reviewers and managers)",
        parameters=[ParametersSerializer, PAGE_PARAMETER],
        responses={
            200: paginated(QueueItemSerializer(many=True), name="PaginatedReviewQueue"),
            400: OpenApiResponse(OpenApiTypes.OBJECT, description="A state other than open or adjudicated."),
            401: NOT_AUTHENTICATED,
            403: READ_FORBIDDEN,
            404: OpenApiResponse(
                ErrorSerializer, description="No such project (or not one of yours), or no such page."
            ),
        },
    )
    def get(self, request: Request, slug: str) -> Response:
        project = project_for_role(user=request.user, slug=slug, role=Membership.Role.REVIEWER)
        params = self.ParametersSerializer(data=query_data(request))
        params.is_valid(raise_exception=True)
        queue = review_queue(project=project, state=params.validated_data.get("state", "open"))
        paginator = StrictPageNumberPagination()
        page = paginator.paginate_queryset(queue, request, view=self) or []  # type: ignore[arg-type]
        previews = prompt_previews(prompt_ids=[item.prompt_id for item in page])
        rows = [asdict(item) | {"reasons": item.reasons, "prompt": previews.get(item.prompt_id, "")} for item in page]
        return paginator.get_paginated_response(QueueItemSerializer(rows, many=True).data)


class ReviewCompletionSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    shown_as = serializers.CharField(
        source="label",
        help_text='Pairwise: "A" (the lower id, what a verdict of "a" prefers) or "B"; ranking: 1, 2, ...',
    )
    text = serializers.CharField(allow_blank=True)
    truncated = serializers.BooleanField(help_text="The length limit cut it.")
    written_by = serializers.CharField(source="source", allow_blank=True, help_text="The model that wrote it.")


class ReviewJudgementSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    annotator = serializers.CharField()
    choice = serializers.CharField(
        allow_null=True, help_text='Pairwise, by content: "a" prefers the lower completion id whatever side was shown.'
    )
    ranks = serializers.DictField(
        child=serializers.IntegerField(), allow_null=True, help_text="Ranking: {completion id: rank}, 1 = best."
    )
    strength = serializers.CharField(allow_blank=True)
    rationale = serializers.CharField(allow_blank=True)
    time_ms = serializers.IntegerField(allow_null=True)
    created_at = serializers.DateTimeField()
    excluded = serializers.BooleanField(help_text="The annotator's judgements are left out of exports and training.")
    flagged = serializers.BooleanField(help_text="The Quality figures flag the annotator.")
    gold_correct = serializers.BooleanField(allow_null=True, help_text="Null: no gold answer covers the item.")


class ReviewItemSerializer(serializers.Serializer):
    item_key = serializers.CharField()
    kind = serializers.ChoiceField(choices=["pairwise", "ranking"])
    prompt_id = serializers.IntegerField(source="prompt.pk")
    messages = serializers.JSONField(source="prompt.messages", help_text="The prompt: [{role, content}, ...].")
    round = serializers.IntegerField(source="round_number")
    completions = ReviewCompletionSerializer(many=True)
    judgements = ReviewJudgementSerializer(many=True)
    gold = serializers.JSONField(
        allow_null=True, help_text='Pairwise: "a", "b" or "tie"; ranking: {completion id: rank}; null without one.'
    )
    majority_share = serializers.FloatField()
    contention = serializers.FloatField()
    verdicts = serializers.ListField(child=serializers.CharField(), help_text="The verdicts this item takes.")
    verdict = AdjudicationSerializer(allow_null=True, help_text="The verdict in force, if any.")
    history = AdjudicationSerializer(many=True, help_text="Undone verdicts, newest first.")

    class Meta:
        ref_name = "ReviewItem"


class ReviewItemApi(APIView):
    @extend_schema(
        operation_id="projects_review_item",
        summary="One item: prompt, completions, every judgement, gold answer and verdicts (reviewers and managers)",
        parameters=[ITEM_KEY_PARAMETER],
        responses={200: ReviewItemSerializer, 401: NOT_AUTHENTICATED, 403: READ_FORBIDDEN, 404: NO_ITEM},
    )
    def get(self, request: Request, slug: str, item_key: str) -> Response:
        project = project_for_role(user=request.user, slug=slug, role=Membership.Role.REVIEWER)
        return Response(ReviewItemSerializer(review_item(project=project, item_key=item_key)).data)


WRITE_RESPONSES = {
    400: OpenApiResponse(OpenApiTypes.OBJECT, description="Nothing was written: {field: [message]}."),
    401: NOT_AUTHENTICATED,
    403: FORBIDDEN_REVIEW,
    404: OpenApiResponse(ErrorSerializer, description="No such project (or not one of yours)."),
}


def _user(request: Request) -> User:
    assert isinstance(request.user, User)  # IsAuthenticated
    return request.user


def _errors(error: ValidationError) -> dict[str, list[str]]:
    return error.message_dict if hasattr(error, "error_dict") else {"non_field_errors": error.messages}


class ReviewVerdictApi(APIView):
    class InputSerializer(serializers.Serializer):
        verdict = serializers.ChoiceField(
            choices=Adjudication.Verdict.choices,
            help_text="Pairwise items: a (the lower completion id is better), b, tie, both_bad; ranking items: "
            "ranking (with ranks); both: unusable.",
        )
        ranks = serializers.DictField(
            child=serializers.IntegerField(min_value=1, max_value=COMPLETIONS_PER_PROMPT_MAX),
            required=False,
            help_text="A ranking verdict: {completion id: rank} over every completion of the item, 1 = best, ties "
            "share a rank, no gaps.",
        )
        note = StrictCharField(required=False, allow_blank=True, max_length=NOTE_MAX)

        class Meta:
            ref_name = "ReviewVerdictRequest"

    @extend_schema(
        operation_id="projects_review_verdict",
        summary="Record a verdict on an item, replacing the one in force (reviewers and managers)",
        description="The verdict replaces the annotators' votes in exports and training snapshots until undone; a "
        "verdict already in force on the item is undone (kept in its history).",
        parameters=[ITEM_KEY_PARAMETER],
        request=InputSerializer,
        responses={201: AdjudicationSerializer, **WRITE_RESPONSES},
    )
    def post(self, request: Request, slug: str, item_key: str) -> Response:
        project = project_for_role(user=request.user, slug=slug, role=Membership.Role.REVIEWER)
        body = self.InputSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        try:
            adjudication = adjudication_record(
                project=project,
                reviewer=_user(request),
                item_key=item_key,
                verdict=body.validated_data["verdict"],
                ranks=body.validated_data.get("ranks"),
                note=body.validated_data.get("note", ""),
            )
        except ValidationError as error:
            return Response(_errors(error), status=status.HTTP_400_BAD_REQUEST)
        return Response(AdjudicationSerializer(adjudication).data, status=status.HTTP_201_CREATED)


class ReviewUndoApi(APIView):
    @extend_schema(
        operation_id="projects_review_undo",
        summary="Undo the verdict in force on an item: the votes count again (reviewers and managers)",
        parameters=[ITEM_KEY_PARAMETER],
        request=None,
        responses={200: AdjudicationSerializer, **WRITE_RESPONSES},
    )
    def post(self, request: Request, slug: str, item_key: str) -> Response:
        project = project_for_role(user=request.user, slug=slug, role=Membership.Role.REVIEWER)
        try:
            adjudication = adjudication_undo(project=project, user=_user(request), item_key=item_key)
        except ValidationError as error:
            return Response(_errors(error), status=status.HTTP_400_BAD_REQUEST)
        return Response(AdjudicationSerializer(adjudication).data)
