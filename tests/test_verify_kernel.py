"""`derive verify LAYER --kernel FILE.py:NAME [--dtype float32]`: a hand-written kernel held against
autograd of its spec, for CI. The verdict is the exit status: 0 when the output and every gradient
match at each size (and, in float64, gradcheck passes), 1 when one differs or the kernel raises, 2
for a bad argument."""
from pathlib import Path

import pytest

from derive.cli import main

SPECS = Path(__file__).parent / "specs" / "unseen_layers.py"

KERNELS = '''
import torch


def batchnorm(x, gamma, beta, eps=1e-5):
    """Bessel-corrected batchnorm in torch ops (autograd differentiates it)."""
    return gamma * (x - x.mean(0, keepdim=True)) / torch.sqrt(x.var(0, keepdim=True) + eps) + beta


class _BiasedBackward(torch.autograd.Function):
    """The right forward, and a hand-written backward that forgets Bessel's n/(n - 1)."""

    @staticmethod
    def forward(ctx, x, gamma, beta, eps):
        xhat = (x - x.mean(0)) / torch.sqrt(x.var(0) + eps)
        ctx.save_for_backward(xhat, gamma, torch.sqrt(x.var(0) + eps))
        return gamma * xhat + beta

    @staticmethod
    def backward(ctx, dy):
        xhat, gamma, std = ctx.saved_tensors
        n = dy.shape[0]
        dx = gamma / std / n * (n * dy - dy.sum(0) - xhat * (dy * xhat).sum(0))
        return dx, (dy * xhat).sum(0), dy.sum(0), None


def batchnorm_wrong_backward(x, gamma, beta, eps=1e-5):
    return _BiasedBackward.apply(x, gamma, beta, eps)


class BatchnormFunction(torch.autograd.Function):
    """Bessel-corrected batchnorm with a hand-written backward, used as ``BatchnormFunction.apply``."""

    @staticmethod
    def forward(ctx, x, gamma, beta, eps):
        std = torch.sqrt(x.var(0) + eps)
        xhat = (x - x.mean(0)) / std
        ctx.save_for_backward(xhat, gamma, std)
        return gamma * xhat + beta

    @staticmethod
    def backward(ctx, dy):
        xhat, gamma, std = ctx.saved_tensors
        n = dy.shape[0]
        dx = gamma / std / n * (n * dy - dy.sum(0) - n / (n - 1) * xhat * (dy * xhat).sum(0))
        return dx, (dy * xhat).sum(0), dy.sum(0), None


class _Nudged(torch.autograd.Function):
    """The identity, whose backward is off by one part in 10,000."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * (1 + 1e-4)


def batchnorm_nudged(x, gamma, beta, eps=1e-5):
    return batchnorm(_Nudged.apply(x), gamma, beta, eps)


def batchnorm_positional_only(x, g, b):
    return x


def layernorm(x, gamma, beta, eps=1e-5):
    return torch.nn.functional.layer_norm(x, x.shape[1:], gamma, beta, eps)


def cross_entropy_ignore(logits, y, ignore_index=0):
    return torch.nn.functional.cross_entropy(logits, y, ignore_index=ignore_index)


def logcosh(pred, target):
    d = pred - target
    return (d + torch.nn.functional.softplus(-2 * d) - torch.log(torch.tensor(2.0, dtype=d.dtype))).mean()
'''


@pytest.fixture
def kernels(tmp_path) -> Path:
    path = tmp_path / "kernels.py"
    path.write_text(KERNELS)
    return path


def test_a_correct_kernel_matches_at_every_size_and_passes_gradcheck(kernels, capsys):
    assert main(["verify", "batchnorm", "--kernel", f"{kernels}:batchnorm"]) == 0
    out = capsys.readouterr().out
    assert "float64, sizes n=32, d=64:" in out and "float64, sizes n=5, d=3:" in out
    for name in ("output", "dx", "dgamma", "dbeta"):
        assert out.count(f"{name} ") == 2  # one row per size
    assert "approximate: False" not in out
    assert "gradcheck (float64): passed (n=3, d=2)" in out
    assert out.rstrip().endswith("matches the spec")


def test_a_wrong_backward_fails_naming_the_gradient(kernels, capsys):
    """The forward is right (its row passes); dx differs from the spec and from finite differences."""
    assert main(["verify", "batchnorm", "--kernel", f"{kernels}:batchnorm_wrong_backward"]) == 1
    captured = capsys.readouterr()
    assert "FAIL: dx differs from autograd of the spec at n=32, d=64" in captured.err
    assert "FAIL: dx differs from autograd of the spec at n=5, d=3" in captured.err
    assert "FAIL: output" not in captured.err and "FAIL: dgamma" not in captured.err
    assert "FAIL: gradcheck failed: the backward disagrees with finite differences" in captured.err
    assert "failure(s)" in captured.out


def test_an_autograd_function_class_is_called_through_apply_in_the_specs_order(kernels, capsys):
    assert main(["verify", "batchnorm", "--kernel", f"{kernels}:BatchnormFunction"]) == 0, capsys.readouterr()
    assert "gradcheck (float64): passed" in capsys.readouterr().out


def test_a_kernel_that_raises_is_a_failure_that_names_the_error(kernels, capsys):
    assert main(["verify", "batchnorm", "--kernel", f"{kernels}:batchnorm_positional_only"]) == 1
    captured = capsys.readouterr()
    assert "the kernel raised TypeError:" in captured.out and "unexpected keyword argument" in captured.out
    assert "gradcheck failed: TypeError" in captured.err


def test_a_kernel_for_a_layer_from_a_spec_file(kernels, capsys):
    assert main(["verify", "--layer", f"{SPECS}:logcosh", "--kernel", f"{kernels}:logcosh"]) == 0
    out = capsys.readouterr().out
    assert "layer logcosh" in out and "dpred" in out and "dtarget" not in out  # target is not differentiable


def test_float32_holds_each_error_against_autograds_own(kernels, capsys):
    """A correct float32 kernel rounds differently from autograd and passes; a backward off by one
    part in 10,000 fails (in float64 too), and gradcheck, which needs float64, is said not to run."""
    assert main(["verify", "batchnorm", "--kernel", f"{kernels}:batchnorm", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert "float32, sizes n=32, d=64:" in out and "within: False" not in out
    assert "gradcheck (float64): not run" in out
    for dtype in ("float32", "float64"):
        assert main(["verify", "batchnorm", "--kernel", f"{kernels}:batchnorm_nudged", "--dtype", dtype]) == 1
        err = capsys.readouterr().err
        assert "FAIL: dx differs" in err and "FAIL: output" not in err and "FAIL: dgamma" not in err


@pytest.mark.parametrize("layer", ["layernorm", "cross_entropy_ignore"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_torchs_own_ops_match_the_specs(kernels, capsys, layer, dtype):
    """``F.layer_norm`` and ``F.cross_entropy(..., ignore_index=...)`` are other algorithms than the
    specs (constants such as ``eps`` and ``ignore_index`` are passed by name): they must pass."""
    assert main(["verify", layer, "--kernel", f"{kernels}:{layer}", "--dtype", dtype]) == 0, capsys.readouterr()


def test_float32_names_the_wrong_gradient(kernels, capsys):
    assert main(["verify", "batchnorm", "--kernel", f"{kernels}:batchnorm_wrong_backward", "--dtype", "float32"]) == 1
    err = capsys.readouterr().err
    assert "FAIL: dx differs from autograd of the spec at n=32, d=64 (error " in err and "FAIL: output" not in err


@pytest.mark.parametrize("argument, names, message", [
    ("{k}:missing", ["batchnorm"], "has no function 'missing' (it defines BatchnormFunction, batchnorm, batchnorm_nudged, "
                                   "batchnorm_positional_only, batchnorm_wrong_backward, cross_entropy_ignore, "
                                   "layernorm, logcosh)"),
    ("{k}", ["batchnorm"], "expected FILE.py:NAME"),
    ("nowhere.py:batchnorm", ["batchnorm"], "no such file 'nowhere.py'"),
    ("{k}:batchnorm", [], "name the one layer it implements"),
    ("{k}:batchnorm", ["batchnorm", "tanh"], "2 layers were selected"),
])
def test_bad_arguments_say_what_to_pass(kernels, capsys, argument, names, message):
    assert main(["verify", *names, "--kernel", argument.format(k=kernels)]) == 2
    assert message in capsys.readouterr().err


def test_a_nan_where_autograd_of_the_spec_has_one_is_a_match():
    """A spec undefined at a draw (``sqrt`` of a weighted variance with a negative weight) is NaN
    there under autograd too: the generated code matching it is right, and ``derive generate`` must
    not call that a bug of its printer. A NaN on one side only is an infinite difference."""
    import torch

    from derive.verify import compare

    nan = float("nan")
    same = compare("dw", torch.tensor([nan, 1.0, 2.0]), torch.tensor([nan, 1.0, 2.0]))
    assert same.exact and same.approximate and same.maxdiff == 0.0
    one_sided = compare("dw", torch.tensor([nan, 1.0]), torch.tensor([0.5, 1.0]))
    assert not one_sided.approximate and one_sided.maxdiff == float("inf")
    off = compare("dw", torch.tensor([nan, 1.0]), torch.tensor([nan, 1.5]))
    assert not off.exact and not off.approximate and off.maxdiff == 0.5
