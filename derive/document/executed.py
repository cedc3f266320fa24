"""The code that runs: the lines of a generated module's ``_backward`` that compute one gradient.

The formula a document shows is the kernel's readable form (``dloss*(probs - one_hot)/n``); the
module may compute it in fewer passes over memory (``probs * (dloss/n)`` then ``scatter_add_`` of
n values). The lines are read from the rendered module itself (its ``_backward``, parsed with
``ast``), so the document shows what runs, whatever form the kernel chose; each line is said in
words from the torch operations it calls.
"""
from __future__ import annotations

import ast
import functools
import re
from dataclasses import dataclass

# what a torch operation in a backward line does, in a reader's words (matched as ``.name(``)
OPERATIONS = {
    "scatter_add_": "adds a value at one position per row, the position given by the labels: the one-hot "
                    "term of the formula, without building the one-hot matrix",
    "index_add_": "adds rows at the positions given by the labels",
    "gather": "reads one entry per row, at the position given by the labels",
    "copy_": "writes into a buffer that already exists instead of allocating a new one",
    "addcmul_": "adds a product of two tensors times a number, in place",
    "addcdiv_": "adds a quotient of two tensors times a number, in place",
    "mul_": "multiplies in place", "add_": "adds in place", "sub_": "subtracts in place", "div_": "divides in place",
    "sum": "sums over an axis (a reduction of the formula)",
    "amax": "takes the maximum over an axis",
    "expand": "repeats a tensor along an axis without copying it (a broadcast)",
    "reshape": "gives the result the input's shape (a kept axis of size 1 dropped)",
    "einsum": "contracts two tensors over their shared axis (a sum of products)",
    "one_hot": "builds the one-hot matrix of the labels",
    "where": "chooses between two values element by element",
}


@dataclass
class Executed:
    gradient: str  # d<input>
    lines: list[str]
    notes: list[str]  # one sentence per torch operation the lines call
    same_as_formula: bool  # the module runs the formula's own one-liner


@functools.lru_cache(maxsize=8)  # asked once per gradient of the same module
def _blocks(source: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """``(guard, statements)`` of every ``if`` directly in ``_backward``."""
    tree = ast.parse(source)
    function = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "_backward")
    lines = source.splitlines(keepends=True)
    return tuple((ast.unparse(s.test), tuple(_segment(lines, b) for b in s.body))
                 for s in function.body if isinstance(s, ast.If))


def _segment(lines: list[str], node: ast.AST) -> str:
    """The source of ``node``, as ``ast.get_source_segment`` gives it, from lines split once (that
    function splits the whole module again at every call). Columns count UTF-8 bytes."""
    first, last = node.lineno - 1, node.end_lineno - 1
    if first == last:
        return lines[first].encode()[node.col_offset:node.end_col_offset].decode()
    return (lines[first].encode()[node.col_offset:].decode() + "".join(lines[first + 1:last])
            + lines[last].encode()[:node.end_col_offset].decode())


def executed(source: str, position: int, name: str, formula_code: str) -> Executed:
    """The statements ``_backward`` runs for the gradient of the input at ``position``."""
    guard = re.compile(rf"\bneeds\[{position}\]")
    lines = [line for test, body in _blocks(source) if guard.search(test) for line in body]
    text = "\n".join(lines)
    notes = [f"{op}: {what}" for op, what in OPERATIONS.items() if re.search(rf"\.{op}\(|\b{op}\(", text)]
    return Executed(name, lines, notes, f"{name} = {formula_code}" in lines)


__all__ = ["Executed", "executed", "OPERATIONS"]
