"""Writing one completion by hand (the Django admin): its HTML always follows its text.

Imports and generation render whole batches themselves (services/prompts.py, services/generation.py);
this is the path for a single completion added or edited one at a time.
"""

from __future__ import annotations

from feedback.models import Completion
from feedback.rendering import markdown_to_safe_html


def completion_save(*, completion: Completion) -> Completion:
    """Save a new or edited completion with the HTML of its current text.

    Annotators see the HTML while exports and training read the text, so the two are never
    saved apart.
    """
    completion.html = markdown_to_safe_html(completion.text)
    completion.save()
    return completion
