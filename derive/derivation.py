"""Derivation documents of a fused kernel, generated from the kernel (never written per layer).

A document has these parts, every one read off the traced spec, the kernel and the derivation of
the spec as written (``document/written.py``):

1. the forward pass, one equation per named line of the spec, in the spec's own names;
2. the compute graph (``figure.py``), fan-outs and broadcasts marked;
3. the backward pass line by line: for each named line and input, the function differentiated,
   the chain rule with its Kronecker deltas, each collapse named, the local derivative (written in
   the line's own value where it appears), and the adjoint as the sum of what its uses send. Each
   adjoint shown is the gradient of the loss with respect to that variable (``tests/test_adjoints.py``
   evaluates every one against autograd). A path that carries nothing is said, with the sum that
   makes it zero; a one-hot and a cancelling adjoint are said when they appear;
4. each input's route from its adjoint to the fused formula, one identity per line: an adjoint
   substituted, a sum that vanishes dropped, a saved line's definition solved, the common factors out;
5. the fused formula next to the lines of the generated ``_backward`` that compute it;
6. a worked example: real numbers forward and backward, the step-by-step result compared with the
   fused one as the exercise's ``cmp`` does, and which entries each reduction's gradient touches.

All decisions are made here and in ``document/``; the templates only place the strings.
"""
from __future__ import annotations

import numpy as np
import sympy as sp

from . import figure
from .codegen import environment, header, render_function, render_steps
from .document import sentences
from .document.display import Display, equation
from .document.evaluate import complete, evaluate
from .document.executed import executed
from .document.formats import MARKDOWN, PREAMBLE, TEX, Format
from .document.notation import ADJOINT, Printer, RESERVED_LETTERS, index_letters, md_code, tex_code, tex_name, tex_text
from .document.numbers import Example, example, matrix, number, one_thread
from .document.written import LEAVES, Route, Written, placeholder
from .kernel import Kernel
from .memo import ByObject
from .symbolic import Red, extent
from .trace import Graph, Node

LINK_STEPS = "the same backward pass one primitive at a time, every broadcast and de-broadcasting sum on small matrices"


# -- what the document shows, worked out once per kernel -----------------------------------------------
class _Analysis:
    """The derivation of the spec as written, its routes, the worked example and the printer."""

    def __init__(self, kernel: Kernel):
        self.kernel, self.graph, self.el = kernel, kernel.graph, kernel.elements
        self.written = w = Written(kernel)
        self.routes = {x: w.route(x) for x in w.inputs}
        self.cancel_routes = {n: w.route(n, drop=False) for n, a in w.adjoints.items() if a.cancels}
        self.example = example(self.graph)
        exprs = [*w.definition.values()]
        for a in w.adjoints.values():
            exprs += [a.lecture] + [e for u in a.uses for e in (u.chain, u.local, u.in_values)]
            exprs += [v.shown for v in a.vanished] + [s.inlined for v in a.vanished for s in v.sums]
        for r in [*self.routes.values(), *self.cancel_routes.values()]:
            exprs += [r.start] + [s.result for s in r.steps] + [e for s in r.steps if s.identity for e in s.identity]
        exprs += [f.element for f in kernel.formulas]
        exprs += [self.el.ref(n) for n in self.graph.nodes]
        seen = {i.name: i for e in exprs for i in e.atoms(sp.Idx)}
        dims = [self.graph.sizes[d] for d in kernel.layer.dims]
        taken = RESERVED_LETTERS | set(kernel.layer.dims) | set(kernel.layer.inputs) | {n.name for n in self.graph.nodes}
        free = [self.el.index[s].name for s in dims]
        self.printer = Printer(index_letters(free, seen, taken, {s: k for k, s in enumerate(dims)}))
        self.seen = seen
        self.adjoint_values = self._adjoint_values()
        self.comparison = None  # the exercise's cmp, run once for both formats (_compare)

    def _adjoint_values(self) -> dict[Node, np.ndarray]:
        """Every adjoint the document prints, evaluated on the worked example with the document's
        own formulas, from the output back."""
        w, ex, graph = self.written, self.example, self.graph
        arrays = complete(self.el, ex.values, scalars(graph, ex))
        arrays[f"d{graph.output.name}"] = ex.upstream
        out = {}
        for node in w.adjoints:  # the output first, then every line and input from the output back
            a = w.adjoints[node]
            value = evaluate(a.lecture, arrays, scalars(graph, ex), self.el.free(node))
            out[node] = value.reshape(np.shape(ex.values[node.name]))
            arrays[ADJOINT + node.name] = out[node]
        return out


def scalars(graph: Graph, ex: Example) -> dict:
    """Sizes and constants of the worked example, by their symbols."""
    values = dict(graph.size_values(ex.sizes))  # with the sizes the spec computed (``c // groups``)
    values.update({graph.constants[c]: float(ex.inputs[c]) for c in graph.constants})
    return values


_ANALYSED = ByObject(maxsize=32)  # kernel -> its _Analysis, shared by the TeX and the Markdown document


def analysis(kernel: Kernel) -> _Analysis:
    return _ANALYSED.get(kernel, _Analysis)


# -- the parts of the document -----------------------------------------------------------------------
def _ref(a: _Analysis, node: Node, adjoint: bool = False, name: str | None = None) -> str:
    base = tex_name(name or node.name)
    return a.printer.element(r"\overline{%s}" % base if adjoint else base, a.el.free(node))


def _forward(a: _Analysis, fmt: Format) -> list[dict]:
    p, code = a.printer, fmt.code
    return [dict(name=code(n.name), line=n.line, source=code(n.source.strip()),
                 equation=fmt.display(equation(p, _ref(a, n), a.written.definition[n])))
            for n in a.written.lines]


def _collapse_text(c, p: Printer, fmt: Format) -> str:
    j, m = p.doprint(c.index), fmt.math
    if c.kind == "delta":
        e = p.doprint(c.value)
        delta = m(r"\delta_{%s, %s}" % (j, e))
        return f"the Kronecker delta {delta} collapses the sum over {m(j)}: only the term {m(j + ' = ' + e)} is left"
    term = p.parenthesize(c.value, 0)
    rule = r"\sum_{%s} %s = %s\,%s" % (j, term, p.doprint(c.index.upper + 1), term)
    return f"a term that does not depend on {m(j)}, summed over {m(j)}, is multiplied by the size: {m(rule)}"


def _backward(a: _Analysis, fmt: Format) -> list[dict]:
    """One entry per variable, from the output back: its uses, its adjoint, what vanishes."""
    w, p, code, m = a.written, a.printer, fmt.code, fmt.math
    out = []
    order = [n for n in reversed(w.lines) if n is not a.graph.output] + w.inputs
    for node in order:
        adjoint = w.adjoints[node]
        lhs = _ref(a, node, adjoint=True)
        uses = []
        for u in adjoint.uses:
            c = u.consumer
            local = fmt.display(equation(p, lhs, u.local, accumulate=True))
            values = "" if u.in_values == u.local else fmt.display(equation(p, lhs, u.in_values, accumulate=True))
            uses.append(dict(
                consumer=code(c.name), line=c.line, source=code(c.source.strip()),
                definition=fmt.display(equation(p, _ref(a, c), u.definition)),
                chain=fmt.display(equation(p, lhs, u.chain, accumulate=True)),
                collapses=[_collapse_text(x, p, fmt) for x in u.collapses],
                local=local, in_values=values, value_of=code(c.name),
                onehots=[sentences.onehot(d, c, node, p, m, code) for d in u.onehots]))
        vanished = []
        for v in adjoint.vanished:
            vanished.append(dict(
                text=f"The path from {code(v.source.name)} through {code(v.via.name)} into {code(node.name)} carries "
                     f"nothing. Its contribution, with the adjoints that are the same along the summed axis taken "
                     f"out of the sum, is",
                shown=fmt.display(Display(p.doprint(v.shown) + " = 0")),
                reasons=[sentences.vanishing(s, w.nodes, p, m, code) for s in v.sums]))
        cancel = None
        if adjoint.cancels:
            cancel = dict(text=sentences.cancels(node, p, m, code), route=_route(a, a.cancel_routes[node], fmt))
        out.append(dict(name=code(node.name), kind="input" if node.op in LEAVES else f"line {node.line}",
                        uses=uses, several=len(uses) > 1,
                        adjoint=fmt.display(equation(p, lhs, adjoint.lecture)), vanished=vanished, cancel=cancel))
    return out


def _route(a: _Analysis, route: Route, fmt: Format) -> list[dict]:
    """An adjoint's route to the fused formula (or to zero): one identity and its result per step."""
    p, code, m, w = a.printer, fmt.code, fmt.math, a.written
    lhs = _ref(a, route.input, adjoint=True)
    steps = [dict(text=f"By its uses ({', '.join(code(u.consumer.name) for u in w.adjoints[route.input].uses)}):",
                  result=fmt.display(equation(p, lhs, route.start)), reasons=[])]
    for s in route.steps:
        if s.kind == "adjoint":
            bar, value = s.identity
            text = (f"Substituting the adjoint of {code(s.node.name)} (line {s.node.line}), "
                    f"{m(p.doprint(bar) + ' = ' + p.doprint(value))}:")
        elif s.kind == "saved":
            target, value = s.identity
            text = (f"The forward pass keeps {code(s.node.name)}; its line (line {s.node.line}: "
                    f"{code(s.node.source.strip())}) solved for the value it reads gives "
                    f"{m(p.doprint(target) + ' = ' + p.doprint(value))}:")
        elif s.kind == "recognize":
            total, value = s.identity
            text = (f"The sum is a line of the spec: {code(s.node.name)} (line {s.node.line}) computes it, "
                    f"{m(p.doprint(total) + ' = ' + p.doprint(value))}:")
        elif s.kind == "inline":
            target, value = s.identity
            text = f"Writing {code(s.node.name)} out by its line (line {s.node.line}), {m(p.doprint(target) + ' = ' + p.doprint(value))}:"
        else:
            text = "Collecting the terms and taking the common factors out:"
        reasons = []
        for v in s.vanished:
            owner = next((n for n in a.cancel_routes if (v.total / w.adjoints[n].lecture).is_number), None)
            if owner is not None:
                factor = v.total / w.adjoints[owner].lecture
                reasons.append(f"{m(p.doprint(v.total) + ' = ' + p.doprint(factor * placeholder(a.el, owner)))}, and "
                               f"the adjoint of {code(owner.name)} is zero (it cancels, above): the sum drops out.")
            elif v.sums:
                pulled = "" if v.pulled == v.total else m(p.doprint(v.total) + " = " + p.doprint(v.pulled))
                reasons.append(" ".join(x for x in [
                    f"The sum drops out: {pulled}, and" if pulled else "The sum drops out:",
                    *[sentences.vanishing(x, w.nodes, p, m, code) for x in v.sums]] if x))
            else:
                reasons.append(f"{m(p.doprint(v.total))} is zero once its adjoints are substituted: the sum drops out.")
        if s.kind == "closed":
            reasons += sentences.leftover(s.result, set(a.graph.sizes.values()), p, m)
        if s is route.steps[-1]:
            reasons += [sentences.sums_to_zero(route.input, i, lhs, p, m, code) for i in route.zero_sums]
        steps.append(dict(text=text, result=fmt.display(equation(p, lhs, s.result)), reasons=reasons))
    return steps


def _gradients(a: _Analysis, fmt: Format) -> list[dict]:
    """Each fused formula, its route, and the lines of ``_backward`` that compute it."""
    kernel, p, code = a.kernel, a.printer, fmt.code
    source = render_function(kernel)
    nodes = {n.name: n for n in a.graph.nodes}
    out = []
    for f in kernel.formulas:
        node = a.graph.inputs[f.input]
        route = a.routes[node]
        lines = [f"{s.name} = {s.code}" for s in kernel.shared if f.position in s.users] + [f"d{f.input} = {f.code}"]
        run = executed(source, f.position, f"d{f.input}", f.code)
        read = sorted({str(e.base) for e in f.element.atoms(sp.Indexed)} | {str(e) for e in f.element.free_symbols})
        reads = [f"{code(r)} (" + (f"line {nodes[r].line}: {code(nodes[r].source.strip())}" if nodes[r].op not in LEAVES
                                   else "an input") + ")" for r in read if r in nodes]
        out.append(dict(
            name=code(f"d{f.input}"), input=code(f.input), route=_route(a, route, fmt), matches=route.matches,
            formula=fmt.display(equation(p, _ref(a, node, name=f"d{f.input}"), f.element)),
            code="\n".join(lines), executed="\n".join(run.lines), same=run.same_as_formula,
            notes=[f"{code(n.split(': ', 1)[0])}: {n.split(': ', 1)[1]}" for n in run.notes], reads=reads))
    return out


def _example(a: _Analysis, fmt: Format) -> dict:
    """The worked example: inputs, forward values, adjoints, the exercise's cmp, touched entries."""
    ex, graph, code, m = a.example, a.graph, fmt.code, fmt.math
    inputs = [fmt.display(Display(f"{tex_name(k)} = {matrix(v.numpy() if hasattr(v, 'numpy') else v)}"))
              for k, v in ex.inputs.items() if k in graph.layer.tensors]
    constants = ", ".join(m(f"{tex_name(c)} = {number(ex.inputs[c])}") for c in graph.layer.constants)
    forward = [fmt.display(Display(f"{tex_name(n.name)} = {matrix(ex.values[n.name])}")) for n in a.written.lines]
    upstream = fmt.display(Display(f"{tex_name('d' + graph.output.name)} = {matrix(ex.upstream)}"))
    backward = []
    for node, value in a.adjoint_values.items():
        if node is graph.output:
            continue
        backward.append(fmt.display(Display(r"\overline{%s} = %s" % (tex_name(node.name), matrix(value)))))
    return dict(sizes=", ".join(m(f"{k} = {v}") for k, v in ex.sizes.items()), inputs=inputs, constants=constants,
                forward=forward, upstream=upstream, backward=backward, compare=_compare(a, fmt),
                touched=_touched(a, fmt), steps_file=code(f"{graph.layer.name}_steps.py"),
                fused_file=code(f"{graph.layer.name}.py"))


CMP_CLOSE = 1e-12  # in float64 on numbers of size ~1: equal up to rounding


def _compare(a: _Analysis, fmt: Format) -> list[dict]:
    """The exercise's ``cmp``: the generated step-by-step backward against the generated fused one."""
    if a.comparison is None:
        with one_thread():
            a.comparison = _compared(a)
    return [dict(name=fmt.code(f"d{name}"), approximate=str(close),
                 maxdiff=fmt.math(r"< 10^{-12}") if diff < CMP_CLOSE else fmt.math(number(diff)))
            for name, close, diff in a.comparison]


def _compared(a: _Analysis) -> list[tuple[str, bool, float]]:
    """(input, allclose, largest difference) of each gradient, both modules run on the example."""
    import torch

    layer, graph, ex = a.kernel.layer, a.graph, a.example
    steps, fused = {}, {}
    exec(compile(render_steps(graph), f"{layer.name}_steps.py", "exec"), steps)
    exec(compile(render_function(a.kernel), f"{layer.name}.py", "exec"), fused)
    upstream = torch.as_tensor(ex.upstream)
    out, cache = steps["forward"](**ex.inputs)
    stepwise = steps["backward"](cache, upstream)
    leaves = {k: (v.clone().requires_grad_(k in layer.differentiable) if isinstance(v, torch.Tensor) else v)
              for k, v in ex.inputs.items()}
    fused[layer.name](**leaves).backward(upstream)
    rows = []
    for name in layer.differentiable:
        # an input the output does not read has no gradient (None) on either side: zero
        ours, theirs = (torch.zeros_like(leaves[name]) if g is None else g
                        for g in (leaves[name].grad, stepwise[f"d{name}"]))
        rows.append((name, bool(torch.allclose(ours, theirs)), float((ours - theirs).abs().max())))
    return rows


def _touched(a: _Analysis, fmt: Format) -> list[dict]:
    """For each line that sums or picks: which entries of what it reads its first element's gradient reaches."""
    w, ex, p, code = a.written, a.example, a.printer, fmt.code
    out = []
    for node in w.lines:
        definition = w.definition[node]
        if not (definition.atoms(Red) or any(isinstance(i, sp.Indexed) for e in definition.atoms(sp.Indexed)
                                             for i in e.indices)):
            continue
        for use in [u for v in w.adjoints.values() for u in v.uses if u.consumer is node]:
            target = use.target
            if target.op == "labels":
                continue
            arrays = dict(ex.values)
            seed = np.zeros(np.shape(ex.values[node.name]))
            seed.reshape(-1)[0] = 1.0
            arrays[ADJOINT + node.name] = seed
            try:
                reach = evaluate(use.local, arrays, scalars(a.graph, ex), a.el.free(target))
            except Exception:  # noqa: BLE001 - a formula without numbers is not drawn
                continue
            reach = reach.reshape(np.shape(ex.values[target.name]))
            zeros = "".join("0" for i in a.el.free(node) if i != 0)
            first = f"{tex_name(node.name)}_{{{zeros}}}" if zeros else tex_name(node.name)
            grid = matrix(reach, cell=lambda v: r"\blacksquare" if abs(v) > 0 else r"\square")
            out.append(dict(text=f"The gradient of {fmt.math(first)} (line {node.line}, {code(node.name)}) reaches these "
                                 f"entries of {code(target.name)} (filled: non-zero on this example):",
                            grid=fmt.display(Display(r"\frac{\partial %s}{\partial %s} \ne 0: \quad %s"
                                                     % (first, tex_name(target.name), grid)))))
    return out


def _legend(a: _Analysis) -> list[dict]:
    free = {i.name for i in a.el.index.values()}
    p = a.printer
    return [dict(letter=letter, last=p.doprint(extent(a.seen[name]) - 1), size=p.doprint(extent(a.seen[name])),
                 kind="a free index" if name in free else "a summation index")
            for name, letter in p.letters.items() if name in a.seen]


def _context(kernel: Kernel, fmt: Format) -> dict:
    a = analysis(kernel)
    out, code = a.graph.output, fmt.code
    return dict(name=code(kernel.name), doc=fmt.text(kernel.layer.doc), module=code(kernel.layer.module),
                output=code(out.name), grad_output=code(f"d{out.name}"), indices=_legend(a), m=fmt.math,
                forward=_forward(a, fmt), graph=graph_context(a.graph, fmt), backward=_backward(a, fmt),
                gradients=_gradients(a, fmt), example=_example(a, fmt),
                steps_doc=fmt.link(f"{kernel.name}_steps", code(f"{kernel.name}_steps")), steps_what=LINK_STEPS,
                label=f"{kernel.name}", saved=", ".join(map(code, kernel.saved)),
                inputs=", ".join(map(code, kernel.layer.differentiable)), ranks=_ranks(kernel, fmt))


def _ranks(kernel: Kernel, fmt: Format) -> dict | None:
    """The sums that cross ranks in ``<name>_synced.py`` (a declared batch axis), or None."""
    from .synced import has_batch_sums, synced_cached

    if not has_batch_sums(kernel):
        return None
    synced = synced_cached(kernel)
    params = [n for n in kernel.layer.differentiable if synced.batch not in kernel.layer.tensors[n].dims]
    lines = []  # each sum under its comment: a line of code and its comment overrun a page together
    for line in synced.crossing:
        statement, _, comment = line.partition("  # ")
        lines += [f"# {comment}", statement] if comment else [statement]
    return dict(batch=fmt.code(synced.batch), module=fmt.code(f"{kernel.name}_synced.py"),
                messages=synced.messages, gathers=synced.gathers, code="\n".join(lines),
                shares=", ".join(fmt.code(f"d{n}") for n in params))


def graph_context(graph: Graph, fmt: Format) -> dict:
    """The compute graph drawn both ways, and a sentence per fan-out (a node read twice, a broadcast)."""
    def name(n: Node) -> str:  # an unnamed temporary is named by what it does and where
        return fmt.code(n.name) if n.named or n.op in LEAVES else f"the {n.op} on line {n.line}"

    fans = [f"{name(n)} is read {len(c)} times (by {', '.join(name(m) for m in c)})" for n, c in figure.fan_out(graph)]
    fans += [f"{name(a)} is repeated over {' and '.join(fmt.math(tex_name(str(s))) for s in sizes)} by "
             f"{name(m)}: every element is used that many times, so its gradient sums over "
             f"{'that axis' if len(sizes) == 1 else 'those axes'}" for a, m, sizes in figure.broadcasts(graph)]
    return dict(tikz=figure.tikz(graph), mermaid=figure.mermaid(graph), fans=fans)


def _render(kernel: Kernel, fmt: Format) -> str:
    from .native import plan_context

    context = {**_context(kernel, fmt), "kernel_plan": plan_context(kernel)}
    body = environment().get_template(fmt.template).render(**context).lstrip("\n")
    return header(kernel, fmt.comment[0], body, fmt.comment[1], templates=[fmt.template, *fmt.includes]) + body


def render_unwritten(layer, markdown: bool, fault: str, steps: bool = False) -> str:
    """In place of a derivation document that ``derive`` failed to write (a fault of its own, not of
    the spec): a page that says so and asks for a report. The kernel does not depend on it, so a run
    writes this and goes on rather than stopping with a traceback."""
    fmt = MARKDOWN if markdown else TEX
    template = f"derivation_unwritten.{'md' if markdown else 'tex'}.j2"
    stem = f"{layer.name}_steps" if steps else layer.name
    kernel = fmt.code(f"{layer.name}{'_steps' if steps else ''}.py")
    body = environment().get_template(template).render(
        what="step-by-step backward pass" if steps else "fused backward pass", name=layer.name,
        name_tex=tex_code(layer.name), module=fmt.code(layer.module), label=stem, kernel=kernel,
        fault=fmt.code(fault)).lstrip("\n")
    return header(layer, fmt.comment[0], body, fmt.comment[1], templates=[template, *fmt.includes]) + body


def render_tex(kernel: Kernel) -> str:
    """The derivation as a standalone LaTeX document."""
    return _render(kernel, TEX)


def render_markdown(kernel: Kernel) -> str:
    """The derivation as GitHub Markdown: display math in ```math blocks, inline math as $`...`$."""
    return _render(kernel, MARKDOWN)


__all__ = ["render_tex", "render_markdown", "render_unwritten", "graph_context", "tex_name", "tex_text", "md_code", "PREAMBLE"]
