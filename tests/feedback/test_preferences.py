"""The preference selector: pairs from rankings and comparisons, consensus, GRPO rewards, filters, shapes."""

from datetime import timedelta

import pytest
from django.utils import timezone

from feedback.models import RankingJudgement
from feedback.selectors.preferences import (
    ExportOptionsError,
    PreferenceExportOptions,
    annotator_pseudonym,
    places_from_ranks,
    preference_rows,
    ranking_pairs,
)
from tests.factories import CompletionFactory, ModelVersionFactory, ProjectFactory, PromptFactory, UserFactory
from tests.feedback.export_helpers import compare, fast_password_hashing, make_prompt, rank

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _fast_hashing(settings):
    fast_password_hashing(settings)


def rows(project, **options):
    return list(preference_rows(project=project, options=PreferenceExportOptions(**options)))


def by_pair(dpo_rows):
    return {(r["chosen_id"], r["rejected_id"]): (r["votes"], r["agreement"]) for r in dpo_rows}


def test_places_share_the_mean_of_tied_places():
    assert places_from_ranks(ranks=[1, 2, 2, 3]) == [1, 2.5, 2.5, 4]
    assert places_from_ranks(ranks=[1, 1, 1]) == [2, 2, 2]


def test_ranking_pairs_per_mode_never_pair_tied_completions():
    ranks = (1, 2, 2, 3)
    assert sorted(ranking_pairs(ranks=ranks, mode="all")) == [(0, 1), (0, 2), (0, 3), (1, 3), (2, 3)]
    assert sorted(ranking_pairs(ranks=ranks, mode="best_vs_rest")) == [(0, 1), (0, 2), (0, 3)]
    assert sorted(ranking_pairs(ranks=ranks, mode="adjacent")) == [(0, 1), (0, 2), (1, 3), (2, 3)]
    assert sorted(ranking_pairs(ranks=(1, 1, 2), mode="best_vs_rest")) == [(0, 2), (1, 2)]


@pytest.fixture
def three_rankings():
    """Three annotators rank a, b, c, d; they disagree on a vs b and tie different completions."""
    project = ProjectFactory()
    prompt, (a, b, c, d) = make_prompt(project, text="Which is best?")
    one, two, three = UserFactory(), UserFactory(), UserFactory()
    rank(one, prompt, [[a], [b, c], [d]])
    rank(two, prompt, [[b], [a], [c], [d]])
    rank(three, prompt, [[a], [b], [c, d]])
    return project, prompt, (a, b, c, d), (one, two, three)


def test_all_pairs_count_votes_and_agreement_across_annotators(three_rankings):
    project, prompt, (a, b, c, d), _ = three_rankings
    result = rows(project)
    assert by_pair(result) == {
        (a.pk, b.pk): (3, pytest.approx(2 / 3)),
        (a.pk, c.pk): (3, 1.0),
        (a.pk, d.pk): (3, 1.0),
        (b.pk, c.pk): (2, 1.0),  # one annotator tied b and c: no vote
        (b.pk, d.pk): (3, 1.0),
        (c.pk, d.pk): (2, 1.0),
    }
    first = result[0]
    assert first["prompt"] == "Which is best?"
    assert first["chosen"] == a.text and first["rejected"] == b.text
    assert first["prompt_id"] == prompt.pk
    assert first["weight"] == first["agreement"]


def test_min_agreement_leaves_out_contested_pairs(three_rankings):
    project, _, (a, b, _, _), _ = three_rankings
    pairs = by_pair(rows(project, min_agreement=0.7))
    assert (a.pk, b.pk) not in pairs and len(pairs) == 5
    assert len(rows(project, min_agreement=2 / 3)) == 6


def test_best_vs_rest_and_adjacent_pairs(three_rankings):
    project, _, (a, b, c, d), _ = three_rankings
    assert by_pair(rows(project, pairs="best_vs_rest")) == {
        (a.pk, b.pk): (3, pytest.approx(2 / 3)),
        (a.pk, c.pk): (2, 1.0),
        (a.pk, d.pk): (2, 1.0),
        (b.pk, c.pk): (1, 1.0),
        (b.pk, d.pk): (1, 1.0),
    }
    assert by_pair(rows(project, pairs="adjacent")) == {
        (a.pk, b.pk): (3, pytest.approx(2 / 3)),
        (a.pk, c.pk): (2, 1.0),
        (b.pk, c.pk): (1, 1.0),
        (b.pk, d.pk): (2, 1.0),
        (c.pk, d.pk): (2, 1.0),
    }


def test_evenly_split_pairs_are_left_out():
    project = ProjectFactory()
    prompt, (a, b) = make_prompt(project, k=2)
    rank(UserFactory(), prompt, [[a], [b]])
    rank(UserFactory(), prompt, [[b], [a]])
    rank(UserFactory(), prompt, [[a, b]])
    assert rows(project) == []


def test_pairwise_choices_ties_and_both_bad():
    project = ProjectFactory(mode="pairwise")
    prompt, (x, y, z) = make_prompt(project, k=3)
    one, two, three = UserFactory(), UserFactory(), UserFactory()
    compare(one, x, y, "a")
    compare(two, y, x, "b")  # x shown on the right and chosen
    compare(three, x, y, "tie")
    compare(one, x, z, "a")
    compare(two, x, z, "b")  # one vote each: left out
    compare(one, y, z, "both_bad")
    compare(two, z, y, "tie")  # no vote for either side: left out
    assert by_pair(rows(project)) == {(x.pk, y.pk): (2, 1.0)}


def test_pairwise_and_ranking_votes_add_up():
    project = ProjectFactory()
    prompt, (a, b) = make_prompt(project, k=2)
    rank(UserFactory(), prompt, [[b], [a]])
    compare(UserFactory(), a, b, "a")
    compare(UserFactory(), b, a, "b")
    assert by_pair(rows(project)) == {(a.pk, b.pk): (3, pytest.approx(2 / 3))}


def test_grpo_rewards_are_means_over_annotators(three_rankings):
    project, prompt, (a, b, c, d), _ = three_rankings
    [row] = rows(project, format="grpo")
    assert row["completion_ids"] == [a.pk, b.pk, c.pk, d.pk]
    assert row["completions"] == [a.text, b.text, c.text, d.text]
    assert row["rewards"] == pytest.approx([8 / 9, 13 / 18, 1 / 3, 1 / 18])
    assert row["ranks"] == pytest.approx([4 / 3, 11 / 6, 3, 23 / 6])
    assert row["annotators"] == 3
    assert row["prompt_id"] == prompt.pk


def test_grpo_single_ranking_with_ties():
    project = ProjectFactory()
    prompt, (a, b, c, d) = make_prompt(project)
    rank(UserFactory(), prompt, [[c], [a, d], [b]])
    [row] = rows(project, format="grpo")
    assert row["rewards"] == [0.5, 0.0, 1.0, 0.5]
    assert row["ranks"] == [2.5, 4.0, 1.0, 2.5]


def test_filters_by_annotator_date_and_model_version(three_rankings):
    project, prompt, (a, b, c, d), (one, two, three) = three_rankings
    assert by_pair(rows(project, annotator_ids=(two.pk,))) == {
        (b.pk, a.pk): (1, 1.0),
        (a.pk, c.pk): (1, 1.0),
        (a.pk, d.pk): (1, 1.0),
        (b.pk, c.pk): (1, 1.0),
        (b.pk, d.pk): (1, 1.0),
        (c.pk, d.pk): (1, 1.0),
    }
    old = timezone.now() - timedelta(days=30)
    RankingJudgement.objects.filter(annotator=one).update(created_at=old)
    recent = rows(project, format="grpo", created_from=old + timedelta(days=1))
    assert recent[0]["annotators"] == 2
    assert rows(project, format="grpo", created_before=old + timedelta(days=1))[0]["annotators"] == 1

    version = ModelVersionFactory(project=project)
    for completion in (a, c, d):
        completion.model_version = version
        completion.save()
    pairs = by_pair(rows(project, model_version_ids=(version.pk,)))
    assert pairs == {(a.pk, c.pk): (3, 1.0), (a.pk, d.pk): (3, 1.0), (c.pk, d.pk): (2, 1.0)}
    [group] = rows(project, format="grpo", model_version_ids=(version.pk,))
    assert group["completion_ids"] == [a.pk, c.pk, d.pk]


def test_split_by_prompt_is_deterministic_and_disjoint():
    project = ProjectFactory()
    annotator = UserFactory()
    for _ in range(40):
        prompt, (a, b) = make_prompt(project, k=2)
        rank(annotator, prompt, [[a], [b]])
    train = {r["prompt_id"] for r in rows(project, split="train", test_fraction=0.25)}
    test = {r["prompt_id"] for r in rows(project, split="test", test_fraction=0.25)}
    assert train.isdisjoint(test) and len(train | test) == 40
    assert 2 <= len(test) <= 20
    assert test == {r["prompt_id"] for r in rows(project, split="test", test_fraction=0.25)}
    assert test != {r["prompt_id"] for r in rows(project, split="test", test_fraction=0.25, split_seed="other")}


def test_conversational_shapes_are_trl_message_lists():
    project = ProjectFactory()
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Name a colour."},
    ]
    prompt = PromptFactory(project=project, messages=messages)
    a, b = CompletionFactory(prompt=prompt, text="Red."), CompletionFactory(prompt=prompt, text="Blue.")
    rank(UserFactory(), prompt, [[a], [b]])
    [row] = rows(project, conversational=True)
    assert row["prompt"] == messages
    assert row["chosen"] == [{"role": "assistant", "content": "Red."}]
    assert row["rejected"] == [{"role": "assistant", "content": "Blue."}]
    [plain] = rows(project)
    assert plain["prompt"] == "System: Be brief.\n\nUser: Hi\n\nAssistant: Hello.\n\nUser: Name a colour."
    [group] = rows(project, format="grpo", conversational=True)
    assert group["completions"][0] == [{"role": "assistant", "content": "Red."}]


def test_judgement_rows_are_raw_and_pseudonymised_on_request(three_rankings):
    project, prompt, (a, b, c, d), (one, two, three) = three_rankings
    compare(one, a, b, "both_bad", strength="", rationale="both wrong", time_ms=1200)
    raw = rows(project, format="judgements")
    assert [r["kind"] for r in raw] == ["pairwise", "ranking", "ranking", "ranking"]
    assert raw[0]["choice"] == "both_bad" and raw[0]["completion_ids"] == [a.pk, b.pk]
    assert raw[0]["rationale"] == "both wrong" and raw[0]["time_ms"] == 1200
    assert raw[0]["annotator"] == str(one.pk)
    assert raw[1]["completion_ids"] == [a.pk, b.pk, c.pk, d.pk] and raw[1]["ranks"] == [1, 2, 2, 3]
    assert raw[2]["completion_ids"] == [b.pk, a.pk, c.pk, d.pk] and raw[2]["ranks"] == [1, 2, 3, 4]
    hidden = rows(project, format="judgements", pseudonymise=True)
    assert hidden[0]["annotator"] == annotator_pseudonym(annotator_id=one.pk) == hidden[1]["annotator"]
    assert str(one.pk) not in {r["annotator"] for r in hidden}
    assert len({r["annotator"] for r in hidden}) == 3


def test_prompts_without_judgements_give_no_rows_and_bad_options_are_refused():
    project = ProjectFactory()
    make_prompt(project)
    assert rows(project) == rows(project, format="grpo") == rows(project, format="judgements") == []
    for bad in ({"format": "csv"}, {"pairs": "some"}, {"min_agreement": 1.5}, {"test_fraction": 0}, {"split": "dev"}):
        with pytest.raises(ExportOptionsError) as error:
            PreferenceExportOptions(**bad)
        assert error.value.field == next(iter(bad))
