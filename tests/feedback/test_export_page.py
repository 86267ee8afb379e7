"""The staff export page: who sees it, the download link it makes, the file jobs it starts."""

import json

import pytest
from huey.contrib.djhuey import HUEY

from feedback.models import Membership
from feedback.selectors.preferences import PreferenceExportOptions, preference_rows
from tests.factories import MembershipFactory, ProjectFactory, UserFactory
from tests.feedback.export_helpers import fast_password_hashing, make_prompt, rank

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _fast_hashing(settings):
    fast_password_hashing(settings)


@pytest.fixture
def project():
    project = ProjectFactory(slug="delta")
    annotator = MembershipFactory(project=project, user=UserFactory(username="rater")).user
    for _ in range(3):
        prompt, (a, b, c) = make_prompt(project, k=3)
        rank(annotator, prompt, [[a], [b, c]])
    return project


@pytest.mark.parametrize(
    "who, status",
    [("anonymous", 302), ("annotator", 403), ("outsider", 404), ("manager", 200), ("staff", 200)],
)
def test_who_may_open_the_export_page(client, project, staff_user, who, status):
    users = {
        "annotator": project.memberships.get().user,
        "outsider": MembershipFactory(project=ProjectFactory()).user,
        "manager": MembershipFactory(project=project, role=Membership.Role.MANAGER).user,
        "staff": staff_user,
    }
    if who in users:
        client.force_login(users[who])
    assert client.get("/projects/delta/export/").status_code == status
    posted = client.post("/projects/delta/export/", {"action": "link", "format": "dpo"})
    assert posted.status_code == (status if status != 200 else 400)


def valid(**overrides):
    data = {"format": "grpo", "pairs": "all", "min_agreement": "0", "test_fraction": "0.1", "action": "link"}
    return data | overrides


def test_the_page_makes_a_link_to_the_same_rows(client, project, staff_user):
    client.force_login(staff_user)
    page = client.post("/projects/delta/export/", valid(conversational="on"))
    assert page.status_code == 200
    url = page.context["download_url"]
    assert url.startswith("/api/v1/projects/delta/export/?format=grpo")
    rows = [json.loads(line) for line in b"".join(client.get(url).streaming_content).splitlines()]
    options = PreferenceExportOptions(format="grpo", conversational=True)
    assert rows == list(preference_rows(project=project, options=options)) and len(rows) == 3


def test_the_page_starts_a_file_job_and_links_the_file(client, project, staff_user, django_capture_on_commit_callbacks):
    client.force_login(staff_user)
    HUEY.immediate = True
    try:
        with django_capture_on_commit_callbacks(execute=True):
            started = client.post("/projects/delta/export/", valid(action="parquet", format="dpo"))
    finally:
        HUEY.immediate = False
    assert started.status_code == 302 and "?job=" in started["Location"]
    page = client.get(started["Location"])
    assert page.context["job"].status == "succeeded"
    assert page.context["job_download_url"] in page.content.decode()
    download = client.get(page.context["job_download_url"])
    assert b"".join(download.streaming_content)[:4] == b"PAR1"


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"format": "xml"}, "format"),
        ({"min_agreement": "2"}, "min_agreement"),
        ({"created_from": "2026-03-02", "created_until": "2026-03-01"}, "created_until"),
        ({"annotators": "999999"}, "annotators"),
        ({"action": "zip"}, None),
    ],
)
def test_the_page_refuses_bad_options(client, project, staff_user, overrides, field):
    client.force_login(staff_user)
    page = client.post("/projects/delta/export/", valid(**overrides))
    assert page.status_code == 400
    if field:
        assert field in page.context["form"].errors
    else:
        assert page.context["action_error"]


def test_a_job_of_another_project_is_not_shown(client, project, staff_user):
    other = ProjectFactory(slug="epsilon")
    client.force_login(staff_user)
    started = client.post("/projects/epsilon/export/", valid(action="jsonl"))
    job_id = started["Location"].split("job=")[1]
    assert client.get(f"/projects/delta/export/?job={job_id}").context["job"] is None
    assert client.get(f"/projects/{other.slug}/export/?job={job_id}").context["job"].id == job_id
