"""Native backends: a fused kernel's plan rendered as C++ (``--backend cpp``) or Triton (``--backend triton``).

For each layer whose fused kernel the plan lowers (``plan.lower``), ``--backend cpp`` writes two
files beside the eager ones: ``native/<name>.cpp`` (the loops, ``cpp.render_source``) and
``<name>_cpp.py``, a module with the same function as ``<name>.py`` whose forward and backward
call the extension built from every ``native/*.cpp`` of the folder (one build, cached). A kernel with
matrix products is lowered as stages (``stages.lower``: products, ``at::mm`` in C++ and ``torch.mm`` in
the Triton module's driver, and loop programs). A layer the plan cannot lower keeps its eager kernel
only, and the report says why.
"""
from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass

from . import codegen
from .forward import size_names
from .kernel import Kernel
from .plan import NotLowered, Plan, lower
from .stages import Staged, has_products
from .stages import lower as lower_staged
from .spec import Labels, Tensor
from .templating import environment

BACKENDS = ("cpp", "triton")
CPP_TEMPLATES = ["native_module.py.j2", "native_loader.py.j2", "native_kernel.cpp.j2"]
TRITON_TEMPLATES = ["triton_module.py.j2"]


@dataclass
class Lowered:
    """A kernel's plan, or the reason it has none."""

    plan: Plan | None
    reason: str = ""


def lowered(kernel: Kernel) -> Lowered:
    """The plan of ``kernel``, the same for both backends: loops over one frame (``plan.lower``), or
    for a kernel with matrix products, stages of products (torch's BLAS) and loops (``stages.lower``)."""
    try:
        return Lowered(lower(kernel))
    except NotLowered as e:
        if not has_products(kernel):
            return Lowered(None, str(e))
    try:
        return Lowered(lower_staged(kernel))
    except NotLowered as e:
        return Lowered(None, str(e))


def output_names(name: str, backend: str) -> list[str]:
    if backend == "cpp":
        return [f"native/{name}.cpp", f"{name}_cpp.py"]
    return [f"{name}_triton.py"]


def _tuple(names: list[str]) -> str:
    return ", ".join(names) + ("," if len(names) == 1 else "")


def _shape_text(shape: tuple) -> str:
    return "(" + ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "") + ")"


PLAN_WIDTH = 86  # characters of a plan line: a TeX page's small verbatim holds about 90


def plan_lines(plan: Plan) -> list[str]:
    """The plan in words, for the module's docstring and the derivation documents (a long line
    continues below it, indented)."""
    lines = ["forward:"] + [f"  {line}" for line in plan.forward.summary()]
    lines += ["backward:"] + [f"  {line}" for line in plan.backward.summary()]
    lines.append("saved for the backward: " + (", ".join(n for n, _ in plan.saved) or "nothing")
                 + (f"; recomputed there: {', '.join(plan.recomputed)}" if plan.recomputed else ""))
    wrapped = []
    for line in lines:
        indent = " " * (len(line) - len(line.lstrip()))
        wrapped += textwrap.wrap(line, PLAN_WIDTH, initial_indent=indent, subsequent_indent=indent + "    ",
                                 break_long_words=False, break_on_hyphens=False)
    return wrapped


def render_triton(kernel: Kernel, plan: Plan) -> dict[str, str]:
    """``<name>_triton.py`` of a lowered kernel."""
    from .triton_backend import render_module

    body = render_module(kernel, plan, module_context(kernel, plan, "triton")).lstrip("\n")
    return {f"{kernel.name}_triton.py": codegen.header(kernel, "#", body, templates=TRITON_TEMPLATES,
                                                       backends=("triton",)) + body}


def plan_context(kernel: Kernel) -> dict:
    """The derivation documents' kernel plan section: the plan in words, or why there is none."""
    from .derivation import tex_text

    result = lowered(kernel)
    reason = result.reason.rstrip(".")
    return {"lines": plan_lines(result.plan) if result.plan else [], "reason": reason, "reason_tex": tex_text(reason)}


def module_context(kernel: Kernel, plan: Plan, backend: str) -> dict:
    layer = kernel.layer
    tensors = list(layer.tensors)
    floats = [k for k, v in layer.tensors.items() if isinstance(v, Tensor)]
    saved = [n for n, _ in plan.saved]
    computed = [s for s in kernel.saved if s not in layer.tensors]
    sizes = kernel.sizes
    constants = list(layer.constants)
    grads = [t.name for t, _ in plan.backward.outputs]
    returns = []
    for k, name in enumerate(layer.inputs):
        if name in layer.differentiable:
            returns.append(f"d{name}.view({name}.shape) if ctx.needs_input_grad[{k}] else None")
        else:
            returns.append("None")
    first = floats[0]
    return dict(
        title=f"``{layer.name}``: {(layer.doc.splitlines() or [layer.name])[0]}",
        backend_note={"cpp": "C++ with ATen's vectors and at::parallel_for",
                      "triton": "Triton"}[backend],
        plan_lines=plan_lines(plan),
        staged=isinstance(plan.forward, Staged),  # matrix products and loop programs (stages.py)
        class_name=codegen.class_name(layer.name).replace("Function", f"{backend.capitalize()}Function"),
        name=layer.name,
        signature=codegen._signature(layer),
        size_sources=kernel.size_sources,
        labels=[k for k, v in layer.tensors.items() if isinstance(v, Labels)],
        tensor_inputs=tensors,
        native_forward_args=", ".join(tensors + constants + sizes),
        tensor_args="".join(f"{t}, " for t in tensors),
        sizes_tuple=_tuple(sizes),
        sizes_unpack=_tuple(sizes),
        constants_all=constants,
        # sizes as the module names them (``h_size`` where an input is ``h``: forward.size_names)
        output_shape=_shape_text(tuple(size_names(kernel.graph).get(s, s) for s in kernel.graph.output.shape)),
        grad_output=f"d{kernel.output}",
        all_unpack=_tuple(tensors + saved),
        saved_results=", ".join(_saved_results(saved, kernel.graph.output.name)),
        eager_saved_tuple=_tuple(computed),
        eager_forward_args=", ".join(list(layer.inputs) + sizes),
        eager_backward_args=", ".join([f"d{kernel.output}"] + kernel.saved + sizes + kernel.constants_used),
        native_backward_args=", ".join([f"d{kernel.output}.contiguous()"] + tensors + saved + constants + sizes),
        grad_unpack=_tuple(grads),
        returns=", ".join(returns),
        native_condition=f"{first}.device.type == \"cpu\" and {first}.dtype in (torch.float32, torch.float64)",
        native_condition_triton=(f"({first}.device.type == \"cuda\" or _os.environ.get(\"TRITON_INTERPRET\") == \"1\") "
                                 f"and {first}.dtype in (torch.float32, torch.float64)"),
        doc=layer.doc or layer.name,
        call_args=", ".join(layer.inputs),
    )


def _saved_results(saved: list[str], output: str) -> list[str]:
    """Where each saved value is among the native forward's results: the output first, then the
    saved values other than it, in order."""
    others = [n for n in saved if n != output]
    return ["_results[0]" if n == output else f"_results[{1 + others.index(n)}]" for n in saved]


def render_cpp(kernel: Kernel, plan: Plan) -> dict[str, str]:
    """``native/<name>.cpp`` and ``<name>_cpp.py`` of a lowered kernel."""
    from .cpp import render_source

    source = render_source(plan, kernel)
    cpp = codegen.header(kernel, "//", source, templates=["native_kernel.cpp.j2"], backends=("cpp",)) + source
    body = environment().get_template("native_module.py.j2").render(header="", **module_context(kernel, plan, "cpp"))
    body = body.lstrip("\n")
    module = codegen.header(kernel, "#", body, templates=CPP_TEMPLATES, backends=("cpp",)) + body
    return {f"native/{kernel.name}.cpp": cpp, f"{kernel.name}_cpp.py": module}




def check_module(layer, module, backend: str) -> str:
    """A native module against its spec: the comparison with autograd (float64, the sizes the eager
    modules are compared at) and the numerical battery, single-threaded. Its verdict in words:
    ``battery passed ...`` or what failed."""
    import warnings

    import torch

    from . import battery
    from .verify import against_autograd

    if backend == "triton" and getattr(module, "triton", None) is None:
        return "triton is not installed here"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        built = module.native_module() if backend == "cpp" else True
    if built is None:
        why = next((str(w.message) for w in caught), "the extension could not be built")
        return f"it cannot be built here ({why})"
    fn = getattr(module, layer.name)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            if backend == "triton":  # the interpreter's NumPy warns of the overflows the battery draws on purpose
                warnings.simplefilter("ignore", RuntimeWarning)
            sizes = {d: 5 + 2 * k for k, d in enumerate(layer.dims)}
            for row in against_autograd(layer, fn, sizes):
                if not row.approximate:
                    return f"its {row.name} differs from autograd of the spec by {row.maxdiff:.3e} (float64)"
            sizes = battery.battery_sizes(layer)
            if backend == "triton" and len(layer.dims) > 2 and not getattr(module, "_STAGED", False):
                # the interpreter runs a row at a time: as many rows (the outer axes flattened) as a
                # layer of two axes has, the first axis made shorter (a staged plan's loops run over
                # the rows of one axis: its sizes are the C++ kernel's)
                middle = math.prod(sizes[d] for d in layer.dims[1:-1])
                sizes[layer.dims[0]] = max(8, sizes[layer.dims[0]] // middle)
            verdict = battery.run(layer, fn, sizes, draws=battery.settings(layer, sizes))
    finally:
        torch.set_num_threads(threads)
    return verdict.summary()


__all__ = ["BACKENDS", "Lowered", "lowered", "render_cpp", "output_names", "plan_lines", "check_module"]
