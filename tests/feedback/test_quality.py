"""Quality figures: agreement (Krippendorff's alpha, raw agreement, splits), filters, each annotator's statistics."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import krippendorff
import numpy as np
import pytest
from django.core.exceptions import ValidationError
from django.utils import timezone

from feedback.models import Assignment, Membership, PairwiseJudgement, RankingJudgement
from feedback.selectors.quality import (
    THRESHOLDS,
    QualityFilters,
    annotator_quality,
    binomial_p_value,
    project_quality,
    quality_filters_parse,
)
from tests.factories import AssignmentFactory, MembershipFactory, ModelVersionFactory, ProjectFactory, UserFactory
from tests.feedback.export_helpers import compare, make_prompt, rank

pytestmark = pytest.mark.django_db


def _pairwise_project(**kwargs):
    return ProjectFactory(mode="pairwise", completions_per_prompt=2, **kwargs)


def test_alpha_matches_a_hand_worked_example():
    # Three pairs: two annotators prefer the first; one says first, one second; three say tie.
    # Coincidences: first-first 2, first-second 1 and second-first 1, tie-tie 3 (six ordered pairs / (3 - 1)).
    # n = 7 (first 3, second 1, tie 3); D_o = 2/7; D_e = 2 (3*1 + 3*3 + 1*3) / (7*6) = 5/7; alpha = 1 - 2/5.
    project = _pairwise_project()
    people = UserFactory.create_batch(3)
    votes = [["a", "a"], ["a", "b"], ["tie", "tie", "tie"]]
    for choices in votes:
        _, (low, high) = make_prompt(project, k=2)
        for person, choice in zip(people, choices, strict=False):
            compare(person, low, high, choice)
    agreement = project_quality(project=project).agreement
    assert agreement.level == "nominal"
    assert agreement.units == 3 and agreement.votes == 7
    assert agreement.alpha == pytest.approx(0.6)
    # pairs of votes that agree: 2 + 0 + 6 of 2 + 2 + 6
    assert agreement.raw == pytest.approx(8 / 10)


def test_a_choice_counts_for_the_completion_whatever_side_it_was_shown_on():
    project = _pairwise_project()
    first, second = UserFactory.create_batch(2)
    _, (low, high) = make_prompt(project, k=2)
    compare(first, low, high, "a")
    compare(second, high, low, "b")  # the same completion, shown on the other side
    _, (low, high) = make_prompt(project, k=2)
    compare(first, low, high, "a")
    compare(second, high, low, "a")
    report = project_quality(project=project)
    assert report.splits.unanimous == 1 and report.splits.no_majority == 1
    (split,) = report.splits.most_split
    assert split.votes == {"first": 1, "second": 1} and split.top_share == 0.5


def _reliability_data(project, annotators):
    """Annotators x units for the package's own input: pairwise choices as the content they name."""
    units = {}
    for judgement in PairwiseJudgement.objects.filter(project=project):
        low_won = (judgement.choice == "a") == (judgement.left_id < judgement.right_id)
        value = {"tie": 2, "both_bad": 3}.get(judgement.choice, 0 if low_won else 1)
        units.setdefault(judgement.item_key, {})[judgement.annotator_id] = value
    return [[units[key].get(person.pk, np.nan) for key in sorted(units)] for person in annotators]


def test_pairwise_alpha_equals_the_package_on_the_raw_votes():
    rng = random.Random(3)
    project = _pairwise_project()
    people = UserFactory.create_batch(4)
    for _ in range(30):
        _, (low, high) = make_prompt(project, k=2)
        for person in rng.sample(people, rng.randint(1, 4)):
            choice = rng.choice(["a", "a", "a", "b", "tie", "both_bad"])
            left, right = (low, high) if rng.random() < 0.5 else (high, low)
            compare(person, left, right, choice)
    expected = krippendorff.alpha(
        reliability_data=_reliability_data(project, people), value_domain=[0, 1, 2, 3], level_of_measurement="nominal"
    )
    assert project_quality(project=project).agreement.alpha == pytest.approx(expected)


def test_ranking_alpha_is_ordinal_over_ranks_and_equals_the_package():
    rng = random.Random(5)
    project = ProjectFactory(mode="ranking", completions_per_prompt=4)
    people = UserFactory.create_batch(3)
    for _ in range(12):
        prompt, completions = make_prompt(project, k=4)
        for person in people:
            shuffled = rng.sample(completions, 4)
            levels = [[shuffled[0]], shuffled[1:3], [shuffled[3]]] if rng.random() < 0.3 else [[c] for c in shuffled]
            rank(person, prompt, levels)
    data = {}
    for judgement in RankingJudgement.objects.filter(project=project).prefetch_related("ranked"):
        for placed in judgement.ranked.all():
            data.setdefault(placed.completion_id, {})[judgement.annotator_id] = placed.rank
    reliability = [[data[unit].get(person.pk, np.nan) for unit in sorted(data)] for person in people]
    expected = krippendorff.alpha(reliability_data=reliability, level_of_measurement="ordinal")
    agreement = project_quality(project=project).agreement
    assert agreement.level == "ordinal"
    assert agreement.units == 48
    assert agreement.alpha == pytest.approx(expected)


def test_no_item_with_two_judges_is_not_enough_overlap_rather_than_nan():
    project = _pairwise_project()
    for person in UserFactory.create_batch(2):
        _, (low, high) = make_prompt(project, k=2)
        compare(person, low, high, "a")
    agreement = project_quality(project=project).agreement
    assert agreement.alpha is None and agreement.raw is None and agreement.units == 0
    assert agreement.detail.startswith("Not enough overlap")
    empty = project_quality(project=_pairwise_project())
    assert empty.agreement.alpha is None and empty.judgements == 0 and empty.annotators == []


def test_shared_items_with_one_value_only_say_alpha_is_undefined():
    project = _pairwise_project()
    people = UserFactory.create_batch(2)
    _, (low, high) = make_prompt(project, k=2)
    for person in people:
        compare(person, low, high, "tie")
    agreement = project_quality(project=project).agreement
    assert agreement.alpha is None and agreement.raw == 1.0
    assert "undefined" in agreement.detail


def test_filters_limit_the_judgements_read():
    project = _pairwise_project()
    version = ModelVersionFactory(project=project, name="v2")
    people = UserFactory.create_batch(2)
    tagged, (low, high) = make_prompt(project, k=2)
    tagged.metadata = {"topic": "python"}
    tagged.save()
    for person in people:
        compare(person, low, high, "a")
    _, (low, high) = make_prompt(project, k=2)
    high.model_version = version
    high.save()
    old = [compare(person, low, high, choice) for person, choice in zip(people, ["a", "b"], strict=True)]
    PairwiseJudgement.objects.filter(pk__in=[j.pk for j in old]).update(created_at=timezone.now() - timedelta(days=10))

    def units(**query):
        return project_quality(project=project, filters=quality_filters_parse(project=project, data=query))

    assert units().agreement.units == 2
    by_topic = units(metadata_key="topic", metadata_value="python")
    assert by_topic.agreement.units == 1 and by_topic.splits.unanimous == 1
    by_version = units(model_version="v2")
    assert by_version.agreement.units == 1 and by_version.splits.no_majority == 1
    recent = units(created_from=(timezone.now() - timedelta(days=1)).date().isoformat())
    assert recent.judgements == 2 and recent.splits.unanimous == 1


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ({"created_from": "yesterday"}, "created_from"),
        ({"created_from": "2025-01-02", "created_before": "2025-01-01"}, "created_before"),
        ({"model_version": "nope"}, "model_version"),
        ({"metadata_key": "topic"}, "metadata_value"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_a_bad_filter_names_its_field(query, field):
    project = _pairwise_project()
    with pytest.raises(ValidationError) as raised:
        quality_filters_parse(project=project, data=query)
    assert field in raised.value.message_dict


def test_a_far_offset_is_read_as_its_moment_in_utc_and_a_moment_beyond_the_calendar_is_named():
    project = _pairwise_project()
    # PostgreSQL refuses offsets beyond 15:59 in a query; the filter holds the same moment in UTC
    filters = quality_filters_parse(project=project, data={"created_from": "2025-03-30T00:16:31-19:01"})
    assert filters.created_from == datetime(2025, 3, 30, 19, 17, 31, tzinfo=UTC)
    assert project_quality(project=project, filters=filters).judgements == 0
    with pytest.raises(ValidationError) as raised:
        quality_filters_parse(project=project, data={"created_before": "0001-01-01T00:00:00+05:00"})
    assert raised.value.message_dict == {
        "created_before": ["'0001-01-01T00:00:00+05:00' is not an ISO date or date-time of the years 1 to 9999 (UTC)."]
    }


def test_binomial_p_value_is_the_exact_two_sided_test():
    assert binomial_p_value(successes=5, trials=10) == 1.0
    assert binomial_p_value(successes=0, trials=3) == pytest.approx(2 * 0.125)
    # P(X <= 2) for n = 10 is 56 / 1024
    assert binomial_p_value(successes=8, trials=10) == pytest.approx(2 * 56 / 1024)
    assert binomial_p_value(successes=900, trials=1000) < 1e-100


def test_time_per_task_runs_from_the_lease_to_the_judgement_and_skips_are_the_annotators():
    project = _pairwise_project()
    person = UserFactory()
    now = timezone.now()
    for seconds in (2, 4, 6, 8, 10, 12, 14, 16, 18, 20):
        prompt, (low, high) = make_prompt(project, k=2)
        lease = AssignmentFactory(
            prompt=prompt, annotator=person, item_key=f"x{prompt.pk}", state=Assignment.State.DONE
        )
        judgement = compare(person, low, high, "a", assignment=lease)
        Assignment.objects.filter(pk=lease.pk).update(created_at=now - timedelta(seconds=seconds))
        PairwiseJudgement.objects.filter(pk=judgement.pk).update(created_at=now)
    for reason in ("", "Cannot be shown: a completion was deleted."):
        AssignmentFactory(
            prompt=make_prompt(project, k=2)[0],
            annotator=person,
            state=Assignment.State.SKIPPED,
            slot=None,
            skip_reason=reason,
        )
    stats = annotator_quality(project=project, username=person.username)
    assert stats.judgements == 10 and stats.timed == 10
    assert stats.median_seconds == pytest.approx(10.0)
    assert stats.p10_seconds == pytest.approx(2.0)
    assert stats.skips == 1
    assert stats.gold_accuracy is None


def test_an_unknown_annotator_is_a_404_and_a_member_without_judgements_has_empty_figures():
    from django.http import Http404

    project = _pairwise_project()
    member = MembershipFactory(project=project, role=Membership.Role.ANNOTATOR).user
    stats = annotator_quality(project=project, username=member.username)
    assert stats.judgements == 0 and stats.flags == []
    with pytest.raises(Http404):
        annotator_quality(project=project, username=UserFactory().username)
    with pytest.raises(Http404):
        annotator_quality(project=project, username="nobody-at-all")


def test_a_seeded_simulation_flags_the_biased_and_hasty_annotators_and_not_the_careful_ones():
    """300 pairs with a known better side; 3 careful annotators (90 % right), 1 random, 1 always "A", 1 too fast."""
    rng = random.Random(16)
    project = _pairwise_project()
    names = ["careful-1", "careful-2", "careful-3", "random", "always-a", "hasty"]
    people = {name: UserFactory(username=name) for name in names}
    now = timezone.now()
    leases, judgements = [], []
    for n in range(300):
        prompt, (better, worse) = make_prompt(project, k=2)
        for name in rng.sample(names, 3):
            left, right = (better, worse) if rng.random() < 0.5 else (worse, better)
            if name == "always-a":
                choice = "a"
            elif name == "random":
                choice = rng.choice(["a", "b"])
            else:
                right_side = "a" if left == better else "b"
                choice = right_side if rng.random() < 0.9 else {"a": "b", "b": "a"}[right_side]
            seconds = rng.uniform(1, 2.5) if name == "hasty" else rng.uniform(8, 40)
            leases.append((f"s{n}-{name}", seconds))
            judgements.append((people[name], prompt, left, right, choice, f"s{n}-{name}"))
    made = {}
    for person, prompt, left, right, choice, key in judgements:
        lease = AssignmentFactory(prompt=prompt, annotator=person, item_key=key, state=Assignment.State.DONE)
        made[key] = lease.pk
        compare(person, left, right, choice, assignment=lease)
    for key, seconds in leases:
        Assignment.objects.filter(pk=made[key]).update(created_at=now - timedelta(seconds=seconds))
    PairwiseJudgement.objects.filter(project=project).update(created_at=now)

    report = project_quality(project=project)
    flags = {stats.username: {flag.code for flag in stats.flags} for stats in report.annotators}
    # right half the time on shuffled sides, both are unreliable too (tests/feedback/test_quality_reliability.py)
    assert flags["always-a"] == {"position_bias", "unreliable"}
    assert flags["random"] == {"unreliable"}
    assert flags["hasty"] == {"too_fast"}
    for name in ("careful-1", "careful-2", "careful-3"):
        assert flags[name] == set(), name
    by_name = {stats.username: stats for stats in report.annotators}
    assert by_name["always-a"].first_share == 1.0
    assert by_name["always-a"].position_p_value < THRESHOLDS.position_p_value
    assert by_name["careful-1"].loo_agreement > by_name["random"].loo_agreement
    assert "65%" in next(iter(by_name["always-a"].flags)).message
    assert report.agreement.units == 300 and report.agreement.alpha is not None


def test_ranking_position_bias_compares_the_first_two_shown():
    project = ProjectFactory(mode="ranking", completions_per_prompt=3)
    person = UserFactory()
    for n in range(30):
        prompt, completions = make_prompt(project, k=3)
        levels = [[c] for c in completions] if n % 3 else [completions[:2], completions[2:]]  # a tie every third
        rank(person, prompt, levels)  # always the one shown first on top
    (stats,) = project_quality(project=project).annotators
    assert stats.judgements == 30
    assert stats.position_decisions == 20 and stats.first_chosen == 20
    assert stats.tie_rate == pytest.approx(10 / 30)
    assert stats.both_bad_rate is None
    assert {flag.code for flag in stats.flags} == {"position_bias"}


def test_unfiltered_filters_are_empty():
    assert not QualityFilters().any and QualityFilters().as_mapping() == {}
