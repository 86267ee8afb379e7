"""The OpenAPI schema is valid and the API keeps to it: schemathesis drives every operation in-process."""

import copy
import uuid

import pytest
import schemathesis
from django.core.handlers.wsgi import WSGIHandler
from django.core.signals import request_finished, request_started
from django.db import close_old_connections
from drf_spectacular.generators import SchemaGenerator
from drf_spectacular.validation import validate_schema
from hypothesis import HealthCheck, settings
from rest_framework.authtoken.models import Token
from schemathesis.specs.openapi.checks import positive_data_acceptance

from feedback.models import Membership, TrainingRun
from feedback.selectors.preferences import PreferenceExportOptions
from feedback.services.exports import export_job_start
from tests.factories import (
    MembershipFactory,
    ModelVersionFactory,
    ProjectFactory,
    TrainingRunFactory,
    UserFactory,
)
from tests.feedback.export_helpers import fast_password_hashing, make_prompt, rank

SCHEMA = SchemaGenerator().get_schema(request=None, public=True)
SLUG = "schema"
JOB_ID = "5c4e0f6a0d8e4c1f9b7a2e3d4c5b6a79"
ANNOTATOR = "schema-annotator"
VERSION_ID = 424242
RUN_ID = 434343


def _aimed_at_the_test_data(schema: dict) -> dict:
    """Valid path parameters name the test project and export job (invalid ones still come from the schema)."""
    aimed = copy.deepcopy(schema)
    for operations in aimed["paths"].values():
        for operation in operations.values():
            for parameter in operation.get("parameters", []):
                if parameter["in"] == "path" and parameter["name"] == "slug":
                    parameter["schema"] = {"type": "string", "enum": [SLUG]}
                if parameter["in"] == "path" and parameter["name"] == "job_id":
                    parameter["schema"] = {"type": "string", "enum": [JOB_ID]}
                if parameter["in"] == "path" and parameter["name"] == "version_id":
                    parameter["schema"] = {"type": "integer", "enum": [VERSION_ID]}
                if parameter["in"] == "path" and parameter["name"] == "username":
                    parameter["schema"] = {"type": "string", "enum": [ANNOTATOR]}
                if parameter["in"] == "path" and parameter["name"] == "run_id":
                    parameter["schema"] = {"type": "integer", "enum": [RUN_ID]}
    return aimed


api = schemathesis.openapi.from_dict(_aimed_at_the_test_data(SCHEMA))
api.app = WSGIHandler()


def test_schema_is_valid_openapi_and_documents_every_operation():
    validate_schema(SCHEMA)
    for path, operations in SCHEMA["paths"].items():
        for method, operation in operations.items():
            assert operation["responses"], f"{method} {path} documents no responses"
            assert "401" in operation["responses"], f"{method} {path}: the anonymous caller's 401 is undocumented"
    # Which operations answer 403 and 404, and to whom, is checked against the API in test_permission_matrix.py.


@pytest.fixture
def api_world(db, settings, monkeypatch, queue):
    """A project with data, a finished export job, and a token for a manager of the project.

    Started runs stay queued (the queue fixture): no model is trained inside a request.
    """
    fast_password_hashing(settings)
    settings.ALLOWED_HOSTS = ["localhost"]
    settings.SECURE_SSL_REDIRECT = False
    # As Django's test client does: the test's transaction must survive each request.
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    project = ProjectFactory(slug=SLUG)
    manager = MembershipFactory(project=project, role=Membership.Role.MANAGER, user=UserFactory()).user
    annotator = MembershipFactory(project=project, user=UserFactory(username=ANNOTATOR)).user
    for _ in range(3):
        prompt, completions = make_prompt(project, k=3)
        rank(annotator, prompt, [[completions[0]], completions[1:]])
    ModelVersionFactory(project=project, id=VERSION_ID)
    TrainingRunFactory(project=project, id=RUN_ID, status=TrainingRun.Status.SUCCEEDED)
    monkeypatch.setattr("feedback.services.exports.uuid.uuid4", lambda: uuid.UUID(JOB_ID))
    export_job_start(project=project, options=PreferenceExportOptions(), file_type="jsonl", requested_by_id=1)
    yield {"token": Token.objects.create(user=manager).key}
    request_started.connect(close_old_connections)
    request_finished.connect(close_old_connections)


@api.parametrize()
@settings(max_examples=15, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_api_keeps_to_its_schema(case, api_world):
    # Authenticate with the token; drop the session cookie schemathesis generates for the cookie scheme.
    case.cookies = {}
    auth = {"Authorization": f"Token {api_world['token']}"}
    response = case.call(headers=auth)
    excluded = []
    if case.operation.label == "POST /api/v1/projects/{slug}/prompts/":
        # A record's rules (ends with a user turn, ids unique in the project) are beyond JSON Schema: a
        # schema-valid record may be refused, with its problems listed in the documented 400.
        excluded.append(positive_data_acceptance)
    if case.operation.label == "POST /api/v1/projects/{slug}/judgements/":
        # A judgement must answer a task leased to the caller and name exactly that task's completions,
        # which JSON Schema cannot say: a schema-valid body may be refused with the documented 400.
        excluded.append(positive_data_acceptance)
    if case.operation.label == "POST /api/v1/projects/{slug}/rounds/":
        # Writers must be versions of the project, and uncertain_first needs an active one, which JSON Schema
        # cannot say: a schema-valid body may be refused with the documented 400.
        excluded.append(positive_data_acceptance)
    if case.operation.label in ("GET /api/v1/projects/{slug}/export/", "POST /api/v1/projects/{slug}/exports/"):
        # The battles format takes only the options that apply to battles (dates, annotators, pseudonymise); the
        # others are refused with the documented 400 naming the option, which JSON Schema cannot say.
        excluded.append(positive_data_acceptance)
    if case.operation.label == "POST /api/v1/projects/{slug}/prompts/{prompt_id}/gold/":
        # A gold answer must fit the completions the prompt was imported with, which JSON Schema cannot say:
        # a schema-valid body may be refused with the documented 400 naming `gold`.
        excluded.append(positive_data_acceptance)
    if case.operation.label == "POST /api/v1/projects/{slug}/evaluations/":
        # The candidate and its opponent must be versions of the project and the project must have enough
        # evaluation prompts, which JSON Schema cannot say: a schema-valid body may be refused with the documented 400.
        excluded.append(positive_data_acceptance)
    if case.operation.label == "POST /api/v1/projects/{slug}/training-runs/":
        # Hyperparameter rules (ranges, combinations, known names per algorithm, an algorithm that fits the
        # project's data) are beyond JSON Schema: a schema-valid body may be refused with the documented 400.
        excluded.append(positive_data_acceptance)
    if case.operation.label.startswith("GET /api/v1/projects/{slug}/quality/"):
        # A model version must be one of the project's, metadata_key and metadata_value come together and
        # created_before must follow created_from, which JSON Schema cannot say: the documented 400 names the field.
        excluded.append(positive_data_acceptance)
    if case.operation.label.startswith("POST /api/v1/projects/{slug}/review/{item_key}/"):
        # The item must have judgements in a training round, the verdict must fit its kind and the ranks its
        # completions, and an undo needs a verdict in force, which JSON Schema cannot say: a schema-valid request
        # may be refused with the documented 400 naming the field.
        excluded.append(positive_data_acceptance)
    case.validate_response(response, headers=auth, excluded_checks=excluded)
