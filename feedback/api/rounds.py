"""Rounds over the API: list a project's rounds, ask for a new one.

Members of a project (any role) and staff read; managers and staff ask. A new round is queued for
the worker (202); a mistake in the body is a 400 naming the field, and a round that is being
written refuses the request with a 409.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.core.exceptions import ValidationError
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import serializers, status
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from feedback.api.serializers import FORBIDDEN, NOT_AUTHENTICATED, NOT_FOUND, READ_ERRORS, ErrorSerializer
from feedback.models import Membership, Round
from feedback.selectors.access import project_for_role, user_manages_project
from feedback.selectors.rounds import RoundProgress, round_list
from feedback.services.rounds import MAX_ROUND_PROMPTS, STRATEGIES, round_enqueue, round_request


class RoundOutputSerializer(serializers.Serializer):
    id = serializers.IntegerField(source="round.pk")
    number = serializers.IntegerField(source="round.number")
    kind = serializers.ChoiceField(
        source="round.kind", choices=Round.Kind.choices, help_text="training, or battle (blind, never trained on)."
    )
    writers = serializers.ListField(
        source="round.writers",
        child=serializers.CharField(),
        help_text="Version names, or 'base'; a battle's writers are shown to its project's managers only.",
    )
    strategy = serializers.ChoiceField(source="round.strategy", choices=Round.Strategy.choices)
    prompts = serializers.IntegerField(
        source="round.prompt_limit", allow_null=True, help_text="N as asked; null for all prompts."
    )
    sampling = serializers.DictField(source="round.sampling", help_text="{k, temperature, top_p, max_new_tokens}.")
    status = serializers.ChoiceField(source="round.status", choices=Round.Status.choices)
    error = serializers.CharField(source="round.error", allow_blank=True)
    prompts_total = serializers.IntegerField(source="round.prompts_total", help_text="0 until the round starts.")
    prompts_written = serializers.IntegerField(source="round.prompts_written")
    completions = serializers.IntegerField(help_text="Completions written so far.")
    judgements = serializers.IntegerField(help_text="Judgements made on the round's items so far.")
    created_at = serializers.DateTimeField(source="round.created_at")
    started_at = serializers.DateTimeField(source="round.started_at", allow_null=True)
    finished_at = serializers.DateTimeField(source="round.finished_at", allow_null=True)

    class Meta:
        ref_name = "Round"


class RoundListApi(APIView):
    """GET lists a project's rounds, newest first; POST asks for a new one (managers)."""

    class InputSerializer(serializers.Serializer):
        prompts = serializers.IntegerField(
            required=False,
            allow_null=True,
            min_value=1,
            max_value=MAX_ROUND_PROMPTS,
            help_text="N; all prompts when left out.",
        )
        strategy = serializers.ChoiceField(
            choices=STRATEGIES, required=False, help_text="How prompts are chosen (default: oldest_round_first)."
        )
        versions = serializers.ListField(
            child=serializers.CharField(min_length=1, max_length=100),
            max_length=16,
            required=False,
            help_text="Writers: version names of the project, or 'base'; the active version when left out.",
        )

        class Meta:
            ref_name = "RoundRequest"

    @extend_schema(
        operation_id="projects_rounds_list",
        summary="A project's rounds, newest first, with their progress",
        responses={200: RoundOutputSerializer(many=True), **READ_ERRORS},
    )
    def get(self, request: Request, slug: str) -> Response:
        project = project_for_role(user=request.user, slug=slug, role=Membership.Role.ANNOTATOR)
        rounds = round_list(project=project)
        if not user_manages_project(user=request.user, project=project):
            for progress in rounds:  # what an annotator reads says nothing about who wrote a battle's answers
                if progress.round.kind == Round.Kind.BATTLE:
                    progress.round.writers = []
        return Response(RoundOutputSerializer(rounds, many=True).data)

    @extend_schema(
        operation_id="projects_rounds_create",
        summary="Ask for a new round (managers)",
        description="Queues a round of K fresh completions for the chosen prompts; the worker chooses "
        "them when it starts and writes them. A round that is queued and not started yet is replaced.",
        request=InputSerializer,
        responses={
            202: RoundOutputSerializer,
            400: OpenApiResponse(
                OpenApiTypes.OBJECT,
                description="Nothing was queued: {field: [message]} for prompts below 1, an unknown strategy, "
                "a version that is not one of the project's, or uncertain_first with no active version.",
            ),
            401: NOT_AUTHENTICATED,
            403: FORBIDDEN,
            404: NOT_FOUND,
            409: OpenApiResponse(ErrorSerializer, description="Another round of the project is being written."),
        },
    )
    def post(self, request: Request, slug: str) -> Response:
        project = project_for_role(user=request.user, slug=slug, role=Membership.Role.MANAGER)
        body = self.InputSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        data: dict[str, Any] = body.validated_data
        return round_queued(
            lambda: round_request(
                project=project,
                prompts=data.get("prompts"),
                strategy=data.get("strategy") or Round.Strategy.OLDEST_ROUND_FIRST,
                writers=data.get("versions"),
            )
        )


def round_queued(ask: Callable[[], Round]) -> Response:
    """Ask for a round and queue it for the worker: 202 with the round as queued; a 409 while another round of
    the project is open, a 400 naming the field for any other mistake (nothing is queued then)."""
    try:
        requested = ask()
    except ValidationError as error:
        if "round" in error.message_dict:
            return Response({"detail": " ".join(error.message_dict["round"])}, status=status.HTTP_409_CONFLICT)
        return Response(error.message_dict, status=status.HTTP_400_BAD_REQUEST)
    round_enqueue(round=requested)
    # As queued, not read back: a newer request may already have replaced it.
    queued = RoundProgress(round=requested, completions=0, judgements=0)
    return Response(RoundOutputSerializer(queued).data, status=status.HTTP_202_ACCEPTED)
