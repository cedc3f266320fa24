"""The step-by-step derivation documents of every built-in layer: they compile (LaTeX), are well formed
(Markdown), show every generated backward line, and their math is the rule table's own result."""
from __future__ import annotations

import itertools
import re

import numpy as np
import pytest
import sympy as sp

from derive.derivation_steps import (ADJOINT, _illustration_sizes, _Notation, _walks, render_steps_markdown,
                                     render_steps_tex)
from derive.layers import BUILTIN
from derive.rules import BROADCASTING
from derive.stepwise import emit
from derive.symbolic import Red, extent
from derive.trace import trace

from conftest import assert_math_blocks_balanced


@pytest.fixture(scope="module", params=BUILTIN, ids=lambda layer: layer.name)
def doc(request):
    graph = trace(request.param)
    return graph, render_steps_tex(graph), render_steps_markdown(graph)


def test_tex_compiles(doc, compiled_derivations):
    graph, _, _ = doc
    # compiled once for the session, with every other document (conftest.compiled_derivations)
    run, pdf = compiled_derivations[f"{graph.layer.name}_steps"]
    assert run.returncode == 0, run.stdout[-3000:]
    assert pdf.exists() and pdf.stat().st_size > 0


def test_every_backward_line_is_shown_verbatim(doc):
    graph, tex, md = doc
    lines, _ = emit(graph)
    assert lines
    for line in lines:
        assert line.code in md
        assert line.code in tex  # inside verbatim: unescaped
    assert f"each of the {len(lines)} generated lines" in md


def test_every_forward_node_has_its_equation(doc):
    graph, _, md = doc
    for node in graph.nodes:
        if node.op not in ("input", "labels"):
            assert f"`{node.name}`:\n\n```math\n" in md
            assert f"ine {node.line}" in md


def test_broadcasts_and_reductions_are_illustrated(doc):
    graph, _, md = doc
    called = {r.output for r in graph.regions if r.layer.fused}
    records = [r for r in _records(graph) if r[0] not in called]
    broadcast = [r for r in records if r[0].op in BROADCASTING and tuple(r[1].shape) != tuple(r[0].shape)]
    reducing = [r for r in records if r[0].op in ("sum", "mean", "max", "matmul", "pick", "embed")]
    assert md.count("On a small example") == len(broadcast) + len(reducing)
    assert md.count("the de-broadcasting sum") == len(broadcast)
    if graph.layer.name == "cross_entropy":  # the exercise's 3x2 with a 3x1 operand
        assert "summed over axis 1, kept with size 1, back to the shape of `counts_sum_inv` ($`3 \\times 1`$)" in md


def _records(graph):
    note = _Notation(graph)
    records, _, _ = _walks(graph, note, _illustration_sizes(graph))
    return records


def _bmatrices(text: str) -> list[str]:
    """The outermost bmatrix bodies in ``text``."""
    out, depth, start = [], 0, 0
    for m in re.finditer(r"\\(begin|end)\{bmatrix\}", text):
        if m.group(1) == "begin":
            depth += 1
            if depth == 1:
                start = m.end()
        else:
            depth -= 1
            if depth == 0:
                out.append(text[start:m.start()])
    return out


def _top_level_split(body: str, sep: str) -> list[str]:
    parts, depth, last = [], 0, 0
    for m in re.finditer(r"\\begin\{bmatrix\}|\\end\{bmatrix\}|" + re.escape(sep), body):
        if m.group().startswith(r"\begin"):
            depth += 1
        elif m.group().startswith(r"\end"):
            depth -= 1
        elif depth == 0:
            parts.append(body[last:m.start()])
            last = m.end()
    return parts + [body[last:]]


def test_illustrations_are_at_most_3x3(doc):
    _, _, md = doc
    for body in _bmatrices(md):
        rows = _top_level_split(body, " \\\\\n")
        assert len(rows) <= 3, body
        assert all(len(_top_level_split(row, " & ")) <= 3 for row in rows), body


def test_markdown_math_blocks_balanced(doc):
    _, _, md = doc
    assert_math_blocks_balanced(md)
    assert md.count("```") % 2 == 0


def test_header_is_valid_comments(doc):
    _, tex, md = doc
    assert all(line.startswith("<!-- ") and line.endswith(" -->") for line in md.splitlines()[:5])
    assert all(line.startswith("% ") for line in tex.splitlines()[:5])


def test_no_raw_index_names(doc):
    """Readers see i, j, r, ... never SymPy's i_n, _r1_n or the walk's fresh _b indices."""
    _, tex, md = doc
    for text in (tex, md):
        for raw in ("i_{n}", "i_n", "_r1", "r_{1", "bar:", "Idx", "Red("):
            assert raw not in text
        assert not re.search(r"_b\d", text)


def test_a_layer_traced_again_renders_the_same_documents(doc):
    graph, tex, md = doc
    again = trace(graph.layer)
    assert again is not graph
    assert render_steps_tex(again) == tex and render_steps_markdown(again) == md


def test_shown_equations_are_the_rules_result_on_small_matrices(doc):
    """The element-wise equation of every rule line, expanded at the illustration's sizes, equals the
    same rule run by ArrayOps on symbol matrices: the math shown is the code's rule, not a retelling."""
    graph, _, _ = doc
    note = _Notation(graph)
    sizes = _illustration_sizes(graph)
    records, values, _ = _walks(graph, note, sizes)
    subs = {graph.sizes[d]: v for d, v in sizes.items()}
    shapes = {n.name: n.shape for n in graph.nodes}
    labels = {n.name: values[n] for n in graph.nodes if n.op == "labels"}
    called = {r.output for r in graph.regions if r.layer.fused}

    def concrete(e):
        if isinstance(e, Red):
            return sp.Add(*[concrete(e.body.xreplace({e.index: k})) for k in range(int(extent(e.index).xreplace(subs)))])
        if isinstance(e, sp.Indexed):
            idx = [int(concrete(i)) for i in e.indices]
            name = str(e.base)
            if name in labels:
                return sp.Integer(int(labels[name][tuple(idx)]))
            shape = shapes[name[len(ADJOINT):] if name.startswith(ADJOINT) else name]
            shown = [str(i) for i, s in zip(idx, shape) if s != 1]
            return sp.Symbol(f"{name}[{','.join(shown)}]" if shown else name)
        if isinstance(e, sp.Idx):
            raise AssertionError(f"free index {e} left")
        if e.is_Atom:
            return e.xreplace(subs)
        return e.func(*[concrete(a) for a in e.args])

    checked = 0
    for origin, node, part, _, array, _ in records:
        if origin in called or origin.op == "max":  # a fused kernel is not walked; max: see test_rules
            continue
        array = np.asarray(array, dtype=object)
        for idx in itertools.product(*[range(s) for s in array.shape]):
            generic = part.fn(tuple(sp.Integer(i) if s != 1 else 0 for i, s in zip(idx, node.shape)))
            assert sp.simplify(concrete(generic) - array[idx]) == 0, (origin, node, idx)
            checked += 1
    assert checked > 0, "no rule line of the spec was checked"
