"""Each annotator's reliability in the quality figures: the value used, whether it is their own, the unreliable flag."""

from __future__ import annotations

import random
import uuid

import pytest
from rest_framework.test import APIClient

from feedback.models import Completion, Membership, PairwiseJudgement, Prompt
from feedback.selectors.quality import THRESHOLDS, project_quality
from feedback.selectors.reliability import METHOD
from feedback.services.annotators import annotator_exclude
from tests.factories import MembershipFactory, ProjectFactory, UserFactory, first_round

pytestmark = pytest.mark.django_db

CAREFUL = ("careful-1", "careful-2", "careful-3")
HABITS = (*CAREFUL, "random", "always-a", "adversarial")


def _pairs(project, n: int) -> list[tuple[Completion, Completion]]:
    """n prompts of two completions each, written in bulk: (better, worse), the better one at random of the two."""
    rng = random.Random(n)
    round_one = first_round(project)
    prompts = Prompt.objects.bulk_create(
        Prompt(project=project, messages=[{"role": "user", "content": f"Question {i}?"}]) for i in range(n)
    )
    completions = Completion.objects.bulk_create(
        Completion(prompt=prompt, round=round_one, text=f"Answer {j}", html=f"<p>Answer {j}</p>")
        for prompt in prompts
        for j in range(2)
    )
    pairs = [(completions[2 * i], completions[2 * i + 1]) for i in range(n)]
    return [pair if rng.random() < 0.5 else (pair[1], pair[0]) for pair in pairs]


def _judge(person, better: Completion, worse: Completion, *, right: bool, shown_better_first: bool):
    """A judgement, not saved: the better completion chosen when `right`, shown on the side given."""
    left, right_shown = (better, worse) if shown_better_first else (worse, better)
    choice = "a" if right == shown_better_first else "b"
    return PairwiseJudgement(
        project=better.prompt.project,
        annotator=person,
        prompt=better.prompt,
        round=better.round,
        left=left,
        right=right_shown,
        item_key=f"c{min(better.pk, worse.pk)}-{max(better.pk, worse.pk)}",
        choice=choice,
        client_uuid=uuid.uuid4(),
    )


def _simulate(project, people: dict, pairs, *, seed: int) -> None:
    """Everyone judges every pair, each shown in a random order: careful 90 % right, random 50 %, always-a picks
    the side shown first, adversarial 80 % wrong."""
    rng = random.Random(seed)
    made = []
    for better, worse in pairs:
        for name, person in people.items():
            better_first = rng.random() < 0.5
            if name == "always-a":
                right = better_first
            elif name == "random":
                right = rng.random() < 0.5
            elif name == "adversarial":
                right = rng.random() < 0.2
            else:
                right = rng.random() < 0.9
            made.append(_judge(person, better, worse, right=right, shown_better_first=better_first))
    PairwiseJudgement.objects.bulk_create(made)


@pytest.fixture
def simulated():
    project = ProjectFactory(slug="sim", mode="pairwise", completions_per_prompt=2)
    people = {name: MembershipFactory(project=project, user=UserFactory(username=name)).user for name in HABITS}
    _simulate(project, people, _pairs(project, 300), seed=16)
    return project


def test_a_seeded_simulation_flags_the_random_a_biased_and_adversarial_annotators_as_unreliable(simulated):
    report = project_quality(project=simulated)
    by_name = {stats.username: stats for stats in report.annotators}
    flags = {name: sorted(flag.code for flag in stats.flags) for name, stats in by_name.items()}
    assert flags == {
        "careful-1": [],
        "careful-2": [],
        "careful-3": [],
        "random": ["unreliable"],
        "always-a": ["position_bias", "unreliable"],
        "adversarial": ["unreliable"],
    }
    assert all(stats.reliability_own and stats.reliability_votes == 300 for stats in report.annotators)
    for name in CAREFUL:
        assert by_name[name].reliability == pytest.approx(0.9, abs=0.05), name
    for name in ("random", "always-a"):
        assert by_name[name].reliability == pytest.approx(0.5, abs=0.08), name
    assert by_name["adversarial"].reliability == pytest.approx(0.2, abs=0.06)
    assert report.reliability_method == METHOD
    assert report.reliability_mean == pytest.approx(sum(stats.reliability for stats in report.annotators) / len(HABITS))
    message = next(flag.message for flag in by_name["adversarial"].flags)
    assert "from 300 votes" in message and f"below {THRESHOLDS.unreliable_below:g}" in message


def test_a_newcomer_without_enough_shared_or_gold_votes_gets_the_project_mean_and_no_flag():
    project = ProjectFactory(mode="pairwise", completions_per_prompt=2)
    people = {name: UserFactory(username=name) for name in CAREFUL}
    pairs = _pairs(project, 40)
    _simulate(project, people, pairs, seed=3)
    newcomer = UserFactory(username="newcomer")
    member = MembershipFactory(project=project).user  # no judgement yet
    # always wrong, but only 19 votes on pairs others judged: too few for an estimate of their own
    PairwiseJudgement.objects.bulk_create(
        _judge(newcomer, better, worse, right=False, shown_better_first=n % 2 == 0)
        for n, (better, worse) in enumerate(pairs[:19])
    )
    report = project_quality(project=project)
    by_name = {stats.username: stats for stats in report.annotators}
    new = by_name["newcomer"]
    assert (new.reliability_own, new.reliability_votes) == (False, 19)
    assert new.reliability == report.reliability_mean
    assert new.flags == []
    assert all(by_name[name].reliability_own for name in CAREFUL)
    assert report.reliability_mean == pytest.approx(sum(by_name[name].reliability for name in CAREFUL) / 3)

    client = APIClient()
    client.force_login(MembershipFactory(project=project, role=Membership.Role.REVIEWER).user)
    url = f"/api/v1/projects/{project.slug}/quality/annotators/"
    body = client.get(f"{url}newcomer/").json()
    assert (body["reliability"], body["reliability_own"], body["reliability_votes"]) == (new.reliability, False, 19)
    body = client.get(f"{url}{member.username}/").json()
    assert (body["reliability"], body["reliability_own"], body["reliability_votes"]) == (
        report.reliability_mean,
        False,
        0,
    )


def test_the_api_and_the_page_show_reliability_and_filtered_figures_say_why_they_have_none(simulated):
    client = APIClient()
    client.force_login(MembershipFactory(project=simulated, role=Membership.Role.REVIEWER).user)
    body = client.get("/api/v1/projects/sim/quality/").json()
    assert body["reliability_method"] == METHOD and 0.5 < body["reliability_mean"] < 0.9
    assert body["thresholds"]["unreliable_below"] == THRESHOLDS.unreliable_below
    adversarial = next(a for a in body["annotators"] if a["username"] == "adversarial")
    assert adversarial["reliability_own"] is True and adversarial["reliability"] < THRESHOLDS.unreliable_below
    assert "unreliable" in {flag["code"] for flag in adversarial["flags"]}
    one = client.get("/api/v1/projects/sim/quality/annotators/adversarial/").json()
    assert one["reliability"] == adversarial["reliability"]

    filtered = client.get("/api/v1/projects/sim/quality/?created_from=2000-01-01").json()
    assert filtered["reliability_method"] is None and filtered["reliability_mean"] is None
    assert "filter cannot narrow it" in filtered["reliability_note"]
    assert all(
        (a["reliability"], a["reliability_own"], a["reliability_votes"]) == (None, None, None)
        for a in filtered["annotators"]
    )
    assert all("unreliable" not in {flag["code"] for flag in a["flags"]} for a in filtered["annotators"])

    html = client.get("/projects/sim/quality/").content.decode()
    assert "<th>Reliability</th>" in html and METHOD in html
    assert f"{adversarial['reliability']:.2f} from 300 votes" in html
    assert f"own reliability estimate is below {THRESHOLDS.unreliable_below}" in html
    page = client.get("/projects/sim/quality/?created_from=2000-01-01").content.decode()
    assert "filter cannot narrow it" in page

    annotator = APIClient()
    annotator.force_login(Membership.objects.get(project=simulated, user__username="careful-1").user)
    assert annotator.get("/api/v1/projects/sim/quality/annotators/careful-1/").status_code == 403


def test_an_exclusion_leaves_the_annotator_out_of_the_estimate_and_refreshes_the_cached_figures(simulated):
    client = APIClient()
    client.force_login(MembershipFactory(project=simulated, role=Membership.Role.REVIEWER).user)
    before = client.get("/api/v1/projects/sim/quality/").json()
    annotator_exclude(project=simulated, username="adversarial")
    after = client.get("/api/v1/projects/sim/quality/").json()
    adversarial = next(a for a in after["annotators"] if a["username"] == "adversarial")
    assert (adversarial["reliability"], adversarial["reliability_own"], adversarial["reliability_votes"]) == (
        None,
        False,
        0,
    )
    assert after["reliability_mean"] > before["reliability_mean"]
    assert "not estimated (excluded)" in client.get("/projects/sim/quality/").content.decode()
