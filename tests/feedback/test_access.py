"""The one access rule: staff manage everything, a non-member is told nothing exists, too low a role is refused."""

import pytest
from django.contrib.auth.models import AnonymousUser
from django.core.exceptions import PermissionDenied
from django.http import Http404

from feedback.models import Membership
from feedback.selectors.access import membership_role, project_for_role, user_manages_project
from tests.factories import MembershipFactory, ProjectFactory, UserFactory

pytestmark = pytest.mark.django_db
Role = Membership.Role


@pytest.fixture
def project():
    return ProjectFactory(slug="alpha")


def member(project, role):
    return MembershipFactory(project=project, role=role).user


@pytest.mark.parametrize(
    ("held", "wanted", "outcome"),
    [
        (Role.ANNOTATOR, Role.ANNOTATOR, "ok"),
        (Role.ANNOTATOR, Role.REVIEWER, "Only the project's reviewers and managers may do this."),
        (Role.ANNOTATOR, Role.MANAGER, "Only the project's managers may do this."),
        (Role.REVIEWER, Role.REVIEWER, "ok"),
        (Role.REVIEWER, Role.MANAGER, "Only the project's managers may do this."),
        (Role.MANAGER, Role.REVIEWER, "ok"),
        (Role.MANAGER, Role.MANAGER, "ok"),
    ],
)
def test_a_role_may_do_what_the_roles_below_it_may(project, held, wanted, outcome):
    user = member(project, held)
    if outcome == "ok":
        assert project_for_role(user=user, slug="alpha", role=wanted) == project
    else:
        with pytest.raises(PermissionDenied) as refused:
            project_for_role(user=user, slug="alpha", role=wanted)
        assert str(refused.value) == outcome


def test_staff_manage_every_project_without_a_membership(project, staff_user):
    assert membership_role(user=staff_user, project=project) == Role.MANAGER
    assert project_for_role(user=staff_user, slug="alpha", role=Role.MANAGER) == project
    assert user_manages_project(user=staff_user, project=project) is True


@pytest.mark.parametrize("who", ["anonymous", "member elsewhere", "no project"])
def test_what_the_caller_may_not_see_is_a_404_whatever_the_role_asked(project, who):
    user = AnonymousUser() if who == "anonymous" else member(ProjectFactory(), Role.MANAGER)
    slug = "missing" if who == "no project" else "alpha"
    for role in Role:
        with pytest.raises(Http404) as hidden:
            project_for_role(user=user, slug=slug, role=role)
        assert str(hidden.value) == "No such project."


def test_the_manages_filter_follows_the_rule(project):
    from feedback.templatetags.roles import manages

    assert manages(member(project, Role.MANAGER), project) is True
    assert manages(member(project, Role.REVIEWER), project) is False
    assert manages(UserFactory(), project) is False
    assert manages(AnonymousUser(), project) is False
