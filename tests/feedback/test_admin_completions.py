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
