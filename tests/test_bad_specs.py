"""Every bad spec gets one line on stderr: the file, the line, what is wrong, the fix; exit status 2,
no traceback, and nothing written. Each case is a spec file as a user would write it, run through
``derive generate --layer FILE``."""
import re

import pytest

from derive.cli import main

HEADER = "import math\nimport sys\n\nimport numpy as np\nimport torch\n\nfrom derive import Constant, Labels, Tensor, layer\n\n\n"


def _spec(decorator: str, signature: str, body: str = "out = x * 2.0", name: str = "f") -> str:
    lines = "\n".join(f"    {line}" for line in body.splitlines())
    return f"@layer({decorator})\ndef {name}({signature}):\n{lines}\n    return out\n"


X = 'x=Tensor("n", "d")'
# (case, the spec file's text after HEADER, the text of the line the message must quote, what it must say)
CASES = [
    ("constant None", _spec(f"{X}, c=Constant(None)", "x, c=None"), "@layer", r"Constant 'c' has the default None, not a finite real number"),
    ("constant string", _spec(f'{X}, c=Constant("0.1")', 'x, c="0.1"'), "@layer", r"not a finite real number"),
    ("constant complex", _spec(f"{X}, c=Constant(1j)", "x, c=1j"), "@layer", r"not a finite real number"),
    ("constant tensor", _spec(f"{X}, c=Constant(torch.tensor(1.0))", "x, c=1.0"), "@layer", r"not a finite real number"),
    ("constant nan", _spec(f'{X}, c=Constant(float("nan"))', "x, c=0.0"), "@layer", r"not a finite real number"),
    ("constant inf", _spec(f"{X}, c=Constant(math.inf)", "x, c=0.0"), "@layer", r"not a finite real number"),
    ("constant named sizes", _spec(f"{X}, sizes=Constant(1.0)", "x, sizes=1.0"), "@layer", r"ctx\.sizes"),
    ("constant named saved_tensors", _spec(f"{X}, saved_tensors=Constant(1.0)", "x, saved_tensors=1.0"), "@layer",
     r"ctx\.saved_tensors"),
    ("constant named needs_input_grad", _spec(f"{X}, needs_input_grad=Constant(1.0)", "x, needs_input_grad=1.0"),
     "@layer", r"ctx\.needs_input_grad"),
    ("defaults disagree", _spec(f"{X}, c=Constant(2.0)", "x, c=5.0", "out = x * c"), "@layer",
     r"Constant 'c' defaults to 2\.0 in @layer but to 5\.0 in the function"),
    ("no default in the function", _spec(f"{X}, c=Constant(2.0)", "x, c", "out = x * c"), "@layer",
     r"Constant 'c' has no default in the function"),
    ("dimension torch", _spec('x=Tensor("torch", "d")', "x"), "@layer", r"dimension name 'torch' is a name the generated code uses"),
    ("dimension F", _spec('x=Tensor("n", "F")', "x"), "@layer", r"dimension name 'F'"),
    ("dimension class", _spec('x=Tensor("class", "d")', "x"), "@layer", r"dimension name 'class' is a Python keyword"),
    ("dimension lambda", _spec('x=Tensor("n", "lambda")', "x"), "@layer", r"dimension name 'lambda' is a Python keyword"),
    ("dimension named like a Constant", _spec('x=Tensor("n", "eps"), eps=Constant(0.1)', "x, eps=0.1"), "@layer",
     r"dimension name 'eps' is also the name of a Constant"),
    ("input grads", _spec('grads=Tensor("n", "d")', "grads", "out = grads * 2.0"), "@layer", r"input name 'grads' clashes"),
    ("input dict", _spec('dict=Tensor("n", "d")', "dict", "out = dict * 2.0"), "@layer", r"input name 'dict' clashes"),
    ("input tuple", _spec('tuple=Tensor("n", "d")', "tuple", "out = tuple * 2.0"), "@layer", r"input name 'tuple' clashes"),
    ("input forward", _spec('forward=Tensor("n", "d")', "forward", "out = forward * 2.0"), "@layer", r"input name 'forward'"),
    ("variable cache", _spec(X, "x", "cache = x * 2.0\nout = cache + 1.0"), "cache = x * 2.0", r"'cache' has a name the generated code uses"),
    ("variable dict", _spec(X, "x", "dict = x * 2.0\nout = dict + 1.0"), "dict = x * 2.0", r"'dict' has a name the generated code uses"),
    ("layer tuple", _spec(X, "x", name="tuple"), "@layer", r"the layer's name 'tuple' clashes"),
    ("layer InputError", _spec(X, "x", name="InputError"), "@layer", r"the layer's name 'InputError' clashes"),
    ("layer compile_kernels", _spec(X, "x", name="compile_kernels"), "@layer", r"the layer's name 'compile_kernels' clashes"),
    ("layer without parentheses", "@layer\ndef f(x):\n    out = x * 2.0\n    return out\n", "@layer",
     r"@layer is used without its declarations"),
    ("syntax error", _spec(X, "x", "out = x * (2.0"), "out = x * (2.0", r"SyntaxError"),
    ("indentation error", _spec(X, "x", "out = x * 2.0\n  out = out + 1.0"), "out = out + 1.0", r"IndentationError"),
    ("import error", "import not_a_module_of_anyone\n" + _spec(X, "x"), "import not_a_module_of_anyone",
     r"ModuleNotFoundError: No module named 'not_a_module_of_anyone'"),
    ("raises on load", "SCALE = 1 / 0\n" + _spec(X, "x"), "SCALE = 1 / 0", r"the file raised ZeroDivisionError while it loads"),
    ("exits on load", "sys.exit(3)\n" + _spec(X, "x"), "sys.exit(3)", r"the file calls sys\.exit\(3\) while it loads"),
    ("numpy function", _spec(X, "x", "out = np.exp(x)"), "out = np.exp(x)", r"numpy's exp on a tensor.*torch\.exp"),
    ("control flow on a size", _spec(X, "x", "n = x.shape[0]\nif n >= 2000000:\n    out = x * 2.0\nelse:\n    out = x * 3.0"),
     "if n >= 2000000:", r"Python control flow on a size \(n >= 2000000\)"),
    ("two sizes compared", _spec(X, "x", "n, d = x.shape\nout = x * 2.0 if n == d else x * 3.0"),
     "out = x * 2.0 if n == d", r"Python control flow on a size \(n == d\)"),
    ("a size expression compared", _spec(X, "x", "n = x.shape[0]\nout = x * 2.0 if n - 1 > 0 else x"),
     "out = x * 2.0 if n - 1 > 0", r"control flow on a size"),
    ("exits while traced", _spec(X, "x", "sys.exit(4)\nout = x"), "sys.exit(4)", r"SystemExit"),
    ("labels with a bad class count", _spec('x=Tensor("n", "k"), y=Labels("n", classes=3)', "x, y",
                                            "out = x * 2.0"), "@layer", r"classes=3"),
]


@pytest.mark.parametrize("case, text, quoted, problem", CASES, ids=[c[0] for c in CASES])
def test_a_bad_spec_gets_one_line(tmp_path, capsys, case, text, quoted, problem):
    spec = tmp_path / "bad_spec.py"
    spec.write_text(HEADER + text)
    out = tmp_path / "out"
    status = main(["generate", "--no-prove", "--layer", str(spec), "--out", str(out)])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert status == 2, (case, captured)
    assert len(lines) == 1, (case, captured.err)
    line = lines[0]
    number = next(k + 1 for k, source in enumerate(spec.read_text().splitlines()) if source.strip().startswith(quoted))
    assert line.startswith(f"derive: {spec}"), line
    assert re.search(rf"\(line {number}: {re.escape(quoted)}", line), line
    assert re.search(problem, line), line
    assert re.search(r"\. Fix: .+\.$", line), line
    assert "Traceback" not in captured.err and "report this as a bug" not in line
    assert not out.exists(), f"{case}: a refused spec wrote {sorted(out.rglob('*'))}"


GOOD = [
    ("a size comparison true at every size", _spec(X, "x", "n = x.shape[0]\nout = x * 2.0 if n >= 1 else x")),
    ("a helper module beside the spec", "import helper_beside\n" + _spec(X, "x", "out = helper_beside.twice(x)")),
    ("an integer constant", _spec(f"{X}, c=Constant(2)", "x, c=2", "out = x * c")),
    ("a constant whose function default is the same number", _spec(f"{X}, c=Constant(2.0)", "x, c=2", "out = x * c")),
    ("a dimension named like an input (its size's variable is renamed)", _spec('x=Tensor("x", "d")', "x", "out = x * 2.0")),
    ("variables named like builtins generated code does not use", _spec(X, "x", "input = x * 2.0\nmax_ = input + 1.0\nout = max_")),
    # names the generated module's helper functions use inside their own scopes, never beside a spec's
    ("inputs and values named like locals of helper functions",
     _spec('labels=Tensor("n", "d"), values=Tensor("n", "d")', "labels, values",
           "output = labels * values\ntangent = output + 1.0\nout = tangent * 2.0")),
]


@pytest.mark.parametrize("case, text", GOOD, ids=[c[0] for c in GOOD])
def test_specs_near_the_bad_ones_generate(tmp_path, capsys, case, text):
    """The refusals are no wider than the problems: specs next to them generate and import."""
    (tmp_path / "helper_beside.py").write_text("def twice(x):\n    return x * 2.0\n")
    spec = tmp_path / "good_spec.py"
    spec.write_text(HEADER + text)
    out = tmp_path / "out"
    status = main(["generate", "--no-prove", "--layer", str(spec), "--out", str(out)])
    captured = capsys.readouterr()
    assert status == 0, (case, captured.err)
    assert (out / "f.py").is_file() and (out / "f_steps.py").is_file()


def test_a_constant_whose_defaults_disagree_would_have_changed_the_result(tmp_path):
    """Why the defaults must agree: the generated f(x) takes the declared default, the spec its own."""
    text = HEADER + _spec(f"{X}, c=Constant(2.0)", "x, c=5.0", "out = x * c")
    namespace = {}
    with pytest.raises(Exception, match=r"Constant 'c' defaults to 2\.0 in @layer but to 5\.0 in the function"):
        exec(compile(text, str(tmp_path / "s.py"), "exec"), namespace)


def test_a_missing_spec_file_and_a_missing_layer_name(tmp_path, capsys):
    assert main(["generate", "--layer", str(tmp_path / "nope.py"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no such file" in err[0] and "Fix:" in err[0]
    spec = tmp_path / "one.py"
    spec.write_text(HEADER + _spec(X, "x"))
    assert main(["generate", "--layer", f"{spec}:g", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{spec}: layer 'g': no @layer spec found named 'g'" in err[0]
    assert not (tmp_path / "o").exists()


def test_check_and_verify_give_the_same_one_line(tmp_path, capsys):
    spec = tmp_path / "bad.py"
    spec.write_text(HEADER + _spec(X, "x", "out = np.exp(x)"))
    for command in ("check", "verify"):
        assert main([command, "--layer", str(spec), "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "numpy's exp on a tensor" in err[0] and str(spec) in err[0], err
