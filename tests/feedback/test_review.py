"""The reviewer's queue: which items wait and in what order, one item's page, verdicts and their undoing,
over the services, the API and the pages, and who may do any of it."""

import re

import pytest
from django.core.exceptions import PermissionDenied, ValidationError
from django.http import Http404
from django.test import Client
from rest_framework.test import APIClient

from feedback.models import Adjudication, Membership, PairwiseJudgement, Project, Round
from feedback.selectors.review import (
    contention_score,
    item_key_parse,
    review_item,
    review_queue,
    verdicts_in_force,
)
from feedback.services.adjudications import adjudication_record, adjudication_undo
from tests.factories import (
    CompletionFactory,
    MembershipFactory,
    ProjectFactory,
    PromptFactory,
    RoundFactory,
    UserFactory,
)
from tests.feedback.export_helpers import compare, make_prompt, rank

pytestmark = pytest.mark.django_db

SLUG = "rev"


def _key(low, high) -> str:
    return f"c{min(low.pk, high.pk)}-{max(low.pk, high.pk)}"


@pytest.fixture
def people():
    project = ProjectFactory(slug=SLUG, name="Review project", mode=Project.Mode.PAIRWISE, completions_per_prompt=2)
    made = {"project": project}
    for name, role in [
        ("rita", Membership.Role.REVIEWER),
        ("mona", Membership.Role.MANAGER),
        ("ann", Membership.Role.ANNOTATOR),
        ("bob", Membership.Role.ANNOTATOR),
        ("cat", Membership.Role.ANNOTATOR),
    ]:
        made[name] = MembershipFactory(project=project, role=role, user=UserFactory(username=name)).user
    made["stranger"] = MembershipFactory(user=UserFactory(username="stranger"), role=Membership.Role.MANAGER).user
    return made


@pytest.fixture
def pairwise(people):
    """Pairwise items (one per prompt) with known votes: split 1-1 (P1), 2-1 (P2), unanimous (P3), three ways
    (P4), one vote failing the gold answer (P5), unanimous by content though shown on opposite sides (P6), and
    a split battle pair (never reviewable)."""
    project = people["project"]
    ann, bob, cat = people["ann"], people["bob"], people["cat"]
    items = {}

    def item(name, votes, prompt=None, round_=None):
        prompt = prompt or PromptFactory(project=project, messages=[{"role": "user", "content": f"Question {name}?"}])
        extra = {"round": round_} if round_ else {}
        low, high = (CompletionFactory(prompt=prompt, text=f"{name} answer {n}", **extra) for n in range(2))
        for who, choice in zip((ann, bob, cat), votes, strict=False):
            compare(who, low, high, choice, round=low.round)
        items[name] = (_key(low, high), low, high)

    item("P1", ["a", "b"])
    item("P2", ["a", "a", "b"])
    item("P3", ["a", "a"])
    item("P4", ["tie", "both_bad", "a"])
    imported = RoundFactory(project=project, strategy=Round.Strategy.IMPORTED)
    gold_prompt = PromptFactory(project=project, gold={"choice": "a"}, messages=[{"role": "user", "content": "Gold?"}])
    item("P5", ["b"], prompt=gold_prompt, round_=imported)
    item("P6", [])
    _, low, high = items["P6"]
    compare(ann, low, high, "a", round=low.round)
    compare(bob, high, low, "b", round=low.round)  # shown the other way round: still the lower id preferred
    battle = RoundFactory(project=project, kind=Round.Kind.BATTLE, strategy=Round.Strategy.EVALUATION)
    evaluation = PromptFactory(project=project, split="eval")
    item("battle", ["a", "b"], prompt=evaluation, round_=battle)
    return items


# --- the queue ----------------------------------------------------------------------------------------------


def test_the_queue_lists_split_and_gold_failing_items_most_contentious_first(people, pairwise):
    queue = review_queue(project=people["project"])
    assert [q.item_key for q in queue] == [pairwise[name][0] for name in ("P4", "P1", "P5", "P2")]
    assert [round(q.contention, 4) for q in queue] == [0.6667, 0.5, 0.5, 0.3333]
    assert [(q.votes, q.gold_failures, q.flagged_votes, q.reasons) for q in queue] == [
        (3, 0, 0, ["split"]),
        (2, 0, 0, ["split"]),
        (1, 1, 0, ["gold"]),
        (3, 0, 0, ["split"]),
    ]
    assert review_queue(project=people["project"], state="adjudicated") == []


def test_a_verdict_moves_an_item_from_open_to_adjudicated_and_undo_moves_it_back(people, pairwise):
    project, rita = people["project"], people["rita"]
    p1, p3 = pairwise["P1"][0], pairwise["P3"][0]
    adjudication_record(project=project, reviewer=rita, item_key=p1, verdict="b")
    adjudication_record(project=project, reviewer=rita, item_key=p3, verdict="unusable")  # agreed, still listed
    assert [q.item_key for q in review_queue(project=project)] == [pairwise[n][0] for n in ("P4", "P5", "P2")]
    adjudicated = review_queue(project=project, state="adjudicated")
    assert [(q.item_key, q.verdict) for q in adjudicated] == [(p1, "b"), (p3, "unusable")]
    adjudication_undo(project=project, user=rita, item_key=p1)
    assert [q.item_key for q in review_queue(project=project, state="adjudicated")] == [p3]
    assert [q.item_key for q in review_queue(project=project)][:2] == [pairwise["P4"][0], p1]


def test_an_unknown_state_is_named():
    with pytest.raises(ValidationError) as caught:
        review_queue(project=ProjectFactory(), state="closed")
    assert list(caught.value.message_dict) == ["state"]


def test_flagged_annotators_raise_an_items_contention(people):
    """An annotator choosing A (shown first) on 20 of 20 pairs is flagged for position bias; each of their votes
    counts in the item's flagged share."""
    project, ann, bob = people["project"], people["ann"], people["bob"]
    pairs = []
    for _ in range(20):
        prompt = PromptFactory(project=project)
        low, high = (CompletionFactory(prompt=prompt) for _ in range(2))
        compare(ann, low, high, "a")
        pairs.append(_key(low, high))
    first = PairwiseJudgement.objects.get(item_key=pairs[0])
    compare(bob, first.left, first.right, "a")  # agrees: the item is not split, half its votes are flagged
    queue = review_queue(project=project)
    assert [q.item_key for q in queue] == pairs[1:] + pairs[:1]
    assert [(q.votes, q.flagged_votes, q.contention, q.reasons) for q in (queue[0], queue[-1])] == [
        (1, 1, 0.25, ["flagged"]),
        (2, 1, 0.125, ["flagged"]),
    ]
    item = review_item(project=project, item_key=pairs[0])
    assert [(j.annotator, j.flagged) for j in item.judgements] == [("ann", True), ("bob", False)]


def test_ranking_items_are_split_by_their_least_agreed_completion(people):
    project = ProjectFactory(slug="ranks", mode=Project.Mode.RANKING, completions_per_prompt=3)
    ann, bob, cat = people["ann"], people["bob"], people["cat"]
    r1, (a1, b1, c1) = make_prompt(project, k=3)
    rank(ann, r1, [[a1], [b1], [c1]])
    rank(bob, r1, [[a1], [c1], [b1]])  # b and c each split 1-1: share 0.5
    r2, (a2, b2, c2) = make_prompt(project, k=3)
    rank(ann, r2, [[a2], [b2, c2]])
    rank(bob, r2, [[a2], [b2, c2]])  # unanimous
    r3, (a3, b3, c3) = make_prompt(project, k=3)
    for who in (ann, bob):
        rank(who, r3, [[a3], [b3], [c3]])
    rank(cat, r3, [[b3], [a3], [c3]])  # a and b 2-1: share 2/3
    queue = review_queue(project=project)
    round_id = r1.round_prompts.get().round_id
    assert [q.item_key for q in queue] == [f"p{r1.pk}-r{round_id}", f"p{r3.pk}-r{round_id}"]
    assert [(q.kind, q.votes, round(q.majority_share, 4)) for q in queue] == [
        ("ranking", 2, 0.5),
        ("ranking", 3, 0.6667),
    ]


def test_contention_adds_gold_failures_and_flagged_votes_to_the_split():
    assert contention_score(majority_share=0.5, votes=4, gold_failures=2, flagged_votes=1) == 0.5 + 0.25 + 0.0625


# --- one item -----------------------------------------------------------------------------------------------


def test_an_item_shows_every_judgement_by_content_with_gold_and_verdicts(people, pairwise):
    project = people["project"]
    key, low, high = pairwise["P6"]
    item = review_item(project=project, item_key=key)
    assert (item.kind, [c.id for c in item.completions], [c.label for c in item.completions]) == (
        "pairwise",
        [low.pk, high.pk],
        ["A", "B"],
    )
    assert [(j.annotator, j.choice) for j in item.judgements] == [("ann", "a"), ("bob", "a")]
    assert (item.gold, item.majority_share, item.verdict, item.history) == (None, 1.0, None, [])

    gold_key = pairwise["P5"][0]
    gold_item = review_item(project=project, item_key=gold_key)
    assert gold_item.gold == "a"
    assert [(j.choice, j.gold_correct) for j in gold_item.judgements] == [("b", False)]

    first = adjudication_record(project=project, reviewer=people["rita"], item_key=gold_key, verdict="tie", note="x")
    second = adjudication_record(project=project, reviewer=people["mona"], item_key=gold_key, verdict="a")
    gold_item = review_item(project=project, item_key=gold_key)
    assert gold_item.verdict == second
    assert [(a.pk, a.verdict, a.undone_by) for a in gold_item.history] == [(first.pk, "tie", people["mona"])]


def test_an_item_marks_truncated_completions_and_excluded_annotators(people, pairwise):
    project = people["project"]
    key, low, high = pairwise["P2"]
    low.generation_params = {"truncated": True, "max_new_tokens": 64}
    low.save()
    project.exclusions.create(annotator=people["cat"])
    item = review_item(project=project, item_key=key)
    assert [(c.truncated, c.max_new_tokens) for c in item.completions] == [(True, 64), (False, None)]
    assert [(j.annotator, j.excluded) for j in item.judgements] == [("ann", False), ("bob", False), ("cat", True)]


@pytest.mark.parametrize("key", ["c1-", "x1-2", "c2-1", "c3-3", "p1-r", "c１-2", "", "c" + "9" * 40 + "-" + "9" * 41])
def test_an_item_that_is_not_reviewable_is_not_found(people, key):
    with pytest.raises(Http404):
        review_item(project=people["project"], item_key=key)


def test_battle_items_are_not_reviewable(people, pairwise):
    with pytest.raises(Http404, match="battle"):
        review_item(project=people["project"], item_key=pairwise["battle"][0])


def test_item_keys_are_read_exactly():
    assert item_key_parse("c0012-13").key == "c12-13"
    parsed = item_key_parse("p5-r9")
    assert (parsed.kind, parsed.prompt_id, parsed.round_id) == ("ranking", 5, 9)
    for bad in ("c9223372036854775808-9223372036854775809", "c²-3", "c1-2 ", "C1-2"):
        with pytest.raises(ValidationError) as caught:
            item_key_parse(bad)
        assert list(caught.value.message_dict) == ["item_key"]


# --- verdicts -----------------------------------------------------------------------------------------------


def test_a_verdict_is_in_force_and_replacing_it_keeps_the_old_one_undone(people, pairwise):
    project, rita, mona = people["project"], people["rita"], people["mona"]
    key = pairwise["P1"][0]
    choices = list(PairwiseJudgement.objects.order_by("pk").values_list("pk", "choice"))
    first = adjudication_record(project=project, reviewer=rita, item_key=key, verdict="a", note="  A is right.  ")
    assert (first.verdict, first.ranks, first.note, first.reviewer, first.undone_at) == (
        "a",
        None,
        "A is right.",
        rita,
        None,
    )
    assert verdicts_in_force(project=project) == {key: first}
    second = adjudication_record(project=project, reviewer=mona, item_key=key, verdict="unusable")
    first.refresh_from_db()
    assert (first.undone_by, first.undone_at is not None) == (mona, True)
    assert verdicts_in_force(project=project) == {key: second}
    assert Adjudication.objects.count() == 2
    assert list(PairwiseJudgement.objects.order_by("pk").values_list("pk", "choice")) == choices  # never touched


def test_undo_sets_who_and_when_and_a_verdict_not_in_force_cannot_be_undone(people, pairwise):
    project, rita, mona = people["project"], people["rita"], people["mona"]
    key = pairwise["P1"][0]
    verdict = adjudication_record(project=project, reviewer=rita, item_key=key, verdict="b")
    undone = adjudication_undo(project=project, user=mona, adjudication_id=verdict.pk)
    assert (undone.pk, undone.undone_by, undone.undone_at is not None) == (verdict.pk, mona, True)
    assert verdicts_in_force(project=project) == {}
    with pytest.raises(ValidationError) as by_id:
        adjudication_undo(project=project, user=mona, adjudication_id=verdict.pk)
    assert list(by_id.value.message_dict) == ["adjudication_id"]
    with pytest.raises(ValidationError) as by_key:
        adjudication_undo(project=project, user=mona, item_key=key)
    assert by_key.value.message_dict == {"item_key": [f"No verdict is in force on {key}."]}
    with pytest.raises(ValidationError) as unknown:
        adjudication_undo(project=project, user=mona, adjudication_id=verdict.pk + 1000)
    assert list(unknown.value.message_dict) == ["adjudication_id"]


def test_a_ranking_verdict_covers_every_completion_with_ranks_that_share_ties(people):
    project = ProjectFactory(mode=Project.Mode.RANKING, completions_per_prompt=3)
    MembershipFactory(project=project, user=people["rita"], role=Membership.Role.REVIEWER)
    prompt, (a, b, c) = make_prompt(project, k=3)
    rank(people["ann"], prompt, [[a], [b], [c]])
    key = f"p{prompt.pk}-r{prompt.round_prompts.get().round_id}"
    verdict = adjudication_record(
        project=project,
        reviewer=people["rita"],
        item_key=key,
        verdict="ranking",
        ranks={str(c.pk): 1, str(a.pk): 2, str(b.pk): 2},
    )
    verdict.refresh_from_db()
    assert (verdict.prompt_id, verdict.ranks) == (prompt.pk, {str(a.pk): 2, str(b.pk): 2, str(c.pk): 1})
    assert review_item(project=project, item_key=key).verdict_ranking == f"#{c.pk} > #{a.pk} = #{b.pk}"

    bad_ranks = [
        None,
        {},
        {str(a.pk): 1, str(b.pk): 2},  # c missing
        {str(a.pk): 1, str(b.pk): 2, str(c.pk): 3, "999999": 4},  # not a completion of the item
        {str(a.pk): 1, str(b.pk): 1, str(c.pk): 3},  # a gap
        {str(a.pk): 0, str(b.pk): 1, str(c.pk): 2},
        {str(a.pk): True, str(b.pk): 2, str(c.pk): 3},
        {str(a.pk): "1", str(b.pk): 2, str(c.pk): 3},
        {"9" * 30: 1, str(b.pk): 2, str(c.pk): 3},
    ]
    for ranks in bad_ranks:
        with pytest.raises(ValidationError) as caught:
            adjudication_record(project=project, reviewer=people["rita"], item_key=key, verdict="ranking", ranks=ranks)
        assert list(caught.value.message_dict) == ["ranks"], ranks
    with pytest.raises(ValidationError) as pairwise_verdict:
        adjudication_record(project=project, reviewer=people["rita"], item_key=key, verdict="a")
    assert list(pairwise_verdict.value.message_dict) == ["verdict"]
    assert Adjudication.objects.count() == 1


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"verdict": "ranking", "ranks": {"1": 1}}, "verdict"),
        ({"verdict": "best"}, "verdict"),
        ({"verdict": "a", "ranks": {"1": 1}}, "ranks"),
        ({"note": "x" * 2001}, "note"),
        ({"item_key": "c1-1"}, "item_key"),
        ({"item_key": "c" + "9" * 25 + "-" + "9" * 26}, "item_key"),
        ({"item_key": "unused pair"}, "item_key"),
        ({"item_key": "battle"}, "item_key"),
    ],
)
def test_a_verdict_that_cannot_be_recorded_names_its_field_and_writes_nothing(people, pairwise, change, field):
    args = {"verdict": "a", "item_key": pairwise["P1"][0], **change}
    if args["item_key"] == "unused pair":
        prompt = PromptFactory(project=people["project"])
        args["item_key"] = _key(*CompletionFactory.create_batch(2, prompt=prompt))  # never judged
    elif args["item_key"] == "battle":
        args["item_key"] = pairwise["battle"][0]
    with pytest.raises(ValidationError) as caught:
        adjudication_record(project=people["project"], reviewer=people["rita"], **args)
    assert list(caught.value.message_dict) == [field]
    assert Adjudication.objects.count() == 0


def test_only_reviewers_and_managers_give_verdicts(people, pairwise):
    project, key = people["project"], pairwise["P1"][0]
    with pytest.raises(PermissionDenied):
        adjudication_record(project=project, reviewer=people["ann"], item_key=key, verdict="a")
    with pytest.raises(Http404):
        adjudication_record(project=project, reviewer=people["stranger"], item_key=key, verdict="a")
    verdict = adjudication_record(project=project, reviewer=people["mona"], item_key=key, verdict="a")
    with pytest.raises(PermissionDenied):
        adjudication_undo(project=project, user=people["ann"], item_key=key)
    assert list(Adjudication.objects.values_list("pk", "undone_at")) == [(verdict.pk, None)]


# --- the API ------------------------------------------------------------------------------------------------


def _api(user) -> APIClient:
    client = APIClient()
    client.force_authenticate(user)
    return client


def test_the_api_lists_the_queue_in_order_and_by_state(people, pairwise):
    client = _api(people["rita"])
    response = client.get(f"/api/v1/projects/{SLUG}/review/")
    assert response.status_code == 200
    body = response.json()
    assert body["count"] == 4
    assert [r["item_key"] for r in body["results"]] == [pairwise[n][0] for n in ("P4", "P1", "P5", "P2")]
    assert body["results"][2] | {"contention": None} == {
        "item_key": pairwise["P5"][0],
        "kind": "pairwise",
        "prompt_id": pairwise["P5"][1].prompt_id,
        "prompt": "Gold?",
        "round": pairwise["P5"][1].round.number,
        "votes": 1,
        "majority_share": 1.0,
        "gold_failures": 1,
        "flagged_votes": 0,
        "contention": None,
        "reasons": ["gold"],
        "verdict": None,
    }
    assert client.get(f"/api/v1/projects/{SLUG}/review/?state=adjudicated").json()["count"] == 0
    bad = client.get(f"/api/v1/projects/{SLUG}/review/?state=closed")
    assert bad.status_code == 400 and list(bad.json()) == ["state"]
    assert client.get(f"/api/v1/projects/{SLUG}/review/?page=2").status_code == 404


def test_the_api_records_and_undoes_a_verdict(people, pairwise):
    client = _api(people["rita"])
    key = pairwise["P1"][0]
    response = client.post(
        f"/api/v1/projects/{SLUG}/review/{key}/verdict/", {"verdict": "b", "note": "B cites."}, format="json"
    )
    assert response.status_code == 201
    body = response.json()
    assert {k: body[k] for k in ("item_key", "verdict", "ranks", "note", "reviewer", "undone_at", "undone_by")} == {
        "item_key": key,
        "verdict": "b",
        "ranks": None,
        "note": "B cites.",
        "reviewer": "rita",
        "undone_at": None,
        "undone_by": None,
    }
    item = client.get(f"/api/v1/projects/{SLUG}/review/{key}/").json()
    assert (item["verdict"]["id"], item["verdicts"]) == (body["id"], ["a", "b", "tie", "both_bad", "unusable"])
    assert [(j["annotator"], j["choice"]) for j in item["judgements"]] == [("ann", "a"), ("bob", "b")]
    assert [
        r["item_key"] for r in client.get(f"/api/v1/projects/{SLUG}/review/?state=adjudicated").json()["results"]
    ] == [key]

    undone = client.post(f"/api/v1/projects/{SLUG}/review/{key}/undo/", format="json")
    assert undone.status_code == 200 and undone.json()["undone_by"] == "rita"
    again = client.post(f"/api/v1/projects/{SLUG}/review/{key}/undo/", format="json")
    assert again.status_code == 400 and list(again.json()) == ["item_key"]
    assert Adjudication.objects.filter(undone_at__isnull=True).count() == 0


@pytest.mark.parametrize(
    ("key", "body", "field"),
    [
        ("P1", {"verdict": "ranking", "ranks": {"1": 1}}, "verdict"),
        ("P1", {"verdict": "nope"}, "verdict"),
        ("P1", {}, "verdict"),
        ("P1", {"verdict": "a", "ranks": {"1": 1}}, "ranks"),
        ("P1", {"verdict": "a", "note": 5}, "note"),
        ("P1", {"verdict": "a", "note": "x" * 2001}, "note"),
        ("c5-4", {"verdict": "a"}, "item_key"),
        ("c" + "1" * 30 + "-" + "2" * 30, {"verdict": "a"}, "item_key"),
        ("unjudged", {"verdict": "a"}, "item_key"),
        ("battle", {"verdict": "a"}, "item_key"),
    ],
)
def test_the_api_refuses_a_bad_verdict_naming_the_field_and_writes_nothing(people, pairwise, key, body, field):
    if key == "unjudged":
        key = _key(*CompletionFactory.create_batch(2, prompt=PromptFactory(project=people["project"])))
    key = pairwise[key][0] if key in pairwise else key
    response = _api(people["rita"]).post(f"/api/v1/projects/{SLUG}/review/{key}/verdict/", body, format="json")
    assert response.status_code == 400
    assert list(response.json()) == [field]
    assert Adjudication.objects.count() == 0


def test_annotators_get_403_and_non_members_404_from_every_review_operation(people, pairwise):
    key = pairwise["P5"][0]  # a gold item: its answer is not for annotators
    for user, expected in [(people["ann"], 403), (people["stranger"], 404)]:
        client = _api(user)
        answers = [
            client.get(f"/api/v1/projects/{SLUG}/review/"),
            client.get(f"/api/v1/projects/{SLUG}/review/{key}/"),
            client.post(f"/api/v1/projects/{SLUG}/review/{key}/verdict/", {"verdict": "a"}, format="json"),
            client.post(f"/api/v1/projects/{SLUG}/review/{key}/undo/", format="json"),
        ]
        assert [a.status_code for a in answers] == [expected] * 4
        assert all("gold" not in a.content.decode() for a in answers)
    assert Adjudication.objects.count() == 0


def test_the_api_shows_a_ranking_items_ranks_and_takes_a_ranking_verdict(people):
    project = ProjectFactory(slug="ranked", mode=Project.Mode.RANKING, completions_per_prompt=2)
    MembershipFactory(project=project, user=people["rita"], role=Membership.Role.REVIEWER)
    prompt, (a, b) = make_prompt(project, k=2)
    rank(people["ann"], prompt, [[a], [b]])
    rank(people["bob"], prompt, [[b], [a]])
    key = f"p{prompt.pk}-r{prompt.round_prompts.get().round_id}"
    client = _api(people["rita"])
    item = client.get(f"/api/v1/projects/ranked/review/{key}/").json()
    assert [j["ranks"] for j in item["judgements"]] == [{str(a.pk): 1, str(b.pk): 2}, {str(a.pk): 2, str(b.pk): 1}]
    assert [(c["id"], c["shown_as"]) for c in item["completions"]] == [(a.pk, "1"), (b.pk, "2")]
    response = client.post(
        f"/api/v1/projects/ranked/review/{key}/verdict/",
        {"verdict": "ranking", "ranks": {str(a.pk): 1, str(b.pk): 1}},
        format="json",
    )
    assert response.status_code == 201 and response.json()["ranks"] == {str(a.pk): 1, str(b.pk): 1}


# --- the pages ----------------------------------------------------------------------------------------------


def _page(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def test_the_queue_page_lists_items_in_order(people, pairwise):
    response = _page(people["rita"]).get(f"/projects/{SLUG}/review/")
    assert response.status_code == 200
    shown = re.findall(r'<tr data-item="([^"]+)">', response.content.decode())
    assert shown == [pairwise[n][0] for n in ("P4", "P1", "P5", "P2")]
    empty = _page(people["rita"]).get(f"/projects/{SLUG}/review/?state=adjudicated")
    assert 'id="queue-empty"' in empty.content.decode()


def test_annotators_may_not_see_the_review_pages(people, pairwise):
    client = _page(people["ann"])
    key = pairwise["P5"][0]
    answers = [
        client.get(f"/projects/{SLUG}/review/"),
        client.get(f"/projects/{SLUG}/review/{key}/"),
        client.post(f"/projects/{SLUG}/review/{key}/verdict/", {"verdict": "a"}),
        client.post(f"/projects/{SLUG}/review/{key}/undo/"),
    ]
    assert [a.status_code for a in answers] == [403] * 4
    assert all("Gold answer" not in a.content.decode() for a in answers)
    assert _page(people["stranger"]).get(f"/projects/{SLUG}/review/").status_code == 404
    assert Adjudication.objects.count() == 0


def test_the_item_page_escapes_model_output_and_records_and_undoes_a_verdict(people, pairwise):
    key, low, _ = pairwise["P1"]
    low.text = "<script>alert(1)</script>"
    low.save()
    client = _page(people["rita"])
    page = client.get(f"/projects/{SLUG}/review/{key}/").content.decode()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<script>alert(1)" not in page
    assert 'id="verdict-in-force"' not in page

    response = client.post(f"/projects/{SLUG}/review/{key}/verdict/", {"verdict": "tie", "note": "Both fine."})
    assert (response.status_code, response["Location"]) == (302, f"/projects/{SLUG}/review/{key}/")
    assert list(Adjudication.objects.values_list("item_key", "verdict", "note")) == [(key, "tie", "Both fine.")]
    page = client.get(f"/projects/{SLUG}/review/{key}/").content.decode()
    assert '<strong class="verdict" data-verdict="tie">Tie</strong>' in page

    assert client.post(f"/projects/{SLUG}/review/{key}/undo/").status_code == 302
    assert verdicts_in_force(project=people["project"]) == {}
    page = client.get(f"/projects/{SLUG}/review/{key}/").content.decode()
    assert 'id="verdict-in-force"' not in page and 'id="history"' in page


def test_the_item_page_names_a_bad_verdict_and_writes_nothing(people, pairwise):
    client = _page(people["rita"])
    key = pairwise["P1"][0]
    response = client.post(f"/projects/{SLUG}/review/{key}/verdict/", {"verdict": "ranking"})
    assert response.status_code == 400
    assert "<li>verdict: A pairwise item takes a, b, tie, both_bad, unusable; not &#x27;ranking&#x27;.</li>" in (
        response.content.decode()
    )
    unjudged = _key(*CompletionFactory.create_batch(2, prompt=PromptFactory(project=people["project"])))
    response = client.post(f"/projects/{SLUG}/review/{unjudged}/verdict/", {"verdict": "a"})
    assert response.status_code == 400
    assert (
        f"<li>item_key: {unjudged} has no judgements in project &#x27;{SLUG}&#x27;.</li>" in response.content.decode()
    )
    undo = client.post(f"/projects/{SLUG}/review/{key}/undo/")
    assert undo.status_code == 400 and f"No verdict is in force on {key}." in undo.content.decode()
    assert Adjudication.objects.count() == 0


def test_a_ranking_item_page_takes_a_rank_per_completion(people):
    project = ProjectFactory(slug="ranked", mode=Project.Mode.RANKING, completions_per_prompt=3)
    MembershipFactory(project=project, user=people["rita"], role=Membership.Role.REVIEWER)
    prompt, (a, b, c) = make_prompt(project, k=3)
    rank(people["ann"], prompt, [[a], [b], [c]])
    key = f"p{prompt.pk}-r{prompt.round_prompts.get().round_id}"
    client = _page(people["rita"])
    page = client.get(f"/projects/ranked/review/{key}/").content.decode()
    assert [f'name="rank-{x.pk}"' in page for x in (a, b, c)] == [True, True, True]
    ranks = {f"rank-{a.pk}": "2", f"rank-{b.pk}": "1", f"rank-{c.pk}": "2"}
    assert client.post(f"/projects/ranked/review/{key}/verdict/", {"verdict": "ranking", **ranks}).status_code == 302
    assert Adjudication.objects.get().ranks == {str(a.pk): 2, str(b.pk): 1, str(c.pk): 2}
    missing = client.post(f"/projects/ranked/review/{key}/verdict/", {"verdict": "ranking", f"rank-{a.pk}": "1"})
    assert missing.status_code == 400 and "<li>ranks: Rank every completion of the item;" in missing.content.decode()


def test_reviewers_find_the_queue_from_home_and_quality_and_annotators_do_not(people):
    reviewer_home = _page(people["rita"]).get("/").content.decode()
    assert f'href="/projects/{SLUG}/review/"' in reviewer_home
    assert (
        f'href="/projects/{SLUG}/review/"' in _page(people["rita"]).get(f"/projects/{SLUG}/quality/").content.decode()
    )
    assert "/review/" not in _page(people["ann"]).get("/").content.decode()
