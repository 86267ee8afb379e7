import re

import pytest

from feedback.rendering import markdown_to_safe_html

HOSTILE = [
    "<script>alert(1)</script>",
    '<img src=x onerror="alert(1)">',
    "[click](javascript:alert(1))",
    '<a href="javascript:alert(1)">x</a>',
    '<div hx-get="/admin/" hx-trigger="load">x</div>',
    '<button hx-post="/api/v1/">go</button>',
    "<iframe src='https://example.com'></iframe>",
    "<style>body{display:none}</style>",
    '<svg onload="alert(1)"><circle/></svg>',
    "![x](javascript:alert(1))",
    '<p style="background:url(https://evil.example)">x</p>',
]


def _tags(html: str) -> str:
    """Only the parts of the HTML that are markup, not escaped text."""
    return " ".join(re.findall(r"<[^>]*>", html))


@pytest.mark.parametrize("text", HOSTILE)
def test_no_hostile_tag_or_attribute_survives_as_markup(text):
    markup = _tags(markdown_to_safe_html(text)).lower()
    for bad in ("<script", "onerror", "onload", "javascript:", "hx-", "<iframe", "<style", "<svg", "style="):
        assert bad not in markup


def test_raw_html_blocks_are_shown_as_text():
    html = markdown_to_safe_html("<div>\n<b>bold?</b>\n</div>")
    assert "<b>" not in html and "&lt;b&gt;bold?&lt;/b&gt;" in html


def test_markdown_tables_code_and_links_render():
    html = markdown_to_safe_html(
        "| a | b |\n|---|---|\n| 1 | 2 |\n\n```python\nprint('hi')\n```\n\n[docs](https://example.com) **bold**"
    )
    assert "<table>" in html and "<td>1</td>" in html
    assert '<pre class="highlight"><code>' in html and '<span class="nb">print</span>' in html
    assert '<a href="https://example.com" rel="noopener noreferrer nofollow">docs</a>' in html
    assert "<strong>bold</strong>" in html


def test_code_in_an_unknown_language_is_escaped():
    html = markdown_to_safe_html("```nosuchlang\n<script>x</script>\n```")
    assert "&lt;script&gt;" in html and "<script>" not in html
