"""Held-out accuracies are shown with a 95 % Wilson interval: on the training page and in `train --sync`'s report."""

import pytest

from feedback.models import Membership, Project
from feedback.selectors.models import accuracy_interval
from tests.factories import MembershipFactory, ModelVersionFactory, ProjectFactory


def test_the_interval_of_issue_19s_figures_overlaps_widely():
    # 11 of 22 and 6 of 22 held-out pairs: the "50.0% -> 27.3%" of the issue
    assert accuracy_interval(accuracy=11 / 22, pairs=22) == pytest.approx((0.3072, 0.6928), abs=1e-4)
    assert accuracy_interval(accuracy=6 / 22, pairs=22) == pytest.approx((0.1315, 0.4815), abs=1e-4)


def test_the_interval_stays_within_0_and_1_and_narrows_with_more_pairs():
    low, high = accuracy_interval(accuracy=1.0, pairs=14)
    assert 0.78 < low < 0.79 and high == 1.0
    assert accuracy_interval(accuracy=0.0, pairs=14)[0] == 0.0
    narrow = accuracy_interval(accuracy=0.5, pairs=400)
    assert narrow == pytest.approx((0.4513, 0.5487), abs=1e-4)


@pytest.mark.parametrize(("accuracy", "pairs"), [(None, 22), (0.5, 0), (0.5, None)])
def test_no_interval_without_an_accuracy_or_pairs(accuracy, pairs):
    assert accuracy_interval(accuracy=accuracy, pairs=pairs) is None


@pytest.mark.django_db
def test_the_training_page_shows_the_intervals_beside_the_held_out_accuracy(client):
    project = ProjectFactory(slug="loop", mode=Project.Mode.PAIRWISE)
    before = {"logp_accuracy": 0.5, "logp_accuracy_per_token": 0.5, "logp_margin": 0.0, "pairs": 22}
    after = {"logp_accuracy": 6 / 22, "logp_accuracy_per_token": 0.5, "logp_margin": -1.0, "pairs": 22}
    ModelVersionFactory(project=project, name="v1", metrics={"eval_before": before, "eval_after": after})
    ModelVersionFactory(
        project=project,
        name="reward-1",
        kind="reward",
        metrics={"eval_before": {"accuracy": 0.5, "pairs": 10}, "eval_after": {"accuracy": 0.9, "pairs": 10}},
    )
    client.force_login(MembershipFactory(project=project, role=Membership.Role.ANNOTATOR).user)

    page = client.get("/projects/loop/training/").content.decode()

    assert "0.500 → 0.273" in page and "(22 pairs)" in page
    assert "95 % interval 0.307–0.693 → 0.132–0.482" in page
    assert "95 % interval 0.237–0.763 → 0.596–0.982" in page  # the reward model's own accuracy
