"""The compute graph of a traced spec, drawn as TikZ (LaTeX) and as a mermaid flowchart (GitHub Markdown).

The drawing is read off ``trace.Graph``: one box per node (the spec's name, or the operation for an
unnamed temporary), one arrow per argument. A node used more than once (a *fan-out*: batchnorm's
``bnmeani`` feeds every centred value and the variance) is drawn in red with its number of uses,
because that is where the backward pass adds the gradients coming back from each use.

Layout: a node's level is the length of the longest path from an input to it; within a level,
nodes are ordered by the mean position of their arguments (one barycentre pass), which keeps
arrows from crossing in the usual chain-shaped spec. Everything is deterministic.
"""
from __future__ import annotations

from dataclasses import dataclass

from .trace import Graph, Node

# room on the page for the TikZ drawing (cm); the spacing shrinks to fit, the \fitbox macro scales
WIDTH_CM, HEIGHT_CM = 16.0, 20.0
X_STEP_CM, Y_STEP_CM = 2.6, 1.2


@dataclass(frozen=True)
class Box:
    key: str  # a TeX/mermaid-safe identifier
    node: Node
    level: int
    uses: int  # how many arguments of later nodes read this node

    @property
    def label(self) -> str:
        return self.node.name if self.node.named or self.node.op in ("input", "labels") else self.node.op


def uses(graph: Graph) -> dict[Node, list[Node]]:
    """Node -> the consumers reading it, once per argument (``x*x`` counts twice)."""
    out: dict[Node, list[Node]] = {n: [] for n in graph.nodes}
    for m in graph.nodes:
        for a in m.inputs:
            out[a].append(m)
    return out


def fan_out(graph: Graph) -> list[tuple[Node, list[Node]]]:
    """The nodes read more than once, with their consumers: where gradients are summed."""
    return [(n, c) for n, c in uses(graph).items() if len(c) > 1]


def layout(graph: Graph) -> tuple[list[Box], dict[Node, float]]:
    """The boxes and each node's horizontal position within its level."""
    level: dict[Node, int] = {}
    for n in graph.nodes:  # topological order
        level[n] = 1 + max((level[a] for a in n.inputs), default=-1)
    rows: dict[int, list[Node]] = {}
    for n in graph.nodes:
        rows.setdefault(level[n], []).append(n)
    slot: dict[Node, float] = {}
    for lv in sorted(rows):
        row = rows[lv]
        if lv:
            order = {n: k for k, n in enumerate(row)}
            row.sort(key=lambda n: (sum(slot[a] for a in n.inputs) / len(n.inputs), order[n]))
        width = len(row)
        for k, n in enumerate(row):
            slot[n] = k - (width - 1) / 2
    counts = uses(graph)
    keys = {n: f"n{k}" for k, n in enumerate(graph.nodes)}
    return [Box(keys[n], n, level[n], len(counts[n])) for n in graph.nodes], slot


def tikz(graph: Graph) -> str:
    """A ``tikzpicture`` of the graph (needs ``\\usepackage{tikz}``)."""
    boxes, slot = layout(graph)
    levels = 1 + max(b.level for b in boxes)
    widest = max(sum(1 for b in boxes if b.level == lv) for lv in range(levels))
    dx = min(X_STEP_CM, WIDTH_CM / max(widest, 1))
    dy = min(Y_STEP_CM, HEIGHT_CM / max(levels, 1))
    lines = [r"\begin{tikzpicture}[x=%.2fcm, y=%.2fcm, font=\scriptsize, >=stealth," % (dx, dy),
             r"  op/.style={draw, rounded corners, inner sep=2pt, fill=white},",
             r"  leaf/.style={op, fill=black!8},",
             r"  fan/.style={op, draw=red!75!black, very thick, fill=red!6}]"]
    key = {b.node: b.key for b in boxes}
    for b in boxes:
        style = "fan" if b.uses > 1 else "leaf" if b.node.op in ("input", "labels") else "op"
        text = r"\texttt{%s}" % _tex(b.label)
        if b.uses > 1:
            text += r" \textcolor{red!75!black}{$\times%d$}" % b.uses
        lines.append(r"  \node[%s] (%s) at (%.2f, %.2f) {%s};" % (style, b.key, slot[b.node], -b.level, text))
    for b in boxes:
        for a in dict.fromkeys(b.node.inputs):
            lines.append(r"  \draw[->] (%s) -- (%s);" % (key[a], b.key))
    lines.append(r"\end{tikzpicture}")
    return "\n".join(lines)


def mermaid(graph: Graph) -> str:
    """A mermaid ``flowchart`` of the graph (GitHub renders it in a ```mermaid block)."""
    boxes, _ = layout(graph)
    key = {b.node: b.key for b in boxes}
    lines = ["flowchart TD"]
    for b in boxes:
        text = b.label + (f" ×{b.uses}" if b.uses > 1 else "")
        shape = ('[/"%s"/]' if b.node.op in ("input", "labels") else '["%s"]') % text
        lines.append(f"  {b.key}{shape}")
    for b in boxes:
        for a in dict.fromkeys(b.node.inputs):
            lines.append(f"  {key[a]} --> {b.key}")
    fans = [b.key for b in boxes if b.uses > 1]
    lines.append("  classDef fan stroke:#b22,stroke-width:3px,fill:#fdd;")
    if fans:
        lines.append(f"  class {','.join(fans)} fan;")
    return "\n".join(lines)


def _tex(text: str) -> str:
    return text.replace("_", r"\_")


__all__ = ["tikz", "mermaid", "fan_out", "uses", "layout"]
