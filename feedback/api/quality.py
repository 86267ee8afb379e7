"""Quality figures over the API: a project's agreement and annotator statistics, and one annotator's.

Reviewers, managers and staff read them; annotators get 403 and non-members 404. A filter that
cannot be used is a 400 naming it ({field: [message]}), as the Quality page shows it.
"""

from __future__ import annotations

from django.contrib.auth.models import User
from django.core.exceptions import ValidationError
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
    VALIDATION_ERROR,
    StrictCharField,
    query_data,
)
from feedback.models import AnnotatorExclusion, Membership, Project
from feedback.selectors.access import project_for_role
from feedback.selectors.quality import (
    GOLD_NOTE,
    PAIRWISE_CATEGORIES,
    QualityFilters,
    annotator_quality_report,
    project_quality_cached,
    quality_filters_parse,
)
from feedback.selectors.reliability import MIN_GOLD, MIN_SHARED
from feedback.services.annotators import REASON_MAX, annotator_exclude, annotator_include


class QualityFiltersSerializer(serializers.Serializer):
    """The filters as query parameters; every one may be left out (quality_filters_parse reads them)."""

    created_from = serializers.DateTimeField(required=False, help_text="Judgements made at or after (ISO).")
    created_before = serializers.DateTimeField(required=False, help_text="Judgements made strictly before (ISO).")
    model_version = serializers.CharField(
        required=False, max_length=100, help_text="Items with a completion written by this version (its name)."
    )
    metadata_key = serializers.CharField(
        required=False, max_length=200, help_text="Items whose prompt's metadata has this key (with metadata_value)."
    )
    metadata_value = serializers.CharField(required=False, help_text="... set to this string.")

    class Meta:
        ref_name = "QualityFilters"


class FlagSerializer(serializers.Serializer):
    code = serializers.ChoiceField(choices=["too_fast", "position_bias", "below_chance_on_gold", "unreliable"])
    message = serializers.CharField(help_text="What was seen, with the threshold.")

    class Meta:
        ref_name = "QualityFlag"


class AnnotatorStatsSerializer(serializers.Serializer):
    username = serializers.CharField()
    judgements = serializers.IntegerField()
    median_seconds = serializers.FloatField(allow_null=True, help_text="Time per task, lease to judgement.")
    p10_seconds = serializers.FloatField(allow_null=True, help_text="Its 10th percentile.")
    timed = serializers.IntegerField(help_text="Judgements with a lease to time them from.")
    loo_agreement = serializers.FloatField(
        allow_null=True, help_text="Share of votes equal to the other annotators' majority on the unit."
    )
    loo_compared = serializers.IntegerField(help_text="Votes on units where the others had a majority.")
    first_chosen = serializers.IntegerField(help_text='"A" chosen (ranking: the first shown above the second).')
    position_decisions = serializers.IntegerField(help_text="A/B choices (ranking: the first two not tied).")
    first_share = serializers.FloatField(allow_null=True)
    position_p_value = serializers.FloatField(allow_null=True, help_text="Exact two-sided binomial test against 0.5.")
    tie_rate = serializers.FloatField(allow_null=True, help_text="Ranking: the share of rankings with a tie.")
    both_bad_rate = serializers.FloatField(allow_null=True, help_text="Pairwise only.")
    skips = serializers.IntegerField(help_text="Tasks the annotator skipped.")
    gold_decisions = serializers.IntegerField(
        help_text="Decisions on gold items: a pairwise judgement, or each pair of a ranking the gold answer orders."
    )
    gold_correct = serializers.IntegerField(help_text="... that match the known answer.")
    gold_accuracy = serializers.FloatField(allow_null=True, help_text="Null without gold decisions.")
    gold_ci_low = serializers.FloatField(allow_null=True, help_text="95 % Wilson interval.")
    gold_ci_high = serializers.FloatField(allow_null=True)
    reliability = serializers.FloatField(
        allow_null=True,
        help_text="The chance the annotator names the better of two completions, as exports weight their votes: "
        "their own estimate, or the project's mean (reliability_own false). Null when filtered (it is estimated "
        "from the whole project) and for an excluded annotator.",
    )
    reliability_own = serializers.BooleanField(
        allow_null=True,
        help_text=f"Whether reliability is the annotator's own estimate ({MIN_GOLD} gold votes or {MIN_SHARED} votes "
        "on pairs others voted on too) rather than the project's mean. Null when filtered.",
    )
    reliability_votes = serializers.IntegerField(
        allow_null=True, help_text="Their votes on a pair's order that the estimate read. Null when filtered."
    )
    flags = FlagSerializer(many=True)

    class Meta:
        ref_name = "AnnotatorQuality"


class AgreementSerializer(serializers.Serializer):
    level = serializers.ChoiceField(choices=["nominal", "ordinal"])
    units = serializers.IntegerField(help_text="Units judged by two or more (pairwise: items; ranking: completions).")
    votes = serializers.IntegerField()
    alpha = serializers.FloatField(allow_null=True, help_text="Krippendorff's alpha; null with the reason in detail.")
    raw = serializers.FloatField(allow_null=True, help_text="Share of pairs of votes on a unit that agree.")
    detail = serializers.CharField(allow_blank=True)


class SplitUnitSerializer(serializers.Serializer):
    prompt_id = serializers.IntegerField()
    round = serializers.IntegerField(source="round_number")
    unit = serializers.CharField(help_text='Pairwise: the item key; ranking: "completion <id>".')
    votes = serializers.DictField(
        child=serializers.IntegerField(),
        help_text=f"Votes per category: {', '.join(PAIRWISE_CATEGORIES)} (first: the lower completion id "
        "preferred), or the rank.",
    )
    top_share = serializers.FloatField()


class SplitsSerializer(serializers.Serializer):
    unanimous = serializers.IntegerField()
    majority = serializers.IntegerField()
    no_majority = serializers.IntegerField()
    most_split = SplitUnitSerializer(many=True, help_text="Units without a majority, most votes first (20 at most).")


class ThresholdsSerializer(serializers.Serializer):
    min_judgements = serializers.IntegerField()
    too_fast_median_seconds = serializers.FloatField()
    position_share = serializers.FloatField()
    position_p_value = serializers.FloatField()
    min_gold = serializers.IntegerField()
    unreliable_below = serializers.FloatField(help_text="An annotator's own reliability below this is flagged.")


class QualityOutputSerializer(serializers.Serializer):
    mode = serializers.ChoiceField(choices=Project.Mode.choices)
    filters = serializers.DictField(source="filters.as_mapping", child=serializers.CharField())
    judgements = serializers.IntegerField()
    agreement = AgreementSerializer()
    splits = SplitsSerializer()
    annotators = AnnotatorStatsSerializer(many=True)
    thresholds = ThresholdsSerializer()
    reliability_method = serializers.CharField(
        allow_null=True, help_text="How reliability is estimated; null when filtered."
    )
    reliability_mean = serializers.FloatField(
        allow_null=True, help_text="The project's mean reliability, which annotators without their own estimate get."
    )
    reliability_note = serializers.CharField(help_text="What the reliability figures are, or why there are none.")
    gold = serializers.CharField(default=GOLD_NOTE, help_text="How gold accuracy is measured.")
    excluded = serializers.ListField(
        child=serializers.CharField(),
        default=list,
        help_text="Annotators whose judgements are left out of exports, training and battles (their figures are "
        "still here).",
    )
    computed_at = serializers.DateTimeField(
        help_text="When the judgements were read. Unfiltered figures come from a cache; filtered ones are computed "
        "for the request."
    )
    stale = serializers.BooleanField(
        help_text="Judgements, skips or exclusions came since computed_at (or the figures are over 30 minutes old): "
        "new figures are being computed."
    )
    freshness = serializers.CharField(help_text="How fresh the figures are, in words.")

    class Meta:
        ref_name = "ProjectQuality"


REVIEWER_ERRORS = {
    400: OpenApiResponse(OpenApiTypes.OBJECT, description="A filter that cannot be used: {field: [message]}."),
    401: NOT_AUTHENTICATED,
    403: FORBIDDEN,
    404: NOT_FOUND,
}


def _filters(request: Request, project: Project) -> QualityFilters:
    return quality_filters_parse(project=project, data=query_data(request))


class QualityApi(APIView):
    @extend_schema(
        operation_id="projects_quality",
        summary="Agreement and every annotator's statistics (reviewers and managers)",
        parameters=[QualityFiltersSerializer],
        responses={200: QualityOutputSerializer, **REVIEWER_ERRORS},
    )
    def get(self, request: Request, slug: str) -> Response:
        project = project_for_role(user=request.user, slug=slug, role=Membership.Role.REVIEWER)
        try:
            filters = _filters(request, project)
        except ValidationError as error:
            return Response(error.message_dict, status=status.HTTP_400_BAD_REQUEST)
        body = QualityOutputSerializer(project_quality_cached(project=project, filters=filters)).data
        body["excluded"] = sorted(
            AnnotatorExclusion.objects.filter(project=project).values_list("annotator__username", flat=True)
        )
        return Response(body)


class AnnotatorQualityApi(APIView):
    @extend_schema(
        operation_id="projects_quality_annotator",
        summary="One annotator's statistics (reviewers and managers)",
        parameters=[
            QualityFiltersSerializer,
            OpenApiParameter("username", str, OpenApiParameter.PATH, description="A member of the project."),
        ],
        responses={
            200: OpenApiResponse(
                AnnotatorStatsSerializer,
                description="The annotator's figures; headers Quality-Computed-At (when the judgements were read) "
                "and Quality-Stale (true: judgements came since and new figures are being computed), as the "
                "project's computed_at and stale.",
            ),
            **REVIEWER_ERRORS,
            404: OpenApiResponse(description="No such project (or not one of yours), or no such annotator in it."),
        },
    )
    def get(self, request: Request, slug: str, username: str) -> Response:
        project = project_for_role(user=request.user, slug=slug, role=Membership.Role.REVIEWER)
        try:
            filters = _filters(request, project)
        except ValidationError as error:
            return Response(error.message_dict, status=status.HTTP_400_BAD_REQUEST)
        stats, report = annotator_quality_report(project=project, username=username, filters=filters)
        headers = {
            "Quality-Computed-At": report.computed_at.isoformat(),
            "Quality-Stale": "true" if report.stale else "false",
        }
        return Response(AnnotatorStatsSerializer(stats).data, headers=headers)


class _AnnotatorExclusionApi(APIView):
    """Leave an annotator's judgements out of the project's exports, snapshots and battles, or count them again."""

    include = False

    class InputSerializer(serializers.Serializer):
        reason = StrictCharField(
            required=False, allow_blank=True, max_length=REASON_MAX, help_text="Why (kept with the exclusion)."
        )

        class Meta:
            ref_name = "AnnotatorExclusionRequest"

    class OutputSerializer(serializers.Serializer):
        username = serializers.CharField()
        excluded = serializers.BooleanField(help_text="Whether the annotator's judgements are left out now.")
        changed = serializers.BooleanField(help_text="False: they already were (or were not) excluded.")

        class Meta:
            ref_name = "AnnotatorExclusion"

    def post(self, request: Request, slug: str, username: str) -> Response:
        project = project_for_role(user=request.user, slug=slug, role=Membership.Role.MANAGER)
        body = self.InputSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        try:
            if self.include:
                changed = annotator_include(project=project, username=username)
            else:
                reason = body.validated_data.get("reason", "")
                by = request.user if isinstance(request.user, User) else None
                changed = annotator_exclude(project=project, username=username, by=by, reason=reason)
        except ValidationError as error:
            raise NotFound(" ".join(error.messages)) from None
        answer = {"username": username, "excluded": not self.include, "changed": changed}
        return Response(self.OutputSerializer(answer).data)


EXCLUSION_RESPONSES = {
    200: _AnnotatorExclusionApi.OutputSerializer,
    400: VALIDATION_ERROR,
    401: NOT_AUTHENTICATED,
    403: FORBIDDEN,
    404: OpenApiResponse(description="No such project (or not one of yours), or no one of that name annotated in it."),
}


class AnnotatorExcludeApi(_AnnotatorExclusionApi):
    @extend_schema(
        operation_id="projects_annotators_exclude",
        summary="Leave an annotator's judgements out of exports, training and battles (managers)",
        description="Nothing is deleted; POST .../include/ counts them again.",
        request=_AnnotatorExclusionApi.InputSerializer,
        responses=EXCLUSION_RESPONSES,
    )
    def post(self, request: Request, slug: str, username: str) -> Response:
        return super().post(request, slug, username)


class AnnotatorIncludeApi(_AnnotatorExclusionApi):
    include = True

    @extend_schema(
        operation_id="projects_annotators_include",
        summary="Count an excluded annotator's judgements again (managers)",
        request=_AnnotatorExclusionApi.InputSerializer,
        responses=EXCLUSION_RESPONSES,
    )
    def post(self, request: Request, slug: str, username: str) -> Response:
        return super().post(request, slug, username)
