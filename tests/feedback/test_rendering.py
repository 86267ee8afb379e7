import re

import nh3
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from feedback import rendering
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


# Plain prose (lines of words and the punctuation prose uses, paragraphs split by a blank
# line), and the same prose with a piece Markdown gives a meaning to put in somewhere.
_WORDS = st.sampled_from(["Word", "été", "it's", "a/b", "(x)", "50%", '"q"', "42", "x-y", "end."])
_LINE = st.builds(
    lambda first, rest: first + "".join(sep + word for sep, word in rest),
    st.sampled_from(["Word", "été", "Zeta"]),
    st.lists(st.tuples(st.sampled_from([" ", ", ", ": ", "; ", "! ", "? ", "  "]), _WORDS), max_size=8),
)
_PROSE = st.lists(st.lists(_LINE, min_size=1, max_size=3).map("\n".join), min_size=1, max_size=3).map("\n\n".join)
_MARKDOWN = st.sampled_from(
    ["*", "_", "`", "[x]", "<b>", "&amp;", "\\", "|", "~~", "# ", "=", "\n---", "\t", "  \n", "1. "]
)
_TEXT = st.one_of(
    _PROSE,
    st.builds(lambda text, piece, at: text[:at] + piece + text[at:], _PROSE, _MARKDOWN, st.integers(0, 80)),
)


@settings(max_examples=600, deadline=None, derandomize=True)
@given(_TEXT)
def test_plain_prose_skips_the_parser_with_the_same_html(text):
    assert markdown_to_safe_html(text) == _markdown_to_safe_html_parsed(text)


@pytest.mark.parametrize(
    "text",
    [
        'Plain words.\n\nA second paragraph, with (brackets) and 50% of "quotes".',
        "Line one\nline two of the same paragraph",
        "Ends with two spaces  \nthen a hard break",
        "Title\n=====",
        "1. a list",
        "x\n\n\nthree newlines",
    ],
)
def test_prose_and_near_prose_render_as_the_parser_does(text):
    assert markdown_to_safe_html(text) == _markdown_to_safe_html_parsed(text)


def test_prose_fast_path_takes_plain_prose_only():
    assert rendering._prose_to_html("Two words.\n\nAnd more") == "<p>Two words.</p>\n<p>And more</p>\n"
    for text in ("*strong*", "a_b", "Title\n---", "1. item", "Trailing  ", "    code", "a & b", ""):
        assert rendering._prose_to_html(text) is None


def _markdown_to_safe_html_parsed(text: str) -> str:
    return nh3.clean(
        rendering._markdown.render(text),
        tags=rendering.ALLOWED_TAGS,
        attributes=rendering.ALLOWED_ATTRIBUTES,
        url_schemes=rendering.ALLOWED_URL_SCHEMES,
        link_rel="noopener noreferrer nofollow",
        strip_comments=True,
    )
