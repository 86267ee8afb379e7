"""The promotion gate: a new version is promoted only when people prefer it, in blind battles, to the active one.

With a project's ``promote_when_preferred`` on, a run's new policy version does not replace the
active version (or the base model) by a rule on held-out figures: it is put in a battle against it
(``promotion_gate_open``), and after every battle judgement ``promotion_gate_check`` runs the
sequential test of ``selectors/leaderboard.py`` on the two writers' decisive battles. The test may be
checked after every judgement and still keeps the chance of promoting an equally good version below
5 %. Its decision (promote, reject, or wait), its figures and its time are kept in the version's
``gate``; staff can still promote any version by hand.
"""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from feedback.models import ModelVersion, Project
from feedback.selectors.battles import battle_rows
from feedback.selectors.leaderboard import preference_test
from feedback.services.model_versions import model_version_promote
from feedback.services.rounds import battle_request, round_enqueue, round_writers_default

WAIT, PROMOTE, REJECT = "wait", "promote", "reject"


def promotion_gate_open(*, version: ModelVersion) -> ModelVersion:
    """Start the version's battle against the active version (the base model when none is active).

    When no battle can start now (too few evaluation prompts, another round being written) the gate
    waits with the reason, and the worker's periodic tick tries again.
    """
    against = round_writers_default(project=version.project)[0]
    gate: dict[str, Any] = {"decision": WAIT, "against": against, "opened_at": timezone.now().isoformat()}
    version.gate = gate
    version.save(update_fields=["gate"])
    return _battle_start(version=version)


def _battle_start(*, version: ModelVersion) -> ModelVersion:
    gate = dict(version.gate)
    try:
        round = battle_request(project=version.project, candidate=version.name, against=gate["against"])
    except ValidationError as error:
        gate["problem"] = "No battle could start: " + " ".join(error.messages)
    else:
        round_enqueue(round=round)
        gate.pop("problem", None)
        gate["round"] = round.number
    version.gate = gate
    version.save(update_fields=["gate"])
    return version


def promotion_gate_check(*, project: Project) -> list[ModelVersion]:
    """Decide the project's waiting versions whose battles now say enough; returns the versions decided."""
    decided = []
    for version in ModelVersion.objects.filter(project=project, gate__decision=WAIT).select_related("project"):
        if version.is_active:  # promoted by hand meanwhile: nothing left to decide
            continue
        with transaction.atomic():
            if _decide(version=version):
                decided.append(version)
    return decided


def _decide(*, version: ModelVersion) -> bool:
    against = version.gate["against"]
    wins = losses = ties = 0
    for row in battle_rows(project=version.project, between=(version.name, against)):
        if row.winner.startswith("tie"):
            ties += 1
        elif (row.winner == "model_a") == (row.model_a == version.name):
            wins += 1
        else:
            losses += 1
    result = preference_test(wins=wins, losses=losses, ties=ties)
    now = timezone.now().isoformat()
    version.gate = {
        **version.gate,
        "decision": result.decision,
        "wins": wins,
        "losses": losses,
        "ties": ties,
        "log_likelihood_ratio": result.log_likelihood_ratio,
        "promote_above": result.promote_above,
        "reject_below": result.reject_below,
        "checked_at": now,
    }
    if result.decision != WAIT:
        version.gate["decided_at"] = now
    version.save(update_fields=["gate"])
    if result.decision == PROMOTE:
        model_version_promote(version=version)
    return result.decision != WAIT


def promotion_gate_tick() -> list[ModelVersion]:
    """Start the battles that could not start before, and decide what the battles already say."""
    waiting = ModelVersion.objects.filter(gate__decision=WAIT, gate__problem__isnull=False).select_related("project")
    started = [_battle_start(version=version) for version in waiting if not version.is_active]
    for project in Project.objects.filter(model_versions__gate__decision=WAIT).distinct():
        promotion_gate_check(project=project)
    return started
