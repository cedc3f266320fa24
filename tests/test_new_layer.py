"""The workflow for a layer the toolkit has never seen: ``derive new`` writes a spec that
generates as it stands; ``derive generate --layer FILE --out DIR`` writes its kernel, step-by-step
backward and derivations; editing the spec makes ``derive check`` fail until it is regenerated."""
import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from derive.layers import from_file
from derive.verify import against_autograd, load_module, random_inputs

ROOT = Path(__file__).resolve().parent.parent
UNSEEN = Path(__file__).resolve().parent / "specs" / "unseen_layers.py"


def derive(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "derive", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})


@pytest.fixture(scope="module")
def scaffolded(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mine")
    made = derive("new", "my_layer", "--out", folder)
    assert made.returncode == 0, made.stderr
    spec = folder / "my_layer.py"
    out = folder / "generated"
    generated = derive("generate", "--layer", spec, "--out", out)
    assert generated.returncode == 0, generated.stderr
    return spec, out, generated.stdout


def test_new_writes_a_spec_that_explains_the_contract(scaffolded):
    text = scaffolded[0].read_text()
    for word in ("Tensor(", "Labels(", "Constant(", "differentiable=False", "keepdim=True",
                 "derive generate --layer", "Supported operations"):
        assert word in text, word


def test_the_scaffold_generates_kernel_steps_and_derivations(scaffolded):
    spec, out, stdout = scaffolded
    for rel in ("my_layer.py", "my_layer_steps.py", "derivations/my_layer.tex", "derivations/my_layer.md",
                "derivations/my_layer_steps.tex", "derivations/my_layer_steps.md"):
        assert (out / rel).is_file(), rel
    assert "proven at" in stdout  # the fused formula was proven on small symbolic matrices


def test_the_scaffold_kernel_matches_autograd_and_gradcheck(scaffolded):
    spec, out, _ = scaffolded
    (layer,) = from_file(str(spec))
    fn = getattr(load_module(out / "my_layer.py"), "my_layer")
    assert list(inspect.signature(fn).parameters) == list(inspect.signature(layer.fn).parameters)
    rows = against_autograd(layer, fn, {"n": 7, "d": 5}, torch.float64, seed=1)
    assert max(r.maxdiff for r in rows) < 1e-10
    inputs = random_inputs(layer, {"n": 4, "d": 3}, torch.float64, seed=2)
    args = [v.requires_grad_() if k in layer.differentiable else v for k, v in inputs.items()]
    assert torch.autograd.gradcheck(fn, tuple(args))


def test_editing_the_spec_makes_check_fail_until_regenerated(scaffolded, tmp_path):
    spec, out, _ = scaffolded
    assert derive("check", "--layer", spec, "--out", out).returncode == 0
    changed = tmp_path / "my_layer.py"
    changed.write_text(spec.read_text().replace("squares = x**2", "squares = x**2 + x"))
    stale = derive("check", "--layer", changed, "--out", out)
    assert stale.returncode == 1 and "stale" in stale.stderr
    regen = tmp_path / "generated"
    assert derive("generate", "--no-prove", "--layer", changed, "--out", regen).returncode == 0
    (layer,) = from_file(str(changed))
    fn = getattr(load_module(regen / "my_layer.py"), "my_layer")
    rows = against_autograd(layer, fn, {"n": 6, "d": 4}, torch.float64, seed=3)
    assert max(r.maxdiff for r in rows) < 1e-10


def test_new_refuses_an_existing_file_and_a_bad_name(scaffolded):
    spec = scaffolded[0]
    again = derive("new", "my_layer", "--out", spec.parent)
    assert again.returncode == 2 and "already exists" in again.stderr and "--force" in again.stderr
    bad = derive("new", "my-layer", "--out", spec.parent)
    assert bad.returncode == 2 and "identifier" in bad.stderr


def test_file_colon_name_generates_one_layer(tmp_path):
    result = derive("generate", "--no-prove", "--layer", f"{UNSEEN}:l2_normalize", "--out", tmp_path)
    assert result.returncode == 0, result.stderr
    written = sorted(p.name for p in tmp_path.glob("*.py") if p.name != "__init__.py")
    assert written == ["l2_normalize.py", "l2_normalize_steps.py"]
