"""Prompts written in the Django admin pass the import's checks: text every page can show, within the limits."""

import json

import pytest

from feedback.models import Prompt
from tests.factories import CompletionFactory, ProjectFactory, PromptFactory
from tests.feedback.test_admin_completions import errors_shown, form_data

pytestmark = pytest.mark.django_db


@pytest.fixture
def prompt(client, staff_user):
    client.force_login(staff_user)
    prompt = PromptFactory(messages=[{"role": "user", "content": "Sort a list."}], external_id="p1", metadata={})
    CompletionFactory(prompt=prompt)  # the page's completions post back as they are
    return prompt


def change(client, prompt, **fields):
    data = form_data(client.get(f"/admin/feedback/prompt/{prompt.pk}/change/"))
    return client.post(f"/admin/feedback/prompt/{prompt.pk}/change/", {**data, **fields})


def unchanged(prompt) -> bool:
    stored = Prompt.objects.get(pk=prompt.pk)
    return (stored.messages, stored.external_id, stored.metadata) == (prompt.messages, prompt.external_id, {})


@pytest.mark.parametrize(
    ("messages", "error"),
    [
        (
            '[{"role": "user", "content": "a\\ud800b"}]',
            "messages[0].content holds a lone surrogate (\\ud800) at character 2, which is not valid Unicode text",
        ),
        (
            '[{"role": "user", "content": "a\\u0000b"}]',
            "messages[0].content holds a NUL character (\\u0000) at character 2",
        ),
        (
            '[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]',
            "messages[1].role the prompt must end with a user turn",
        ),
        (
            '[{"role": "boss", "content": "Hi"}]',
            "messages[0].role must be one of system, user, assistant; it is 'boss'",
        ),
    ],
)
def test_messages_the_import_would_refuse_are_refused_naming_the_field(client, prompt, messages, error):
    response = change(client, prompt, messages=messages)
    assert response.status_code == 200
    assert errors_shown(response) == {"messages": [error]}
    assert unchanged(prompt)


def test_messages_over_the_length_limit_are_refused(client, prompt, settings):
    settings.RANKWISE_MAX_PROMPT_CHARS = 10
    response = change(client, prompt, messages=json.dumps([{"role": "user", "content": "x" * 11}]))
    assert response.status_code == 200
    assert errors_shown(response) == {
        "messages": ["messages has more than 10 characters in its messages (RANKWISE_MAX_PROMPT_CHARS)"]
    }
    assert unchanged(prompt)


def test_metadata_holding_a_lone_surrogate_is_refused(client, prompt):
    response = change(client, prompt, metadata='{"source": "x\\udfff"}')
    assert response.status_code == 200
    assert errors_shown(response) == {
        "metadata": ["metadata.source holds a lone surrogate (\\udfff) at character 2, which is not valid Unicode text"]
    }
    assert unchanged(prompt)


def test_a_prompt_added_with_bad_text_stores_nothing(client, staff_user):
    project = ProjectFactory()
    client.force_login(staff_user)
    response = client.post(
        "/admin/feedback/prompt/add/",
        {
            "project": project.pk,
            "messages": '[{"role": "user", "content": "\\u0000"}]',
            "external_id": "",
            "metadata": "{}",
            "split": "train",
            "completions-TOTAL_FORMS": 0,
            "completions-INITIAL_FORMS": 0,
        },
    )
    assert response.status_code == 200
    assert errors_shown(response) == {
        "messages": ["messages[0].content holds a NUL character (\\u0000) at character 1"]
    }
    assert not Prompt.objects.exists()


def test_a_prompt_given_as_text_is_stored_as_one_user_turn_as_the_import_stores_it(client, prompt):
    response = change(client, prompt, messages='"Reverse a string."')
    assert response.status_code == 302
    prompt.refresh_from_db()
    assert prompt.messages == [{"role": "user", "content": "Reverse a string."}]
