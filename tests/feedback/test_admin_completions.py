"""Completions written in the Django admin show annotators the HTML of the text that is exported and trained."""

import pytest

from feedback.models import Completion, RoundPrompt
from feedback.rendering import markdown_to_safe_html
from tests.factories import CompletionFactory, PromptFactory, first_round

pytestmark = pytest.mark.django_db


def form_data(response) -> dict[str, object]:
    """The values an admin change or add page would post back as they are shown."""
    data: dict[str, object] = {}
    forms = [response.context["adminform"].form]
    for inline in response.context["inline_admin_formsets"]:
        formset = inline.formset
        forms += [formset.management_form, *formset.forms]
    for form in forms:
        for name in form.fields:
            value = form[name].value()  # prepared for the widget: a pk for a choice, JSON text for JSON
            if value not in (None, False):
                data[form.add_prefix(name)] = value
    return data


def test_a_completion_added_in_the_admin_gets_the_html_of_its_text(client, staff_user):
    prompt = PromptFactory()
    round_one = first_round(prompt.project)
    client.force_login(staff_user)

    response = client.post(
        "/admin/feedback/completion/add/",
        {
            "prompt": prompt.pk,
            "round": round_one.pk,
            "text": "Use **reversed**(xs).",
            "source_model": "human",
            "generation_params": "{}",
        },
    )

    assert response.status_code == 302
    completion = Completion.objects.get(prompt=prompt)
    assert completion.html == "<p>Use <strong>reversed</strong>(xs).</p>\n"
    assert RoundPrompt.objects.filter(round=round_one, prompt=prompt).exists()  # the queue serves its items


def test_editing_a_completion_in_the_admin_renders_the_new_text(client, staff_user):
    completion = CompletionFactory(text="Old answer.")
    client.force_login(staff_user)
    data = form_data(client.get(f"/admin/feedback/completion/{completion.pk}/change/"))

    response = client.post(f"/admin/feedback/completion/{completion.pk}/change/", {**data, "text": "New *answer*."})

    assert response.status_code == 302
    completion.refresh_from_db()
    assert (completion.text, completion.html) == ("New *answer*.", "<p>New <em>answer</em>.</p>\n")


def test_completions_added_and_edited_inline_on_a_prompt_get_the_html_of_their_text(client, staff_user):
    prompt = PromptFactory()
    edited = CompletionFactory(prompt=prompt, text="Old answer.")
    client.force_login(staff_user)
    data = form_data(client.get(f"/admin/feedback/prompt/{prompt.pk}/change/"))
    prefix = "completions"
    data |= {
        f"{prefix}-0-text": "Edited `code`.",
        f"{prefix}-TOTAL_FORMS": 2,
        f"{prefix}-1-text": "A new **answer**.",
        f"{prefix}-1-source_model": "human",
        f"{prefix}-1-prompt": prompt.pk,
        f"{prefix}-1-round": edited.round_id,
    }

    response = client.post(f"/admin/feedback/prompt/{prompt.pk}/change/", data)

    assert response.status_code == 302
    shown = {c.text: c.html for c in Completion.objects.filter(prompt=prompt)}
    assert shown == {
        "Edited `code`.": markdown_to_safe_html("Edited `code`."),
        "A new **answer**.": "<p>A new <strong>answer</strong>.</p>\n",
    }
    assert Completion.objects.get(pk=edited.pk).text == "Edited `code`."


def errors_shown(response) -> dict[str, list[str]]:
    """The field errors on an admin page: the object's form, then each inline form's."""
    shown = dict(response.context["adminform"].form.errors)
    for inline in response.context["inline_admin_formsets"]:
        for form in inline.formset.forms:
            shown |= {form.add_prefix(name): messages for name, messages in form.errors.items()}
    return shown


def test_a_completion_over_the_length_limit_is_refused_in_the_admin_naming_the_field(client, staff_user, settings):
    settings.RANKWISE_MAX_COMPLETION_CHARS = 10
    prompt = PromptFactory()
    round_one = first_round(prompt.project)
    client.force_login(staff_user)

    response = client.post(
        "/admin/feedback/completion/add/",
        {
            "prompt": prompt.pk,
            "round": round_one.pk,
            "text": "x" * 11,
            "source_model": "human",
            "generation_params": "{}",
        },
    )

    assert response.status_code == 200
    assert errors_shown(response) == {
        "text": ["text is 11 characters long; at most 10 are allowed (RANKWISE_MAX_COMPLETION_CHARS)"]
    }
    assert not Completion.objects.exists() and not RoundPrompt.objects.filter(prompt=prompt).exists()


def test_an_edited_completion_over_a_limit_is_refused_and_kept_as_it_was(client, staff_user, settings):
    settings.RANKWISE_MAX_MODEL_NAME_CHARS = 5
    completion = CompletionFactory(text="Old answer.", source_model="human")
    client.force_login(staff_user)
    data = form_data(client.get(f"/admin/feedback/completion/{completion.pk}/change/"))

    response = client.post(
        f"/admin/feedback/completion/{completion.pk}/change/", {**data, "text": "New.", "source_model": "gpt-4o-mini"}
    )

    assert response.status_code == 200
    assert errors_shown(response) == {
        "source_model": ["source_model is 11 characters long; at most 5 are allowed (RANKWISE_MAX_MODEL_NAME_CHARS)"]
    }
    completion.refresh_from_db()
    assert (completion.text, completion.source_model) == ("Old answer.", "human")


def test_a_completion_over_the_limit_inline_on_a_prompt_is_refused_and_nothing_is_saved(client, staff_user, settings):
    settings.RANKWISE_MAX_COMPLETION_CHARS = 10
    prompt = PromptFactory()
    edited = CompletionFactory(prompt=prompt, text="Old answer.")
    client.force_login(staff_user)
    data = form_data(client.get(f"/admin/feedback/prompt/{prompt.pk}/change/"))
    data |= {
        "external_id": "renamed",
        "completions-0-text": "Short.",
        "completions-TOTAL_FORMS": 2,
        "completions-1-text": "A new answer, too long.",
        "completions-1-source_model": "human",
        "completions-1-prompt": prompt.pk,
        "completions-1-round": edited.round_id,
    }

    response = client.post(f"/admin/feedback/prompt/{prompt.pk}/change/", data)

    assert response.status_code == 200
    assert errors_shown(response) == {
        "completions-1-text": ["text is 23 characters long; at most 10 are allowed (RANKWISE_MAX_COMPLETION_CHARS)"]
    }
    assert list(Completion.objects.filter(prompt=prompt).values_list("text", flat=True)) == ["Old answer."]
    prompt.refresh_from_db()
    assert prompt.external_id != "renamed"
