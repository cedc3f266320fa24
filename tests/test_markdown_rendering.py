"""The Markdown documents as GitHub renders them: its parser (``cmark-gfm``) leaves every math span
exactly as written, and MathJax renders every one of them without an error."""
from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import DERIVATIONS

MATHJAX = Path(__file__).resolve().parent / "mathjax"
FENCE = re.compile(r"^```math\n(.*?)\n```$", re.S | re.M)
CODE_BLOCK = re.compile(r"^```.*?^```$", re.S | re.M)
INLINE = re.compile(r"\$`([^`]+)`\$")
DOCUMENTS = sorted(DERIVATIONS.glob("*.md"))


def math_spans(markdown: str) -> list[str]:
    """Display math (```math blocks) and inline math ($`...`$) of a document, in order."""
    displays = FENCE.findall(markdown)
    rest = CODE_BLOCK.sub("", markdown)
    return displays + INLINE.findall(rest)


def rendered_spans(page: str) -> list[str]:
    """The same spans in the HTML of GitHub's parser: a ```math block is a code block of language
    math, inline math a code span between dollars."""
    displays = re.findall(r'<pre><code class="language-math">(.*?)</code></pre>', page, re.S)
    rest = re.sub(r"<pre>.*?</pre>", "", page, flags=re.S)
    inline = re.findall(r"\$<code>(.*?)</code>\$", rest, re.S)
    return [html.unescape(d).rstrip("\n") for d in displays] + [html.unescape(i) for i in inline]


def test_documents_write_math_only_in_githubs_safe_forms():
    assert len(DOCUMENTS) > 20
    for md in DOCUMENTS:
        text = INLINE.sub("", CODE_BLOCK.sub("", md.read_text()))
        text = re.sub(r"(`+).*?\1", "", text)  # code spans
        assert "$" not in text, f"{md.name}: math outside ```math blocks and $`...`$ (GitHub's parser alters it)"


@pytest.mark.parametrize("md", DOCUMENTS, ids=lambda p: p.name)
def test_githubs_parser_leaves_every_math_span_unchanged(md):
    exe = shutil.which("cmark-gfm")
    assert exe, "cmark-gfm is not installed; run `make doc-tools` (apt-get install cmark-gfm)"
    source = md.read_text()
    page = subprocess.run([exe, "--extension", "table", "--extension", "autolink"], input=source,
                          capture_output=True, text=True, check=True).stdout
    spans = math_spans(source)
    assert rendered_spans(page) == spans


def test_mathjax_renders_every_math_span():
    exe = shutil.which("node")
    assert exe, "node is not installed; run `make doc-tools` (apt-get install nodejs npm)"
    assert (MATHJAX / "node_modules" / "mathjax-full").is_dir(), "run `make doc-tools` (npm ci in tests/mathjax)"
    spans = [(md.name, s) for md in DOCUMENTS for s in math_spans(md.read_text())]
    assert len(spans) > 1000
    run = subprocess.run([exe, str(MATHJAX / "render.js")], input=json.dumps([s for _, s in spans]),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    errors = [(spans[k][0], message, spans[k][1][:200]) for k, message in json.loads(run.stdout)]
    assert not errors, errors[:5]
