"""Evaluations over the API: start a blind battle between two writers, read the leaderboard.

Managers and staff start battles (202, queued for the worker); a mistake in the body is a 400
naming the field and nothing is written, and a round being written refuses with a 409. Reviewers,
managers and staff read the leaderboard; annotators get 403, non-members 404.
"""

from __future__ import annotations

from typing import Any

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from feedback.api.rounds import RoundOutputSerializer, round_queued
from feedback.api.serializers import FORBIDDEN, NOT_AUTHENTICATED, NOT_FOUND, READ_ERRORS, ErrorSerializer
from feedback.models import Membership
from feedback.selectors.access import project_for_role
from feedback.selectors.battles import project_leaderboard
from feedback.services.rounds import MAX_ROUND_PROMPTS, MIN_BATTLE_PROMPTS, battle_request


class EvaluationStartApi(APIView):
    """POST starts a battle of a candidate version against another version or the base model (managers)."""

    class InputSerializer(serializers.Serializer):
        candidate = serializers.CharField(min_length=1, max_length=100, help_text="A version name of the project.")
        against = serializers.CharField(
            min_length=1,
            max_length=100,
            required=False,
            help_text="A version name or 'base'; the active version (else the base model) when left out.",
        )
        prompts = serializers.IntegerField(
            required=False,
            min_value=MIN_BATTLE_PROMPTS,
            max_value=MAX_ROUND_PROMPTS,
            help_text=f"Evaluation prompts to battle on (at least {MIN_BATTLE_PROMPTS}); all when left out.",
        )

        class Meta:
            ref_name = "EvaluationRequest"

    @extend_schema(
        operation_id="projects_evaluations_create",
        summary="Start a blind battle between two versions (managers)",
        description="Queues a battle round: one completion from each writer for each evaluation prompt, "
        "served to annotators as blind pairs at the project's battle share, never trained on.",
        request=InputSerializer,
        responses={
            202: RoundOutputSerializer,
            400: OpenApiResponse(
                OpenApiTypes.OBJECT,
                description="Nothing was queued: {field: [message]} for an unknown version, another project's "
                "version, a reward model, a candidate equal to its opponent, or too few evaluation prompts.",
            ),
            401: NOT_AUTHENTICATED,
            403: FORBIDDEN,
            404: NOT_FOUND,
            409: OpenApiResponse(ErrorSerializer, description="Another round of the project is queued or written."),
        },
    )
    def post(self, request: Request, slug: str) -> Response:
        project = project_for_role(user=request.user, slug=slug, role=Membership.Role.MANAGER)
        body = self.InputSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        data: dict[str, Any] = body.validated_data
        return round_queued(
            lambda: battle_request(
                project=project, candidate=data["candidate"], against=data.get("against"), prompts=data.get("prompts")
            )
        )


class LeaderboardModelSerializer(serializers.Serializer):
    name = serializers.CharField(help_text="A version name, or 'base'.")
    score = serializers.FloatField(help_text="Bradley-Terry strength, natural log-odds; the base model is 0.")
    ci_low = serializers.FloatField(help_text="95 % bootstrap interval over battles.")
    ci_high = serializers.FloatField()
    battles = serializers.IntegerField()
    wins = serializers.IntegerField()
    losses = serializers.IntegerField()
    ties = serializers.IntegerField(help_text="Ties and both-bad.")
    win_rate = serializers.FloatField(help_text="(wins + ties / 2) / battles.")
    length_controlled_score = serializers.FloatField(
        help_text="The strength with the answers' length difference as a covariate (style control)."
    )

    class Meta:
        ref_name = "LeaderboardModel"


class LeaderboardSerializer(serializers.Serializer):
    models = LeaderboardModelSerializer(many=True, help_text="Sorted by score, best first.")
    matrix = serializers.DictField(
        child=serializers.DictField(child=serializers.FloatField()),
        help_text="{a: {b: a's win rate over b, ties counting half}} for the pairs that met.",
    )

    class Meta:
        ref_name = "Leaderboard"


class LeaderboardApi(APIView):
    @extend_schema(
        operation_id="projects_leaderboard",
        summary="The project's versions ranked by blind battles (reviewers, managers)",
        responses={200: LeaderboardSerializer, 403: FORBIDDEN, **READ_ERRORS},
    )
    def get(self, request: Request, slug: str) -> Response:
        project = project_for_role(user=request.user, slug=slug, role=Membership.Role.REVIEWER)
        return Response(LeaderboardSerializer(project_leaderboard(project=project)).data)
