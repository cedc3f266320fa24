"""The atomic axes of a traced graph: what a view that splits or merges axes does, element-wise.

A view keeps the elements in order, so ``x.view(n, G, d // G)`` reads the axis ``d`` as two axes
``(G, d_G)`` (``d = G*d_G``, row-major) and ``emb.view(n, -1)`` reads the axis ``t*e`` as
``(t, e)``. The fused engine works on *atoms*: every axis of every value is a sequence of atomic
sizes, refined until each view only regroups atoms: the axis ``d`` of ``x`` is ``(2, d_2)``
everywhere (in ``gamma`` too), ``embcat``'s axis ``t*e`` is ``(t, e)``. An element then has one
index per atom (``x[i_n, i_2, i_d_2]``) and a view is a renaming of indices, nothing else; a
tensor stored with fewer axes is viewed into its atoms when it is read (``x.view(n, 2, d // 2)``)
and a result reshaped to its stored shape.

``axis_atoms(graph)`` returns each node's atoms per axis (``()`` for an axis of size 1), or raises
``DerivationError`` at a view that cannot be written so (its sizes do not factor through the
dimensions and the sizes the spec divides).
"""
from __future__ import annotations

import sympy as sp

from .errors import DerivationError
from .spec import dim_names
from .trace import Graph, Node


def _product(atoms) -> sp.Expr:
    return sp.Mul(*atoms) if atoms else sp.S.One


def axis_atoms(graph: Graph) -> dict[Node, list[tuple]]:
    """Each node's axes as sequences of atomic sizes (see the module's docstring)."""
    quotients = {(sp.sympify(a), sp.sympify(b)): s for s, (a, b) in graph.derived.items()}
    expanded = {s: sp.sympify(a) / sp.sympify(b) for s, (a, b) in graph.derived.items()}

    def same(a, b) -> bool:
        return sp.cancel(sp.sympify(a).xreplace(expanded) - sp.sympify(b).xreplace(expanded)) == 0

    split: dict = {}  # atom -> the atoms it is read as
    for _ in range(50):  # each round may split an atom; a split never undoes another
        try:
            return _propagate(graph, split, same, quotients)
        except _Split as s:
            split[s.atom] = s.parts
    raise DerivationError(graph.layer.name, "the views split axes without end", "report this as a bug")


class _Split(Exception):
    def __init__(self, atom, parts):
        self.atom, self.parts = atom, parts


def _refined(atoms: tuple, split: dict) -> tuple:
    out = []
    for a in atoms:
        out += list(_refined(split[a], split)) if a in split else [a]
    return tuple(out)


def _propagate(graph: Graph, split: dict, same, quotients: dict) -> dict[Node, list[tuple]]:
    atoms: dict[Node, list[tuple]] = {}
    for node in graph.nodes:
        atoms[node] = [_refined(a, split) for a in _axes(node, atoms, graph, same, quotients, split)]
    return atoms


def _declared(graph: Graph, node: Node) -> list[tuple]:
    decl = graph.layer.tensors[node.name]
    return [tuple(graph.sizes[n] for n in dim_names(d)) for d in decl.dims]


def _axes(node: Node, atoms: dict, graph: Graph, same, quotients: dict, split: dict) -> list[tuple]:
    op = node.op
    if op in ("input", "labels"):
        return _declared(graph, node)
    operands = [a for a in node.args if isinstance(a, Node)]
    if op == "view":
        return _view(node, atoms[node.args[0]], same, quotients)
    if op == "permute":
        source = atoms[node.args[0]]
        return [source[p] for p in node.attrs["perm"]]
    if op in ("sum", "mean", "max", "logsumexp"):
        source, axes = atoms[node.args[0]], node.attrs["axes"]
        if node.attrs["keepdim"]:
            return [() if k in axes else a for k, a in enumerate(source)]
        return [a for k, a in enumerate(source) if k not in axes]
    if op == "matmul":
        a, b = (atoms[x] for x in node.args)
        return [*a[:-1], b[-1]]
    if op == "pick":
        return [atoms[node.args[0]][0]]
    if op == "embed":
        table, labels = (atoms[x] for x in node.args)
        return [*labels, *table[1:]]
    # elementwise, broadcasting from the right: each axis as the operand that varies along it
    out = []
    for k, size in enumerate(node.shape):
        found = ()
        for x in operands:
            offset = len(node.shape) - len(x.shape)
            if k >= offset and x.shape[k - offset] != 1:
                found = atoms[x][k - offset]
                break
        out.append(found if size != 1 else ())
    return out


def _view(node: Node, source: list[tuple], same, quotients: dict) -> list[tuple]:
    """The view's axes as consecutive runs of the source's atoms; an atom a run ends inside is split."""
    sequence = [a for axis in source for a in axis]
    out, k = [], 0
    for size in node.shape:
        if size == 1:
            out.append(())
            continue
        end = next((j for j in range(k + 1, len(sequence) + 1) if same(_product(sequence[k:j]), size)), None)
        if end is None:  # the run ends inside the atom sequence[k]: it splits into (size, the rest)
            if k == len(sequence):
                _refuse(node)
            atom, needed = sequence[k], sp.sympify(size)
            rest = quotients.get((atom, needed))
            if rest is None:
                _refuse(node)
            raise _Split(atom, tuple(sp.Mul.make_args(needed)) + (rest,))
        out.append(tuple(sequence[k:end]))
        k = end
    if k != len(sequence):
        _refuse(node)
    return out


def _refuse(node: Node):
    raise DerivationError("", f"a view to {node.shape} whose sizes do not regroup its source's axes",
                          "split a dimension with d // k or -1 in the view, or merge whole axes", node.line, node.source)


def atomic_shape(axes: list[tuple]) -> tuple:
    """The shape of a value read at its atoms: each axis's atoms, 1 for an axis of size 1."""
    return tuple(a for axis in axes for a in (axis or (1,)))


__all__ = ["axis_atoms", "atomic_shape"]
