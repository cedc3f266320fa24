"""Bad specs get errors that name the layer, the operation, the line and the fix."""
import re
import tempfile
from pathlib import Path

import pytest
import torch

from derive.errors import DerivationError, SpecError, TraceError
from derive.codegen import render_function
from derive.kernel import build
from derive.spec import Constant, Labels, Tensor, layer
from derive.verify import load_module


def test_undeclared_parameter():
    with pytest.raises(SpecError, match=r"test_spec_errors.py: layer 'f' \(line \d+: @layer\(x=Tensor\(\"n\", \"d\"\)\)\): "
                                        r"parameter 'w' is not declared.*Fix: add w="):
        @layer(x=Tensor("n", "d"))
        def f(x, w):
            return x * w


def test_misspelled_declaration():
    with pytest.raises(SpecError, match=r"declared input 'X' is not a parameter.*did you mean 'x'"):
        @layer(X=Tensor("n", "d"))
        def f(x):
            return x


def test_reserved_name():
    with pytest.raises(SpecError, match=r"input name 'ctx' clashes"):
        @layer(ctx=Tensor("n"))
        def f(ctx):
            return ctx


def test_unsupported_torch_function_names_line_and_alternatives():
    @layer(x=Tensor("n", "d"))
    def uses_sort(x):
        s = torch.sort(x, 1).values
        return s

    with pytest.raises(TraceError, match=r"layer 'uses_sort' \(line \d+: s = torch.sort\(x, 1\).values\): "
                                         r"torch.sort is not supported.*supported primitives"):
        build(uses_sort)


def test_data_dependent_control_flow():
    @layer(x=Tensor("n", "d"))
    def branches(x):
        s = x.sum()
        if s > 0:
            return x
        return -x

    with pytest.raises(TraceError, match=r"branches.*if s > 0.*decides Python control flow"):
        build(branches)


def test_in_place_mutation():
    @layer(x=Tensor("n", "d"))
    def mutates(x):
        x[0] = 1.0
        return x

    with pytest.raises(TraceError, match=r"mutates.*in-place assignment"):
        build(mutates)


def test_shapes_that_cannot_broadcast():
    @layer(x=Tensor("n", "d"), w=Tensor("k"))
    def mismatch(x, w):
        return x * w

    with pytest.raises(TraceError, match=r"mismatch.*'mul' cannot broadcast shapes \(n, d\) and \(k,\)"):
        build(mismatch)


def test_arithmetic_on_labels():
    @layer(x=Tensor("n", "k"), y=Labels("n", classes="k"))
    def label_math(x, y):
        return x.sum(1) * y

    with pytest.raises(TraceError, match=r"label_math.*arithmetic 'mul' on integer labels"):
        build(label_math)


def test_a_spec_still_runs_on_real_tensors():
    @layer(x=Tensor("n", "d"), eps=Constant(0.5))
    def shifted(x, eps=0.5):
        return (x + eps).exp()

    assert torch.allclose(shifted(torch.zeros(2, 2)), torch.full((2, 2), 0.5).exp())


def test_intermediate_named_like_generated_code():
    @layer(x=Tensor("n", "d"))
    def shadows(x):
        needs = x.exp()
        return needs * x

    with pytest.raises(TraceError, match=r"shadows.*line \d+: needs = x.exp\(\).*'needs' has a name the generated code"):
        build(shadows)


def test_unknown_domain_is_refused_with_the_domains():
    with pytest.raises(SpecError, match=r"domain 'prob'.*'probability'"):
        @layer(x=Tensor("n", "d", domain="prob"))
        def with_domain(x):
            return x.exp()


# -- errors at the spec's own line instead of a traceback from inside the tracer or SymPy --------------
def _trace_error(spec) -> str:
    with pytest.raises(TraceError) as caught:
        build(spec)
    return str(caught.value)


def test_a_misspelled_input_in_the_body_names_the_line_and_the_declared_inputs():
    @layer(x=Tensor("n", "d"), gamma=Tensor("d"))
    def misspelled(x, gamma):
        out = x * gama  # noqa: F821
        return out

    message = _trace_error(misspelled)
    assert re.search(r"layer 'misspelled' \(line \d+: out = x \* gama.*NameError.*did you mean 'gamma'", message)


def test_an_axis_the_declaration_does_not_have():
    @layer(x=Tensor("n", "d"))
    def rank_three(x):
        c = x.shape[2]
        out = x * c
        return out

    message = _trace_error(rank_three)
    assert re.search(r"rank_three.*line \d+: c = x.shape\[2\].*IndexError.*declared shapes \(x: \(n, d\)\)", message)


@pytest.mark.parametrize("body, problem", [
    ("x.add_(1.0)", r"in-place operation \.add_\(\.\.\.\).*out-of-place form"),
    ("x.mul_(x)", r"in-place operation \.mul_\(\.\.\.\)"),
])
def test_in_place_methods(body, problem):
    spec = _one_line_spec(f"    {body}\n    out = x * 2.0\n")
    assert re.search(rf"layer 'one_line' \(line \d+: {re.escape(body)}\): {problem}", _trace_error(spec))


def test_in_place_operator_on_an_input():
    @layer(x=Tensor("n", "d"))
    def augmented(x):
        x += 1.0
        return x

    assert re.search(r"augmented.*line \d+: x \+= 1.0.*in-place operation.*a = a \+ b", _trace_error(augmented))


@pytest.mark.parametrize("line", ["s = float(x.sum())", "s = x.sum().item()", "s = len(x)"])
def test_reading_a_tensor_value_as_a_number(line):
    spec = _one_line_spec(f"    {line}\n    out = x * s\n")
    assert re.search(rf"line \d+: {re.escape(line)}\): a tensor's value is read as a Python number.*x.shape",
                     _trace_error(spec))


def test_a_python_loop_over_rows():
    spec = _one_line_spec("    out = sum(row for row in x)\n")
    assert re.search(r"line \d+: out = sum\(row for row in x\)\): a Python loop.*x.sum\(0\)", _trace_error(spec))


def test_a_constant_used_like_a_tensor():
    @layer(x=Tensor("n", "d"), eps=Constant(0.1))
    def constant_method(x, eps=0.1):
        out = eps.exp() * x
        return out

    assert re.search(r"constant_method.*line \d+: out = eps.exp\(\) \* x.*Constant is a symbol.*x \* eps",
                     _trace_error(constant_method))


def test_division_by_the_number_zero():
    spec = _one_line_spec("    out = x / 0\n")
    assert re.search(r"line \d+: out = x / 0\): division by the number 0", _trace_error(spec))


def test_picking_with_a_float_tensor_says_to_declare_labels():
    @layer(x=Tensor("n", "k"), y=Tensor("n"))
    def float_labels(x, y):
        n = x.shape[0]
        out = x[range(n), y]
        return out

    assert re.search(r"float_labels.*line \d+: out = x\[range\(n\), y\]\): indexing with 'y', which is declared as "
                     r"a floating-point Tensor. Fix: declare the indices as Labels", _trace_error(float_labels))


def test_unsupported_indexing_is_described_as_written():
    spec = _one_line_spec("    out = x[0]\n")
    message = _trace_error(spec)
    assert re.search(r"line \d+: out = x\[0\]\): indexing with 0\. Fix: the supported indexing is picking", message)


def test_returning_an_input_unchanged():
    @layer(x=Tensor("n", "d"))
    def identity(x):
        return x

    assert "layer 'identity': the forward returns its input 'x' unchanged" in _trace_error(identity)


@pytest.mark.parametrize("name", ["dx", "dout"])
def test_a_variable_named_like_a_gradient_of_the_generated_backward(name):
    # generated code names the gradient of every tensor d<name>: a spec variable dx would be overwritten
    spec = _one_line_spec(f"    {name} = x.exp()\n    out = {name} * x\n")
    assert re.search(rf"line \d+: {name} = x.exp\(\)\): the variable '{name}' has the name of the gradient of "
                     rf"'{name[1:]}'.*Fix: rename '{name}'", _trace_error(spec))


@pytest.mark.parametrize("name", ["torch", "forward", "backward", "F", "_private"])
def test_a_layer_named_like_its_generated_module_uses(name):
    namespace = {}
    with pytest.raises(SpecError, match=rf"layer '{name}' \(line 1\): the layer's name '{name}' clashes with a name its generated "
                                        r"module uses. Fix: rename the function"):
        exec(f"@layer(x=Tensor('n', 'd'))\ndef {name}(x):\n    return x * 2.0\n", {"layer": layer, "Tensor": Tensor}, namespace)


@pytest.mark.parametrize("name", ["t1", "t2", "shared0", "sum_dout_x", "sum_x", "out"])
def test_variables_named_like_the_printers_temporaries_still_derive_correctly(name, tmp_path):
    # the printer names its own temporaries t<k>, shared<k>, sum_<tensors>: it must step around the spec's
    from derive.generate import render
    from derive.verify import against_autograd, load_module
    spec = _one_line_spec(f"    {name} = x.exp()\n    m = (x * {name}).sum(0, keepdim=True)\n    res = {name} * m * 2.0\n"
                          f"    return res\n", ret=False)
    for rel, text in render(spec).items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    for module in ("one_line", "one_line_steps"):
        fn = getattr(load_module(tmp_path / f"{module}.py"), "one_line")
        rows = against_autograd(spec, fn, {"n": 4, "d": 3})
        assert max(r.maxdiff for r in rows) < 1e-10, (module, rows)


def test_a_gradient_through_max_is_the_one_hot_of_its_position(tmp_path):
    # the max does not cancel here (no softmax): the gradient reaches only the maximum's entry
    @layer(x=Tensor("n", "d"), w=Tensor("d"))
    def through_max(x, w):
        m = x.max(1, keepdim=True).values
        out = torch.tanh(m) * x + w.max(0, keepdim=True).values
        return out

    code = render_function(build(through_max))
    assert "x.argmax(1, keepdim=True)" in code and "(w.view(1, d)).argmax(1, keepdim=True)" in code
    path = tmp_path / "through_max.py"
    path.write_text(code)
    fn = getattr(load_module(path), "through_max")
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(5, 4, dtype=torch.float64)
    ours = torch.autograd.grad(fn(x, w), (x, w), upstream)
    reference = torch.autograd.grad(through_max.fn(x, w), (x, w), upstream)
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b)
    assert int((ours[1] != 0).sum()) == 1  # w's maximum alone receives the gradient


def test_an_input_the_output_does_not_read_gets_a_zero_gradient(tmp_path):
    # the softmax's shift cancels from probs.sum(): x's gradient is zero, computed, as autograd's is;
    # the output ignores w: no gradient at all, as autograd gives none
    @layer(x=Tensor("n", "d"), w=Tensor("d"))
    def ignores_w(x, w):
        m = x.max(1, keepdim=True).values
        e = (x - m).exp()
        probs = e / e.sum(1, keepdim=True)
        out = probs.sum()
        return out

    kernel = build(ignores_w)
    assert [f.code for f in kernel.formulas] == ["dout.new_zeros((n, d))", "None"]
    path = tmp_path / "ignores_w.py"
    path.write_text(render_function(kernel))
    fn = getattr(load_module(path), "ignores_w")
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, dtype=torch.float64, requires_grad=True)
    fn(x, w).backward()
    assert torch.equal(x.grad, torch.zeros(3, 4, dtype=torch.float64))
    assert w.grad is None


def test_a_refusal_from_the_printer_names_the_layer_and_the_line():
    # the printer knows only the tensor it could not print; the kernel adds the layer and the line
    # computing that tensor, or for an input the first line reading it
    from derive.kernel import located
    from derive.trace import trace

    @layer(x=Tensor("n", "k"), c=Tensor("1", "k"), y=Labels("n", classes="k"))
    def gathers(x, c, y):
        n = x.shape[0]
        t = x * c
        out = t[range(n), y].sum()
        return out

    graph = trace(gathers)
    for tensor in ("t", "x"):
        error = located(DerivationError("", "a problem", "a fix", tensor=tensor), graph)
        assert re.fullmatch(r"layer 'gathers' \(line \d+: t = x \* c\): a problem\. Fix: a fix\.", str(error)), str(error)


def test_a_pick_from_a_broadcast_row_is_a_gather_in_both_passes(tmp_path):
    @layer(x=Tensor("n", "k"), c=Tensor("1", "k"), y=Labels("n", classes="k"))
    def gathers(x, c, y):
        n = x.shape[0]
        t = x * c
        out = t[range(n), y].sum()
        return out

    kernel = build(gathers)
    assert "gather" in kernel.formulas[0].code and "gather" in "".join(code for code, _ in kernel.forward)
    path = tmp_path / "gathers.py"
    path.write_text(render_function(kernel))
    fn = getattr(load_module(path), "gathers")
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    c = torch.randn(1, 4, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 3, 1, 3, 2])
    ours = torch.autograd.grad(fn(x, c, y), (x, c))
    reference = torch.autograd.grad(gathers.fn(x, c, y), (x, c))
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b)


def test_torch_functions_called_with_keywords_trace():
    spec = _one_line_spec("    out = torch.exp(input=x)\n")
    assert build(spec).formulas[0].input == "x"


_SPEC_FILES = []
_FOLDER = tempfile.TemporaryDirectory(prefix="derive_spec_")  # goes when the run ends


def _one_line_spec(body: str, ret: bool = True):
    """``one_line(x: (n, d))`` with ``body`` (its lines indented), returning ``out``, loaded from a file
    of its own (so errors can quote its lines and generated headers can hash its source)."""
    from derive.layers import from_file
    folder = Path(tempfile.mkdtemp(dir=_FOLDER.name))
    _SPEC_FILES.append(folder)
    path = folder / f"one_line_{len(_SPEC_FILES)}.py"
    path.write_text("import torch\nfrom derive import Constant, Labels, Tensor, layer\n\n\n"
                    "@layer(x=Tensor('n', 'd'))\ndef one_line(x):\n" + body + ("    return out\n" if ret else ""))
    (spec,) = from_file(str(path))
    return spec


def test_an_infinite_fill_names_the_line_and_a_finite_fix():
    @layer(x=Tensor("n", "d"))
    def fills(x):
        out = x.masked_fill(x > 0, float("-inf")).exp()
        return out

    with pytest.raises(TraceError, match=r"line \d+: out = x.masked_fill.*infinite fill value.*large finite number"):
        build(fills)


def test_a_view_the_fused_engine_cannot_derive_names_the_line_and_the_construct():
    @layer(x=Tensor("n", "d"))
    def reads_across(x):  # x.reshape(d, n) is not a regrouping of (n, d): a row of it mixes rows of x
        n, d = x.shape
        xt = x.reshape(d, n)
        out = xt.exp().sum(0)
        return out

    with pytest.raises(DerivationError, match=r"layer 'reads_across' \(line \d+: xt = x.reshape\(d, n\)\): "
                                              r"a view to \(d, n\) whose sizes do not regroup"):
        build(reads_across)
