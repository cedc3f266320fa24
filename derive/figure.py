"""The compute graph of a traced spec, drawn as TikZ (LaTeX) and as a mermaid flowchart (GitHub Markdown).

The drawing is read off ``trace.Graph``: one box per node (the spec's name, or the operation for an
unnamed temporary), one arrow per argument. A node used more than once (a *fan-out*: batchnorm's
``bnmeani`` feeds every centred value and the variance) is drawn in red with its number of uses,
because that is where the backward pass adds the gradients coming back from each use. An argument
that an elementwise operation broadcasts (the mean, repeated over every row) is a fan-out as well:
its arrow is drawn thick and labelled with the sizes it is repeated over.

Layout: a node's level is the length of the longest path from an input to it; within a level,
nodes are ordered by the mean position of their arguments (one barycentre pass), which keeps
arrows from crossing in the usual chain-shaped spec. Everything is deterministic.
"""
from __future__ import annotations

from dataclasses import dataclass

from .trace import BINARY, Graph, Node

# room on the page for the TikZ drawing (cm): a level is 1.1 cm, enough for a box and its arrow's
# label at print size; a taller graph is set in columns of at most MAX_LEVELS levels
WIDTH_CM = 16.0
X_STEP_CM, Y_STEP_CM = 2.6, 1.1
MAX_LEVELS = 18
COLUMN_GAP = 1.0  # between two columns of a tall graph, in slots


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


def broadcast(consumer: Node, arg: Node) -> list:
    """The sizes over which ``consumer`` repeats ``arg`` (``bndiff = x - bnmeani`` repeats the mean
    over ``n``): each element of ``arg`` is then used that many times, and its gradient sums them."""
    if consumer.op not in BINARY:
        return []
    res, a = tuple(consumer.shape), tuple(arg.shape)
    extra = len(res) - len(a)
    out = list(res[:extra])
    out += [r for r, s in zip(res[extra:], a) if s == 1 and r != 1]
    return out


def broadcasts(graph: Graph) -> list[tuple[Node, Node, list]]:
    """Every (argument, consumer, repeated sizes) where an elementwise operation broadcasts."""
    return [(a, m, sizes) for m in graph.nodes for a in dict.fromkeys(m.inputs) if (sizes := broadcast(m, a))]


def _is_leaf(node: Node) -> bool:
    return node.op in ("input", "labels")


def layout(graph: Graph) -> tuple[list[Box], dict[Node, float]]:
    """The boxes and each node's horizontal position within its level.

    An operation sits one level below its deepest operation argument; an input sits just above its
    first use and beside it, so a parameter used late (``gamma``) is drawn where it is used.
    """
    counts = uses(graph)
    level: dict[Node, int] = {}
    for n in graph.nodes:  # topological order
        if not _is_leaf(n):
            level[n] = 1 + max((level[a] for a in n.inputs if not _is_leaf(a)), default=0)
    for n in graph.nodes:
        if _is_leaf(n):
            level[n] = min((level[m] for m in counts[n]), default=1) - 1
    slot: dict[Node, float] = {}
    rows: dict[int, list[Node]] = {}
    for n in graph.nodes:
        if not _is_leaf(n):
            rows.setdefault(level[n], []).append(n)
    for lv in sorted(rows):
        row, order = rows[lv], {n: k for k, n in enumerate(rows[lv])}

        def centre(n):
            placed = [slot[a] for a in n.inputs if a in slot]
            return sum(placed) / len(placed) if placed else 0.0
        row.sort(key=lambda n: (centre(n), order[n]))
        for k, n in enumerate(row):
            slot[n] = k - (len(row) - 1) / 2
    taken = {(level[n], slot[n]) for n in slot}
    for n in graph.nodes:
        if _is_leaf(n):
            near = [slot[m] for m in counts[n]] or [0.0]
            x = sum(near) / len(near)
            while (level[n], x) in taken:
                x += 1
            slot[n] = x
            taken.add((level[n], x))
    keys = {n: f"n{k}" for k, n in enumerate(graph.nodes)}
    return [Box(keys[n], n, level[n], len(counts[n])) for n in graph.nodes], slot


def tikz(graph: Graph) -> str:
    """A ``tikzpicture`` of the graph (needs ``\\usepackage{tikz}``).

    The spacing never shrinks below what is readable at print size. A graph taller than
    ``MAX_LEVELS`` levels is set in columns side by side, each holding a run of levels; an arrow
    from an earlier column starts at a dashed copy of its argument at the top of the column."""
    boxes, slot = layout(graph)
    low = min(b.level for b in boxes)
    levels = 1 + max(b.level for b in boxes) - low
    columns = -(-levels // MAX_LEVELS)
    per = -(-levels // columns)
    left = min(slot.values())
    widest = 1 + max(slot.values()) - left
    column_width = widest + COLUMN_GAP if columns > 1 else widest
    dx = min(X_STEP_CM, WIDTH_CM / max(column_width * columns, 1))
    lines = [r"\begin{tikzpicture}[x=%.2fcm, y=%.2fcm, font=\scriptsize, >=stealth," % (dx, Y_STEP_CM),
             r"  op/.style={draw, rounded corners, inner sep=2pt, fill=white},",
             r"  leaf/.style={op, fill=black!8},",
             r"  fan/.style={op, draw=red!75!black, very thick, fill=red!6},",
             r"  ghost/.style={op, dashed, draw=black!50, text=black!60}]"]
    column = {b.node: (b.level - low) // per for b in boxes}
    x = {b.node: slot[b.node] - left + column[b.node] * column_width for b in boxes}
    y = {b.node: -((b.level - low) % per) for b in boxes}
    key = {b.node: b.key for b in boxes}
    for b in boxes:
        style = "fan" if b.uses > 1 else "leaf" if _is_leaf(b.node) else "op"
        text = r"\texttt{%s}" % _tex(b.label)
        if b.uses > 1:
            text += r" \textcolor{red!75!black}{$\times%d$}" % b.uses
        lines.append(r"  \node[%s] (%s) at (%.2f, %.2f) {%s};" % (style, b.key, x[b.node], y[b.node], text))
    ghosts: dict = {}  # (argument, column) -> the key of its copy at the top of that column
    for b in boxes:
        for a in dict.fromkeys(b.node.inputs):
            if column[a] < column[b.node] and (a, column[b.node]) not in ghosts:
                k = sum(1 for (_, c) in ghosts if c == column[b.node])
                ghosts[(a, column[b.node])] = f"{key[a]}c{column[b.node]}"
                lines.append(r"  \node[ghost] (%s) at (%.2f, %.2f) {\texttt{%s}};"
                             % (ghosts[(a, column[b.node])], column[b.node] * column_width + k, 1, _tex(Box(
                                 key[a], a, 0, 0).label)))
    level = {b.node: b.level for b in boxes}
    for b in boxes:
        for a in dict.fromkeys(b.node.inputs):
            start = ghosts.get((a, column[b.node]), key[a])
            # an arrow that skips levels bends, so it does not run over the boxes in between
            skips = level[b.node] - level[a] > 1 and x[a] == x[b.node] and start == key[a]
            path = "to[bend right=35]" if skips else "--"
            sizes = broadcast(b.node, a)
            if sizes:  # a broadcast is a fan-out too: one element feeds a whole row or column
                label = r"\textcolor{blue!60!black}{$\times %s$}" % r"\,".join(map(_tex_size, sizes))
                lines.append(r"  \draw[->, blue!60!black, very thick] (%s) %s node[fill=white, inner sep=1pt] {%s} (%s);"
                             % (start, path, label, b.key))
            else:
                lines.append(r"  \draw[->] (%s) %s (%s);" % (start, path, b.key))
    lines.append(r"\end{tikzpicture}")
    return "\n".join(lines)


def mermaid(graph: Graph) -> str:
    """A mermaid ``flowchart`` of the graph (GitHub renders it in a ```mermaid block)."""
    boxes, _ = layout(graph)
    key = {b.node: b.key for b in boxes}
    lines = ["flowchart TD"]
    for b in boxes:
        text = b.label + (f" ×{b.uses}" if b.uses > 1 else "")
        shape = ('[/"%s"/]' if _is_leaf(b.node) else '["%s"]') % text
        lines.append(f"  {b.key}{shape}")
    for b in boxes:
        for a in dict.fromkeys(b.node.inputs):
            sizes = broadcast(b.node, a)
            arrow = f'==>|"×{" ".join(map(str, sizes))}"|' if sizes else "-->"
            lines.append(f"  {key[a]} {arrow} {b.key}")
    fans = [b.key for b in boxes if b.uses > 1]
    lines.append("  classDef fan stroke:#b22,stroke-width:3px,fill:#fdd;")
    if fans:
        lines.append(f"  class {','.join(fans)} fan;")
    return "\n".join(lines)


def _tex_size(size) -> str:
    name = str(size)
    return name if len(name) == 1 else r"\mathrm{%s}" % _tex(name)


def _tex(text: str) -> str:
    return text.replace("_", r"\_")


__all__ = ["tikz", "mermaid", "fan_out", "uses", "layout", "broadcast", "broadcasts"]
