"""Untrusted text (model output, imported prompts) to safe HTML.

Markdown is parsed with raw HTML off, code blocks are highlighted by Pygments (the colours are
static/css/highlight.css), and the result goes through nh3 with an allow-list, so no script,
event handler, javascript: URL or hx-* attribute survives whatever the input.
"""

import functools
import html
import re

import nh3
from markdown_it import MarkdownIt
from markdown_it.common.utils import escapeHtml
from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexer import Lexer
from pygments.lexers import get_lexer_by_name, guess_lexer
from pygments.util import ClassNotFound

ALLOWED_TAGS = {
    "p", "br", "hr", "strong", "em", "del", "s", "code", "pre", "blockquote", "span", "div",
    "h1", "h2", "h3", "h4", "h5", "h6", "ul", "ol", "li", "a", "img",
    "table", "thead", "tbody", "tr", "th", "td",
}  # fmt: skip
ALLOWED_ATTRIBUTES = {
    "a": {"href", "title"},
    "img": {"src", "alt", "title"},
    "span": {"class"},
    "div": {"class"},
    "code": {"class"},
    "pre": {"class"},
    "ol": {"start"},
}
ALLOWED_URL_SCHEMES = {"http", "https", "mailto"}

_formatter = HtmlFormatter(nowrap=True)


@functools.lru_cache(maxsize=64)
def _lexer_for(language: str) -> Lexer:
    return get_lexer_by_name(language)


def _highlight_code(code: str, language: str, _attrs: str) -> str:
    try:
        lexer = _lexer_for(language.lower()) if language else guess_lexer(code)
    except ClassNotFound:
        body = html.escape(code)
    else:
        body = highlight(code, lexer, _formatter)
    return f'<pre class="highlight"><code>{body}</code></pre>'


_markdown = MarkdownIt("commonmark", {"html": False, "linkify": False, "highlight": _highlight_code}).enable(
    ["table", "strikethrough"]
)


# A line Markdown leaves as it is: it starts with a letter, ends without a space and holds
# no character that any Markdown construct needs (no *, `, [, <, &, \, |, ~, # and so on;
# \w admits _, which the caller rules out for the whole text).
_PROSE_LINE = re.compile(r"[^\W\d_][\w .,;:?!'\"()%/-]*(?<! )")


def _prose_to_html(text: str) -> str | None:
    """The HTML Markdown makes of plain prose (paragraphs split by one blank line), or None for anything else.

    Most completions are plain prose; this skips the Markdown parser for them.
    """
    if "_" in text:
        return None
    blocks = text.split("\n\n")
    if all(_PROSE_LINE.fullmatch(line) for block in blocks for line in block.split("\n")):
        return "".join(f"<p>{escapeHtml(block)}</p>\n" for block in blocks)
    return None


def markdown_to_safe_html(text: str) -> str:
    """Render Markdown to HTML that is safe to mark safe in a template."""
    rendered = _prose_to_html(text)
    return nh3.clean(
        _markdown.render(text) if rendered is None else rendered,
        tags=ALLOWED_TAGS,
        attributes=ALLOWED_ATTRIBUTES,
        url_schemes=ALLOWED_URL_SCHEMES,
        link_rel="noopener noreferrer nofollow",
        strip_comments=True,
    )
