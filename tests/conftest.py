"""Helpers shared by the tests."""

import os
from pathlib import Path

collect_ignore = ["mathjax"]  # MathJax's npm packages (tests/mathjax/node_modules), not tests

# the native kernels' extension (generated/native) is built once per clone, in its build folder: a
# cold build on a clean clone is part of the suite, never hidden by a cache another checkout filled
os.environ.setdefault("DERIVE_NATIVE_CACHE", str(Path(__file__).resolve().parent.parent / "build" / "native"))


def assert_math_blocks_balanced(text: str) -> None:
    """Every display opens with ```math on a line of its own and is closed by ``` on a line of its
    own; no $$ display (GitHub's parser alters what is inside it)."""
    assert "$$" not in text
    inside = False
    for line in text.splitlines():
        if line.startswith("```"):
            inside = not inside if line in ("```", "```math") or not inside else inside
        elif inside:
            continue
    assert not inside, "a ``` block is never closed"


# -- compiling the derivation documents, once per test session -------------------------------------
import fcntl  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402

import pytest  # noqa: E402

DERIVATIONS = Path(__file__).resolve().parent.parent / "generated" / "derivations"


def latexmk(folder: Path, name: str) -> subprocess.CompletedProcess:
    """Compile ``folder/name.tex`` to PDF; a missing TeX installation fails, it never skips."""
    exe = shutil.which("latexmk")
    assert exe, "latexmk is not installed; run `make tex` (texlive-latex-recommended, texlive-pictures, latexmk)"
    return subprocess.run([exe, "-pdf", "-interaction=nonstopmode", "-halt-on-error", f"{name}.tex"],
                          cwd=folder, capture_output=True, text=True, timeout=180)


def pdflatex_once(folder: Path, name: str) -> subprocess.CompletedProcess:
    """One ``pdflatex`` pass over ``folder/name.tex``: errors, the page and every overfull line are
    there already. The second pass latexmk would make only puts in the numbers of cross-references,
    which the pass's ``.aux`` file defines (``test_every_reference_has_its_label``); 41 documents,
    once each, take less than half the time."""
    exe = shutil.which("pdflatex")
    assert exe, "pdflatex is not installed; run `make tex` (texlive-latex-recommended, texlive-pictures, latexmk)"
    return subprocess.run([exe, "-interaction=nonstopmode", "-halt-on-error", f"{name}.tex"],
                          cwd=folder, capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="session")
def compiled_derivations(tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """Every committed ``generated/derivations/*.tex`` compiled (two at a time, one pass each) with
    resizing switched off: stem -> (run, pdf); the log is ``pdf.with_suffix(".log")``, the labels
    it defines are in ``pdf.with_suffix(".aux")``.

    The committed files equal what the generator renders (``test_generated_folder_is_fresh``), so
    compiling them once checks every document without compiling each one twice. Once for the whole
    run: under pytest-xdist the first worker to ask compiles, in the folder the workers share, and
    the others wait on its lock and read its results."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    folder = shared / "derivations"
    results = shared / "derivations.json"
    with open(shared / "derivations.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not results.exists():
            results.write_text(json.dumps(_compile_all(folder)))
    runs = json.loads(results.read_text())
    return {s: (subprocess.CompletedProcess(r["args"], r["returncode"], r["stdout"], r["stderr"]), folder / f"{s}.pdf")
            for s, r in runs.items()}


def _compile_all(folder: Path) -> dict[str, dict]:
    folder.mkdir(exist_ok=True)  # a worker that failed before writing the results may have made it
    stems = sorted(p.stem for p in DERIVATIONS.glob("*.tex"))
    for stem in stems:
        # resizing switched off (the preamble's \derivenoresize): a display that would need
        # shrinking below 85% overflows, and the log says so
        shutil.copy(DERIVATIONS / f"{stem}.tex", folder / f"{stem}-document.tex")
        (folder / f"{stem}.tex").write_text("\\def\\derivenoresize{}\\input{%s-document.tex}\n" % stem)
    with ThreadPoolExecutor(max_workers=2) as pool:
        runs = dict(zip(stems, pool.map(lambda s: pdflatex_once(folder, s), stems)))
    return {s: {"args": r.args, "returncode": r.returncode, "stdout": r.stdout, "stderr": r.stderr}
            for s, r in runs.items()}


def ink(pdf: Path, page: int = 1, dpi: int = 30) -> float:
    """The fraction of a PDF page's pixels that are not white (``pdftoppm`` to a greyscale PGM)."""
    exe = shutil.which("pdftoppm")
    assert exe, "pdftoppm is not installed; run `make tex` (poppler-utils)"
    run = subprocess.run([exe, "-gray", "-r", str(dpi), "-f", str(page), "-l", str(page), str(pdf)],
                         capture_output=True, check=True)
    match = re.match(rb"P5\s+(\d+)\s+(\d+)\s+(\d+)\s", run.stdout)
    assert match, "pdftoppm did not write a greyscale image"
    width, height = int(match.group(1)), int(match.group(2))
    pixels = run.stdout[match.end():match.end() + width * height]
    assert len(pixels) == width * height
    return sum(1 for v in pixels if v < 200) / len(pixels)


# -- one torch thread per test worker ---------------------------------------------------------------
# Under pytest-xdist (``make test``: a worker per core) each worker is one process on one core:
# torch's own thread pool per worker would put several threads on each core and slow all of them.
if os.environ.get("PYTEST_XDIST_WORKER"):
    import torch  # noqa: E402

    torch.set_num_threads(1)
