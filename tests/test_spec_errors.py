"""Bad specs get errors that name the layer, the operation, the line and the fix."""
import pytest
import torch

from derive.errors import SpecError, TraceError
from derive.kernel import build
from derive.spec import Constant, Labels, Tensor, layer


def test_undeclared_parameter():
    with pytest.raises(SpecError, match=r"layer 'f': parameter 'w' is not declared.*Fix: add w="):
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

    with pytest.raises(TraceError, match=r"branches.*if s > 0.*comparison of tensors"):
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


def test_intermediate_named_like_a_dimension():
    @layer(x=Tensor("n", "d"))
    def dim_clash(x):
        d = x.exp()
        return d * x

    with pytest.raises(TraceError, match=r"dim_clash.*'d' has the name of a dimension"):
        build(dim_clash)


def test_comparing_a_float_tensor_is_refused_with_the_label_mask_as_the_fix():
    @layer(x=Tensor("n", "d"))
    def compares(x):
        keep = x != 0
        return x * keep

    with pytest.raises(TraceError, match=r"layer 'compares' \(line \d+: keep = x != 0\): != on a float tensor.*"
                                         r"keep = y != ignore_index"):
        build(compares)


def test_clamp_with_an_upper_bound_is_refused():
    @layer(x=Tensor("n", "d"))
    def clamps(x):
        c = x.clamp(min=0.0, max=1.0)
        return c

    with pytest.raises(TraceError, match=r"layer 'clamps' \(line \d+: c = x.clamp\(min=0.0, max=1.0\)\): clamp"):
        build(clamps)
