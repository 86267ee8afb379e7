"""Writing one completion by hand (the Django admin): its HTML always follows its text.

Imports and generation render whole batches themselves (services/prompts.py, services/generation.py);
this is the path for a single completion added or edited one at a time.
"""

from __future__ import annotations

from django.db import transaction

from feedback.models import Completion, RoundPrompt
from feedback.rendering import markdown_to_safe_html


def completion_save(*, completion: Completion) -> Completion:
    """Save a new or edited completion with the HTML of its current text.

    Annotators see the HTML while exports and training read the text, so the two are never
    saved apart. The prompt joins the completion's round, so the queue serves its items.
    """
    completion.html = markdown_to_safe_html(completion.text)
    with transaction.atomic():
        completion.save()
        RoundPrompt.objects.get_or_create(round_id=completion.round_id, prompt_id=completion.prompt_id)
    return completion
