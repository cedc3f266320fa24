"""Kernels with matrix products, lowered as stages: ``at::mm`` steps and loop programs between them.

The loops of the plan (``plan.py``) run over one frame and cannot take a contraction: ``sum_i
x[n, i]*W[i, o]`` would keep a partial sum per chunk of rows for every output element. A matrix
product is what BLAS is for, so here each one in the closed forms becomes a *product* step
(``at::mm`` of two stored tensors, either read through a transposed view: the call the eager
kernel's ``@`` makes), and everything else is a loop program of the plan on a frame of its own:
attention's softmax over ``(n, m)`` between ``q @ k.T`` and ``probs @ v``, the bias of ``linear``
over ``(n, o)``.

* A sum over ``a`` whose factors vary on ``(i, a)`` and on ``(a, j)`` is a product ``P[i, j]``;
  factors that do not vary on ``a`` come out of the sum, which then reads ``P``. A sum whose
  factors all vary on nested sets of axes is an ordinary reduction, left to the loops.
* A factor that is not a stored tensor read at its own indices (attention's ``probs*(dprobs -
  sum(probs*dprobs))``) is written first, by a loop program over ``(i, a)``.
* A value that is a product times a number (``dq = (dt2 @ k)/sqrt(d)``) is the product step
  itself, scaled in place; any other value is a loop program over its axes and those it sums.
* The forward writes the output and the values the backward reads (attention's ``probs``), as the
  eager kernel saves them; the backward writes each value its gradients read by name (the eager
  kernel's shared values: ``dprobs``, ``dt2``), on demand, then each gradient.

Identical products are computed once. A tensor written by a stage is stored in the layer's order of
axes (``layer.dims``), a gradient in its input's declared order, an output in its own.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import sympy as sp

from .forward_plan import plan as forward_statements
from .plan import NotLowered, Plan, Program, TensorArg, loop_program, written_out
from .spec import Labels
from .symbolic import AxisMax, AxisSum, Max, Red, extent, free_indices, reindex


@dataclass
class Product:
    """``name[i, j] = scale * sum_a left[i, a]*right[a, j]``: one ``at::mm``."""

    name: str
    left: str
    right: str
    left_dims: tuple  # how each operand is stored (its dims, in order)
    right_dims: tuple
    left_t: bool  # the operand is stored (a, i): read through a transposed view
    right_t: bool
    dims: tuple  # (i, j): how the result is stored
    over: str  # the dim ``a`` summed over
    scale: sp.Expr = sp.S.One

    def text(self) -> str:
        left, right = self.left + (".T" if self.left_t else ""), self.right + (".T" if self.right_t else "")
        scale = "" if self.scale == 1 else f" times {sp.sstr(self.scale)}"
        return f"{self.name} = {left} @ {right}{scale} (at::mm: the sum over {self.over})"


@dataclass
class Staged:
    """One native function (the forward or the backward) as steps in order: products and loop
    programs (``plan.Program``, each over a frame of its own)."""

    name: str
    inputs: list  # TensorArg, the function's arguments
    scalars: list
    outputs: list  # (TensorArg, name)
    steps: list  # Product | Program

    def summary(self) -> list[str]:
        """Which product and which loops run in which order, in words (as ``Program.summary``)."""
        lines = []
        for step in self.steps:
            if isinstance(step, Product):
                lines.append(f"product {step.text()}")
            else:
                written = ", ".join(t.name for t, _ in step.outputs)
                lines.append(f"loops over ({', '.join(step.frame)}) writing {written}:")
                lines += [f"  {line}" for line in step.summary()]
        return lines


def has_products(kernel) -> bool:
    """Whether the kernel's closed forms sum a product of factors on different axes (``x @ W``)."""
    try:
        stager = _Stager(kernel, "probe")
    except NotLowered:
        return False
    exprs = [st.value for st in forward_statements(kernel.elements, kernel.saved, stager.frame_index)]
    exprs += [s.element for s in kernel.shared] + [f.element for f in kernel.adjoints + kernel.formulas]
    for expr in exprs:
        for red in expr.atoms(Red, AxisSum):
            try:
                if any(stager.split(s) is not None for s in _term_sums(red)):
                    return True
            except NotLowered:
                return True
    return False


def _term_sums(red) -> list:
    """The sums of ``red`` taken term by term (a sum of a constant term is that term times the
    extent; one of a term with factors outside the sum, those factors times a sum)."""
    out = []
    for term in sp.Add.make_args(red.body):
        summed = type(red)(term, red.index)
        out += [f for f in sp.Mul.make_args(summed) if isinstance(f, (Red, AxisSum))]
    return out


def lower(kernel) -> Plan:
    """The staged plan of ``kernel``, or ``NotLowered`` with the reason."""
    layer = kernel.layer
    output = kernel.graph.output
    grad_out = f"d{output.name}"

    forward = _Stager(kernel, "forward")
    statements = forward_statements(kernel.elements, kernel.saved, forward.frame_index)
    temps = {}
    for st in statements:
        if st.code:
            raise NotLowered(f"{st.name} is computed by a statement printed as it is")
        value = st.value.xreplace(temps)
        if st.node is None:  # a shared temporary: read inline by the statements after it
            temps[sp.Symbol(st.name)] = value
            continue
        forward.pending[st.name] = (value, forward.dims_of_shape(st.node.shape), _own(kernel.elements.free(st.node)))
    computed = [s for s in kernel.saved if s not in layer.tensors]
    wanted = [output.name] + [s for s in computed if s != output.name]
    for name in wanted:
        forward.write(name)
    f_outputs = [(forward.tensors[n], n) for n in wanted]

    backward = _Stager(kernel, "backward")
    dims = backward.dims_of_shape(output.shape)
    backward.tensors[grad_out] = TensorArg(grad_out, frozenset(), dims)
    for name in computed:
        backward.tensors[name] = replace(forward.tensors[name], double=False)
    upstream = {sp.Symbol(grad_out): sp.Indexed(sp.IndexedBase(grad_out), 0)} if not output.shape else {}
    for s in kernel.shared:
        backward.pending[s.name] = (s.element.xreplace(upstream), backward.dims_of(s.element), None)
    for f in kernel.adjoints:
        backward.pending[f"d{f.input}"] = (f.element.xreplace(upstream), backward.dims_of(f.element), None)
    grads = []
    for f in kernel.formulas:
        name = f"d{f.input}"
        dims = tuple(d for d in layer.tensors[f.input].dims if d != "1")
        backward.pending[name] = (f.element.xreplace(upstream), dims, _own(kernel.elements.free(kernel.graph.inputs[f.input])))
        grads.append(name)
    for name in grads:
        backward.write(name)
    b_outputs = [(backward.tensors[n], n) for n in grads]

    tensors = [forward.tensors[k] for k in layer.tensors]
    constants = list(layer.constants)
    f_staged = Staged(f"{kernel.name}_forward", tensors, constants, f_outputs, forward.steps)
    b_inputs = [backward.tensors[grad_out]] + tensors + [backward.tensors[n] for n in computed]
    b_staged = Staged(f"{kernel.name}_backward", b_inputs, constants, b_outputs, backward.steps)
    return Plan(f_staged, b_staged, [(n, frozenset()) for n in computed], [],
                [str(kernel.graph.sizes[d]) for d in layer.dims])


class _Stager:
    """The steps of one function: each value written by a product or a loop program, on demand."""

    def __init__(self, kernel, direction: str):
        self.kernel, self.direction = kernel, direction
        layer = kernel.layer
        self.dims = list(layer.dims)
        self.dim_of, self.index = {}, {}
        for d in self.dims:
            size = kernel.graph.sizes[d]
            if size in self.dim_of:
                raise NotLowered(f"two axes of the same size ({self.dim_of[size]}, {d})")
            self.dim_of[size] = d
            self.index[d] = kernel.elements.index[size]
        self.frame_index = [self.index[d] for d in self.dims]
        self.tensors: dict[str, TensorArg] = {}
        for name, decl in layer.tensors.items():
            dims = tuple(decl.dims)
            if any(d != "1" and d not in self.dims for d in dims):
                raise NotLowered(f"{name} has a dimension made of several sizes ({', '.join(dims)})")
            self.tensors[name] = TensorArg(name, frozenset(), dims, isinstance(decl, Labels))
        # name -> (expression, stored dims, its element's own indices or None): written when first read
        self.pending: dict[str, tuple] = {}
        self.steps: list = []
        self.products: dict = {}  # (left, left_t, right, right_t) -> name
        self.count = 0

    # -- axes ---------------------------------------------------------------------------------
    def dim(self, index) -> str:
        d = self.dim_of.get(extent(index))
        if d is None:
            raise NotLowered(f"the index {index} runs over no axis of the layer")
        return d

    def dims_of(self, expr: sp.Expr) -> tuple:
        """The dims ``expr`` varies on, in the layer's order."""
        return tuple(sorted({self.dim(i) for i in free_indices(expr)}, key=self.dims.index))

    def dims_of_shape(self, shape: tuple) -> tuple:
        return tuple(self.dim_of[s] for s in shape if s != 1 and s in self.dim_of)

    def fresh(self, stem: str) -> str:
        while True:
            self.count += 1
            name = f"{stem}{self.count}"
            if name not in self.tensors and name not in self.pending:
                return name

    # -- writing values -----------------------------------------------------------------------
    def write(self, name: str) -> None:
        """The steps that write the pending value ``name`` (and, first, those it reads)."""
        if name in self.tensors:
            return
        if name not in self.pending:
            raise NotLowered(f"{name} is computed by no statement the stages know")
        expr, dims, own = self.pending.pop(name)
        for base in sorted({str(e.base) for e in expr.atoms(sp.Indexed)}):
            if base in self.pending:
                self.write(base)
        self.define(name, expr, dims, own)

    def define(self, name: str, expr: sp.Expr, dims: tuple, own: tuple | None = None) -> None:
        """Steps writing tensor ``name`` (stored ``dims``) = ``expr`` at the indices of those dims
        (``own``: the indices its element is written at, where two axes share a size: ``(i_h, i_h_2)``
        of a weight ``(h, h)``)."""
        if set(self.dims_of(expr)) != set(dims):
            raise NotLowered(f"{name} varies on ({', '.join(self.dims_of(expr))}), stored on ({', '.join(dims)})")
        free = free_indices(expr)
        square = len(set(dims)) < len(dims)
        if square and (own is None or set(own) != free):
            raise NotLowered(f"{name} has two axes of one size ({', '.join(dims)}) read as it is not stored")
        if not square:
            expr = reindex(expr, {i: self.index[self.dim(i)] for i in free})
            own = tuple(self.index[d] for d in dims)
        scale, core = expr.as_independent(*self.frame_index, *own, as_Add=False)
        if isinstance(core, (Red, AxisSum)) and not scale.atoms(sp.Indexed):  # a number, sizes, constants
            split = self.split(core, order=own)
            if split is not None and split[2] == sp.S.One and split[3:] == tuple(own):
                self.product(*split[:2], dims, name, scale, at=tuple(own))
                return
        if square:  # the loops name their axes by size
            raise NotLowered(f"{name} has two axes of one size ({', '.join(dims)}) and is not a matrix product")
        self.stage(name, self.products_of(expr), dims)

    def split(self, red, order: tuple = ()):
        """A contraction ``red`` as ``(left factors, right factors, factors outside the sum, i, j)``, or
        None for a sum whose factors vary on nested sets of axes (a reduction the loops take). ``i``
        is the first of ``order`` (indices), else of the layer's axes."""
        a = red.index
        inner, outside = [], []
        for f in sp.Mul.make_args(red.body):
            (inner if a in free_indices(f) else outside).append(f)
        axes = [frozenset(free_indices(f) - {a}) for f in inner]
        distinct = set(axes) - {frozenset()}
        if all(x <= y or y <= x for x in distinct for y in distinct):
            return None
        union = frozenset().union(*distinct)
        if len(union) != 2 or any(len(x) != 1 for x in distinct):
            names = ", ".join(sorted({self.dim(i) for i in union}))
            raise NotLowered(f"a sum over {self.dim(a)} of factors on ({names}): not a matrix product")
        rank = (lambda i: order.index(i)) if order and union == set(order) \
            else (lambda i: (self.dims.index(self.dim(i)), str(i)))
        i, j = sorted(union, key=rank)
        left = [f for f, x in zip(inner, axes) if x == {i}]
        right = [f for f, x in zip(inner, axes) if x == {j}]
        on_a = [f for f, x in zip(inner, axes) if not x]  # a weight per ``a``: joins a side written anyway
        if on_a:
            if self.stored(sp.Mul(*left), i, a) is not None and self.stored(sp.Mul(*right), a, j) is None:
                right += on_a
            else:
                left += on_a
        return sp.Mul(*left), sp.Mul(*right), sp.Mul(*outside), i, j

    def products_of(self, expr: sp.Expr) -> sp.Expr:
        """``expr`` with every contraction replaced by a read of its product (innermost first)."""
        if not expr.args or isinstance(expr, (sp.Indexed, sp.Idx)):
            return expr
        args = [self.products_of(a) for a in expr.args]
        if args != list(expr.args):
            expr = expr.func(*args)
        if isinstance(expr, (Red, AxisSum)) and isinstance(expr.body, sp.Add) \
                and any(self.split(s) is not None for s in _term_sums(expr)):
            return sp.Add(*[self.products_of(type(expr)(t, expr.index)) for t in expr.body.args])  # term by term
        if isinstance(expr, (Red, AxisSum)):
            split = self.split(expr)
            if split is not None:
                left, right, outside, i, j = split
                dims = (self.dim(i), self.dim(j))
                return outside * sp.Indexed(sp.IndexedBase(self.product(left, right, dims, at=(i, j))), i, j)
        return expr

    def stored(self, expr: sp.Expr, r, c):
        """``(tensor, transposed)`` when ``expr`` is a stored tensor of two axes read as ``[r, c]`` or
        ``[c, r]``; else None."""
        if not isinstance(expr, sp.Indexed) or str(expr.base) not in self.tensors:
            return None
        t = self.tensors[str(expr.base)]
        if t.labels or len([d for d in t.shape if d != "1"]) != 2 or len(expr.indices) != 2:
            return None
        if tuple(expr.indices) == (r, c):
            return t.name, False
        if tuple(expr.indices) == (c, r):
            return t.name, True
        return None

    def operand(self, expr: sp.Expr, r, c) -> tuple:
        """``expr`` (on ``r`` and ``c``) as a stored tensor: as it is, or written first by a loop program."""
        found = self.stored(expr, r, c)
        if found is not None:
            return found
        dims = tuple(sorted((self.dim(r), self.dim(c)), key=self.dims.index))
        name = self.fresh("operand")
        self.define(name, expr, dims)
        return name, dims[0] != self.dim(r)

    def product(self, left: sp.Expr, right: sp.Expr, dims: tuple, name: str = "", scale: sp.Expr = sp.S.One,
                at: tuple = ()) -> str:
        """The product of ``left`` (on ``i``, ``a``) and ``right`` (on ``a``, ``j``), stored ``dims``. ``at``:
        the indices ``i``, ``j`` as the factors read them (a sum's own index inside an enclosing sum)."""
        i, j = at or (self.index[dims[0]], self.index[dims[1]])
        a = next(iter(free_indices(left) & free_indices(right)), None)
        if a is None:
            raise NotLowered("a product of factors that share no summed axis")
        (lname, lt), (rname, rt) = self.operand(left, i, a), self.operand(right, a, j)
        key = (lname, lt, rname, rt, dims)
        if key in self.products and not name:
            return self.products[key]
        name = name or self.fresh("product")
        self.products.setdefault(key, name)
        self.steps.append(Product(name, lname, rname, tuple(self.tensors[lname].shape), tuple(self.tensors[rname].shape),
                                  lt, rt, dims, self.dim(a), scale))
        self.tensors[name] = TensorArg(name, frozenset(), dims)
        return name

    def stage(self, name: str, expr: sp.Expr, dims: tuple) -> None:
        """A loop program over the axes ``expr`` varies on and sums over, writing ``name``."""
        expr = written_out(expr)
        summed = {self.dim(r.index) for r in expr.atoms(Red, AxisSum, AxisMax, Max)}
        frame = sorted(set(dims) | summed, key=self.dims.index)
        if [d for d in frame if d in dims] != list(dims):
            raise NotLowered(f"{name} is stored across its loops' order of axes ({', '.join(dims)})")
        if len(frame) < 2:
            raise NotLowered(f"{name} is a value over one axis ({', '.join(frame)}) with no sum: "
                             f"loops over two axes or more")
        tensors = {}
        for base in sorted({str(e.base) for e in expr.atoms(sp.Indexed)}):
            t = self.tensors.get(base)
            if t is None or any(d != "1" and d not in frame for d in t.shape):
                raise NotLowered(f"{base} is read in the loops over ({', '.join(frame)}) that write {name}")
            if [d for d in t.shape if d != "1"] != [d for d in frame if d in t.shape]:
                raise NotLowered(f"{base} is stored across the order of the loops over ({', '.join(frame)})")
            tensors[base] = replace(t, layout=frozenset(frame.index(d) for d in t.shape if d != "1"))
        out = TensorArg(name, frozenset(frame.index(d) for d in dims), tuple(dims))
        program = loop_program(self.kernel, f"{self.kernel.name}_{self.direction}_{name}",
                               [self.index[d] for d in frame], tensors, [(name, expr)], [(out, name)])
        self.steps.append(program)
        self.tensors[name] = TensorArg(name, frozenset(), tuple(dims))


@dataclass(frozen=True)
class Spelling:
    """How a backend writes the statements of a staged driver (``driver_context``): each a format
    string. ``tensor`` names a tensor; ``view`` takes ``tensor`` and ``shape`` (its sizes, joined by
    ", "); ``product`` ``out``, ``left``, ``right``; ``scaled`` ``out`` and ``scale``; ``call`` ``out``,
    ``function`` and ``args``; ``comment`` ``text``. ``mm`` names the product in the comments."""

    tensor: str
    view: str
    product: str
    scaled: str
    call: str
    comment: str
    mm: str


def driver_context(staged: Staged, plan: Plan, kernel, spelling: Spelling, scale_printer) -> dict:
    """The function that runs a staged forward or backward step by step, as ``spelling`` writes it:
    each product one matrix product of two views of stored tensors (torch's BLAS: ``at::mm``,
    ``torch.mm``), scaled in place where it is a product times a number (printed by
    ``scale_printer``), each loop program a call of its function."""
    sizes = [f"sz_{s}" for s in plan.frame]
    constants = [f"k_{c}" for c in staged.scalars]

    def view(name: str, dims: tuple, transposed: bool) -> str:
        shape = ", ".join(f"sz_{kernel.graph.sizes[d]}" for d in dims if d != "1")
        return spelling.view.format(tensor=spelling.tensor.format(name), shape=shape) + (".t()" if transposed else "")

    body = []
    for step in staged.steps:
        if isinstance(step, Product):
            out = spelling.tensor.format(step.name)
            body.append(spelling.comment.format(text=step.text().replace("at::mm", spelling.mm)))
            body.append(spelling.product.format(out=out, left=view(step.left, step.left_dims, step.left_t),
                                                right=view(step.right, step.right_dims, step.right_t)))
            if step.scale != 1:
                body.append(spelling.scaled.format(out=out, scale=scale_printer.doprint(step.scale)))
        else:
            args = [spelling.tensor.format(t.name) for t in step.inputs] + constants + sizes
            body.append(spelling.call.format(out=spelling.tensor.format(step.outputs[0][0].name), function=step.name,
                                             args=", ".join(args)))
    return dict(name=staged.name, args=[t.name for t in staged.inputs], constants=constants, sizes=sizes,
                body=body, outputs=[name for _, name in staged.outputs])


def contexts(plan: Plan, kernel, program_context, staged_context) -> tuple[list[dict], list[dict]]:
    """What a backend's template places for ``plan``: the context of each program (``program_context``;
    of a staged plan, each loop stage's, its function taking every size of the layer) and of each
    staged direction's driver (``staged_context``; none for a plan over one frame)."""
    if not isinstance(plan.forward, Staged):
        return [program_context(p, plan, kernel) for p in (plan.forward, plan.backward)], []
    directions = (plan.forward, plan.backward)
    programs = [program_context(step, plan, kernel, sizes=plan.frame) for staged in directions for step in staged.steps
                if isinstance(step, Program)]
    return programs, [staged_context(staged, plan, kernel) for staged in directions]


def _own(indices: tuple) -> tuple:
    """An element's own indices but those of kept axes (0)."""
    return tuple(i for i in indices if i != 0)


__all__ = ["lower", "has_products", "Staged", "Product", "Spelling", "contexts", "driver_context"]
