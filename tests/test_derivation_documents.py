"""Every derivation document as a reader gets it: each PDF compiles and has ink on its first page,
each compute graph is drawn, every equation of the Markdown files compiles, the index links every
document, and ``derive latex`` builds the whole book with a table of contents."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from derive.book import build_book, documents
from derive.document.formats import PREAMBLE
from derive.codegen import environment
from derive.figure import broadcasts, fan_out, mermaid, tikz
from derive.layers import BUILTIN
from derive.trace import trace

from conftest import DERIVATIONS, ink, latexmk

STEMS = [stem for layer in BUILTIN for stem, _ in documents(layer)]
MIN_INK = 0.01  # a page of text and formulas at 30 dpi is a few percent non-white; a blank page is 0


def test_every_document_is_committed():
    assert sorted(STEMS) == sorted(p.stem for p in DERIVATIONS.glob("*.tex"))
    assert sorted(STEMS) == sorted(p.stem for p in DERIVATIONS.glob("*.md") if p.stem != "README")


@pytest.mark.parametrize("stem", STEMS)
def test_pdf_compiles_and_its_first_page_is_not_blank(compiled_derivations, stem):
    run, pdf = compiled_derivations[stem]
    assert run.returncode == 0, run.stdout[-3000:]
    assert ink(pdf) > MIN_INK


@pytest.mark.parametrize("stem", STEMS)
def test_no_line_runs_over_the_margin(compiled_derivations, stem):
    """With resizing switched off, TeX reports every line wider than the margin allows: a code
    line, a word, or a display that would need shrinking below 85% (``\\fitpick``, ``\\fit``)."""
    run, pdf = compiled_derivations[stem]
    assert run.returncode == 0, run.stdout[-3000:]
    log = pdf.with_suffix(".log").read_text(errors="replace")
    overfull = re.findall(r"^Overfull \\hbox \(([\d.]+)pt too wide\)[^\n]*\n(.*)$", log, re.M)
    assert not overfull, f"{len(overfull)} lines over the margin, e.g. {overfull[:3]}"


@pytest.mark.parametrize("stem", STEMS)
def test_every_reference_has_its_label(compiled_derivations, stem):
    """Each ``\\ref`` of a document names a label the document defines (its compiled ``.aux``),
    so the second pass prints a number, never ``??``."""
    run, pdf = compiled_derivations[stem]
    assert run.returncode == 0, run.stdout[-3000:]
    text = (DERIVATIONS / f"{stem}.tex").read_text()
    wanted = set(re.findall(r"\\(?:eq|auto|page)?ref\{([^}]*)\}", text))
    defined = set(re.findall(r"^\\newlabel\{([^}]*)\}", pdf.with_suffix(".aux").read_text(), re.M))
    assert wanted <= defined, f"references without a label: {sorted(wanted - defined)}"


def test_every_compute_graph_is_drawn(tmp_path):
    """Each layer's TikZ graph alone on a page: the picture compiles and puts ink on the page."""
    pictures = "\n\\clearpage\n".join(r"\fitbox{%s}" % tikz(trace(layer)) for layer in BUILTIN)
    preamble = environment().get_template(PREAMBLE).render()
    (tmp_path / "graphs.tex").write_text("\\documentclass{article}\n%s\n\\pagestyle{empty}\n\\begin{document}\n%s\n"
                                         "\\end{document}\n" % (preamble, pictures))
    run = latexmk(tmp_path, "graphs")
    assert run.returncode == 0, run.stdout[-3000:]
    for page, layer in enumerate(BUILTIN, start=1):
        # a blank page has no ink at all; the smallest graph (two boxes, one arrow) has a little
        assert ink(tmp_path / "graphs.pdf", page, dpi=72) > 0.0001, f"{layer.name}: the compute graph left the page blank"


@pytest.mark.parametrize("layer", BUILTIN, ids=lambda layer: layer.name)
def test_graph_drawings_have_every_node_edge_and_fan_out(layer):
    graph = trace(layer)
    picture, chart = tikz(graph), mermaid(graph)
    edges = {(a, m) for m in graph.nodes for a in m.inputs}
    assert picture.count(r"\node[") - picture.count(r"\node[ghost]") == len(graph.nodes)
    assert picture.count(r"\draw[") == len(edges)
    assert chart.count(" --> ") + chart.count(" ==>") == len(edges)
    fans = {n for n, _ in fan_out(graph)}
    assert picture.count(r"\node[fan]") == len(fans)
    marked = re.search(r"class (\S+) fan;", chart)
    assert len(marked.group(1).split(",") if marked else []) == len(fans)
    assert chart.count("==>") == len(broadcasts(graph))


def test_every_markdown_equation_compiles(tmp_path):
    """All math of all Markdown documents, each in its own paragraph of one small LaTeX file."""
    from test_markdown_rendering import math_spans

    blocks, count = [], 0
    for md in sorted(DERIVATIONS.glob("*.md")):
        math = math_spans(md.read_text())
        count += len(math)
        blocks += [r"\typeout{MATH %s %d}" % (md.name, k) + "\n\\[ " + m + " \\]\n\\par" for k, m in enumerate(math)]
    assert count > 100
    (tmp_path / "math.tex").write_text("\\documentclass{article}\n\\usepackage{amsmath}\n\\usepackage{amssymb}\n"
                                       "\\begin{document}\n%s\n\\end{document}\n" % "\n".join(blocks))
    run = latexmk(tmp_path, "math")
    where = re.findall(r"MATH \S+ \d+", run.stdout)
    assert run.returncode == 0, f"the equation after {where[-1] if where else 'the start'} does not compile:\n" \
                                f"{run.stdout[-2000:]}"


def test_index_links_every_document_and_only_existing_ones():
    index = (DERIVATIONS / "README.md").read_text()
    links = re.findall(r"\]\(([^)]+)\)", index)
    assert sorted(links) == sorted(f"{stem}.{ext}" for stem in STEMS for ext in ("md", "tex"))
    assert all((DERIVATIONS / link).exists() for link in links)


def test_latex_book_has_every_document_in_its_table_of_contents(tmp_path):
    pdf = build_book(BUILTIN, DERIVATIONS, tmp_path)
    toc = (tmp_path / "all.toc").read_text().replace(" ", "")
    parts = re.findall(r"\\contentsline\{part\}", toc)
    assert len(parts) == len(STEMS)
    for stem in STEMS:
        title = re.search(r"^\\title\{(.*)\}$", (DERIVATIONS / f"{stem}.tex").read_text(), re.M).group(1)
        assert title.replace(" ", "") in toc
    assert ink(pdf) > MIN_INK and ink(pdf, 2) > MIN_INK  # the title page and the contents


def test_a_document_derive_fails_to_write_is_a_page_that_says_so(tmp_path, monkeypatch, capsys):
    """A fault while writing a derivation document (not the kernel's) ended the whole run with a
    traceback. The kernel does not depend on its document: the run writes every file, the document
    is a page that names the fault and asks for a report, the report's note says the same, and the
    page compiles."""
    import derive.generate as generate
    from derive.cli import main

    def fault(kernel):
        raise RuntimeError("no printer for this atom")

    monkeypatch.setattr(generate, "render_tex", fault)
    spec = tmp_path / "spec.py"
    spec.write_text("import torch\nfrom derive import Tensor, layer\n\n\n@layer(x=Tensor(\"n\", \"d\"))\n"
                    "def tanh_of_x(x):\n    return torch.tanh(x)\n")
    out = tmp_path / "out"
    assert main(["generate", "--no-prove", "--layer", str(spec), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert ("note: tanh_of_x: derivation documents: tanh_of_x.tex could not be written (RuntimeError: no "
            "printer for this atom); report this as a bug") in text, text
    page = (out / "derivations" / "tanh_of_x.tex").read_text()
    assert "could not be written" in page and "no printer for this atom" in page
    assert "Deriving the backward pass" in (out / "derivations" / "tanh_of_x.md").read_text()
    assert (out / "tanh_of_x.py").exists() and (out / "derivations" / "tanh_of_x_steps.tex").exists()
    run = latexmk(out / "derivations", "tanh_of_x")
    assert run.returncode == 0, run.stdout[-2000:]
