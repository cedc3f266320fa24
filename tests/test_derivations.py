"""The derivation documents of every built-in layer compile (LaTeX) and are well formed (Markdown)."""
from __future__ import annotations

import pytest

from derive.derivation import render_markdown, render_tex
from derive.kernel import build
from derive.layers.batchnorm import batchnorm, batchnorm_biased
from derive.layers.cross_entropy import cross_entropy

from conftest import assert_math_blocks_balanced

LAYERS = [batchnorm, batchnorm_biased, cross_entropy]


@pytest.fixture(scope="module", params=LAYERS, ids=lambda layer: layer.name)
def kernel(request):
    return build(request.param)


def test_tex_compiles(kernel, compiled_derivations):
    # compiled once for the session, with every other document (conftest.compiled_derivations)
    run, pdf = compiled_derivations[kernel.name]
    assert run.returncode == 0, run.stdout[-3000:]
    assert pdf.exists() and pdf.stat().st_size > 0


def test_markdown_names_every_gradient(kernel):
    text = render_markdown(kernel)
    for name in kernel.layer.differentiable:
        assert f"d{name}" in text
        assert f"d{name} = " in text  # its generated code line, verbatim


def test_markdown_math_blocks_balanced(kernel):
    text = render_markdown(kernel)
    assert_math_blocks_balanced(text)


def test_header_is_valid_comments(kernel):
    head = render_markdown(kernel).splitlines()[:5]
    assert all(line.startswith("<!-- ") and line.endswith(" -->") for line in head)
    assert all(line.startswith("% ") for line in render_tex(kernel).splitlines()[:5])


def test_no_raw_index_names(kernel):
    """Readers see i, j, r, ... never SymPy's i_n or _r1_n."""
    for text in (render_tex(kernel), render_markdown(kernel)):
        for raw in ("i_{n}", "i_n", "_r1", "r_{1"):
            assert raw not in text


def test_a_kernel_built_again_renders_the_same_documents(kernel):
    tex, md = render_tex(kernel), render_markdown(kernel)
    again = build(kernel.layer)
    assert again is not kernel
    assert render_tex(again) == tex and render_markdown(again) == md
