"""derive as a package: the sdist builds a wheel, the wheel installs into a fresh virtual environment,
and there, in a folder unrelated to any checkout, ``derive new``, ``generate --layer``, ``check``
and ``verify`` work and the generated kernel imports.

Offline and quick: the sdist and the wheel are built with the setuptools already installed (no
build isolation), and the fresh environment sees torch, sympy, jinja2 and numpy of the test's own
environment through a path file (a folder of links to them, derive's own left out), so pip
resolves derive's dependencies as installed and copies only derive in (``--no-index``).
"""
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGED = ["derive", "templates", "pyproject.toml", "setup.py", "MANIFEST.in", "README.md"]


def _run(args, cwd, env=None, timeout=300) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                            env=env or os.environ)
    assert result.returncode == 0, f"{args}:\n{result.stdout}\n{result.stderr}"
    return result


def _build(hook: str, source: Path, dist: Path) -> Path:
    script = f"import sys; from setuptools import build_meta; print(build_meta.{hook}(sys.argv[1]))"
    name = _run([sys.executable, "-c", script, dist], cwd=source).stdout.strip().splitlines()[-1]
    return dist / name


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(the fresh environment's bin folder, an environment to run it in, the wheel)."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    source.mkdir()
    for name in PACKAGED:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy(ROOT / name, source / name)
    dist = tmp / "dist"
    sdist = _build("build_sdist", source, dist)
    with tarfile.open(sdist) as archive:
        archive.extractall(tmp / "unpacked", filter="data")
    unpacked = next((tmp / "unpacked").iterdir())
    wheel = _build("build_wheel", unpacked, dist)  # the wheel is built from the sdist: the sdist is complete

    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp)
    python = venv / "bin" / "python"
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp).stdout.strip())
    links = tmp / "dependencies"
    links.mkdir()
    ours = ("derive", "__editable__", "_derive")
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not entry.name.startswith(ours) and not entry.name.endswith(".pth"):
            (links / entry.name).symlink_to(entry)
    (site / "dependencies.pth").write_text(f"{links}\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}"
    _run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-index", "--find-links", dist,
          "derive"], cwd=tmp, env=env)
    return venv / "bin", env, wheel


def test_the_wheel_carries_the_templates(installed):
    import zipfile
    _, _, wheel = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    for template in sorted((ROOT / "templates").glob("*.j2")):
        assert f"derive/templates/{template.name}" in names


def test_installed_derive_works_in_an_unrelated_folder(installed, tmp_path):
    bin_, env, _ = installed
    user = tmp_path / "project"
    user.mkdir()
    (user / "notes.txt").write_text("the user's own file\n")

    def derive(*args):
        return _run([bin_ / "derive", *args], cwd=user, env=env)

    where = _run([bin_ / "python", "-c", "import derive, derive.templating as t; print(derive.__file__); print(t.TEMPLATES)"],
                 cwd=user, env=env).stdout.split()
    assert all(str(ROOT) not in line and "site-packages" in line for line in where), where  # not the checkout's
    assert "usage: derive" in _run([bin_ / "python", "-m", "derive", "--help"], cwd=user, env=env).stdout

    derive("new", "my_norm", "--out", "mylayers")
    spec = (user / "mylayers" / "my_norm.py").read_text()
    generated = derive("generate", "--layer", "mylayers/my_norm.py", "--out", "mylayers/generated")
    assert "proven at" in generated.stdout
    assert (user / "mylayers" / "my_norm.py").read_text() == spec and (user / "notes.txt").read_text() == "the user's own file\n"
    assert "is up to date" in derive("check", "--layer", "mylayers/my_norm.py", "--out", "mylayers/generated").stdout
    verified = derive("verify", "--layer", "mylayers/my_norm.py", "--out", "mylayers/generated")
    assert "fused kernel vs autograd of the spec, float32, sizes n=32, d=64" in verified.stdout
    use = ("import torch; from mylayers.generated.my_norm import my_norm; "
           "x = torch.randn(5, 4, requires_grad=True); my_norm(x, torch.ones(4)).sum().backward(); "
           "print(bool(torch.isfinite(x.grad).all()))")
    assert _run([bin_ / "python", "-c", use], cwd=user, env=env).stdout.strip() == "True"
