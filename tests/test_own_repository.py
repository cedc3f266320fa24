"""derive in a user's own repository: it writes only files it owns, refuses everything else with one
line naming the file and the fix, never serves stale files from its fast path, and its verdicts are
exit codes. Each test is one scenario as a user would meet it."""
import json
import multiprocessing
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from derive import cache
from derive.cli import main
from derive.files import TAG, comparable, ownership

ROOT = Path(__file__).resolve().parent.parent

SPEC = '''import torch
from derive import Tensor, layer
{imports}

@layer(x=Tensor("n", "d"), w=Tensor("d"))
def {name}(x, w):
    """A small layer."""
    h = {body}
    out = h * w
    return out
'''


def spec(path: Path, name: str = "scaled", body: str = "torch.tanh(x)", imports: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(SPEC.format(name=name, body=body, imports=imports))
    return path


def run(*args, capsys=None) -> tuple[int, str, str]:
    """``derive ARGS`` in this process: (status, stdout, stderr)."""
    status = main([str(a) for a in args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def snapshot(folder: Path) -> dict:
    return {p: p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def derive(*args, cwd=ROOT, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "derive", *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          **kwargs)


# -- never touch what it did not write ------------------------------------------------------------
def test_a_spec_in_the_output_folder_is_never_replaced(tmp_path, capsys):
    mine = spec(tmp_path / "B" / "mine" / "my_norm.py", name="my_norm")
    before = mine.read_text()
    for extra in ([], ["--allow-other-sources"], ["--force", "--allow-other-sources"]):
        status, _, err = run("generate", "--no-prove", "--layer", mine, "--out", mine.parent, *extra, capsys=capsys)
        assert status == 2 and f"{mine} is a file this run reads" in err and "--out" in err, err
        assert mine.read_text() == before
    assert sorted(p.name for p in mine.parent.iterdir()) == ["my_norm.py"]  # nothing else written either


def test_a_folder_of_someone_elses_python_sources_is_refused(tmp_path, capsys):
    """``--out`` at a package of the user's (here a copy of the built-in specs): refused before
    anything is written, naming the files; the user's __init__.py and modules stay as they were."""
    package = tmp_path / "layers"
    shutil.copytree(ROOT / "derive" / "layers", package, ignore=shutil.ignore_patterns("__pycache__"))
    before = snapshot(package)
    status, out, err = run("generate", "batchnorm", "cross_entropy", "--no-prove", "--out", package, capsys=capsys)
    assert status == 2 and out == ""
    assert "holds Python files derive did not write" in err and "--allow-other-sources" in err
    assert f"{package / 'batchnorm.py'} was not written by derive" in err
    assert f"{package / 'cross_entropy.py'} was not written by derive" in err
    assert snapshot(package) == before
    # told to write beside them, it still replaces none of them
    status, _, err = run("generate", "batchnorm", "--no-prove", "--allow-other-sources", "--out", package, capsys=capsys)
    assert status == 2 and f"{package / 'batchnorm.py'} was not written by derive" in err
    assert snapshot(package) == before


def test_beside_other_sources_when_told_to_and_a_users_init_is_kept(tmp_path, capsys):
    out = tmp_path / "pkg"
    out.mkdir()
    (out / "__init__.py").write_text("VERSION = 1\n")
    (out / "helpers.py").write_text("def helper():\n    return 1\n")
    status, _, err = run("generate", "mse", "--no-prove", "--out", out, capsys=capsys)
    assert status == 2 and "helpers.py" in err
    status, _, err = run("generate", "mse", "--no-prove", "--out", out, "--allow-other-sources", capsys=capsys)
    assert status == 0, err
    assert (out / "__init__.py").read_text() == "VERSION = 1\n" and (out / "helpers.py").is_file()
    assert ownership(out / "mse.py") == "ours"
    status, _, err = run("check", "mse", "--out", out, capsys=capsys)
    assert status == 0, err  # a user's own __init__.py is not a stale generated file


@pytest.mark.parametrize("how", ["a user's file", "a generated file whose header was deleted and body edited"])
def test_a_file_without_the_header_is_never_overwritten_even_with_force(tmp_path, capsys, how):
    out = tmp_path / "gen"
    if how == "a user's file":
        out.mkdir()
        (out / "mse.py").write_text("# my own mse\n")
    else:
        assert run("generate", "mse", "--no-prove", "--out", out, capsys=capsys)[0] == 0
        text = (out / "mse.py").read_text()
        (out / "mse.py").write_text(text[text.index('"""'):].replace("return", "return  # tweaked", 1))
    before = (out / "mse.py").read_text()
    for force in ([], ["--force"]):
        status, _, err = run("generate", "mse", "--no-prove", "--out", out, *force, capsys=capsys)
        assert status == 2 and err.count("\n") == 1, err
        assert f"{out / 'mse.py'} was not written by derive (it has no generated header)" in err
        assert (out / "mse.py").read_text() == before
    status, _, err = run("check", "mse", "--out", out, capsys=capsys)
    assert status == 1 and f"{out / 'mse.py'}: not written by derive" in err


def test_a_hand_edit_is_refused_naming_each_file_and_force_overwrites_it(tmp_path, capsys):
    out = tmp_path / "gen"
    assert run("generate", "mse", "--no-prove", "--out", out, capsys=capsys)[0] == 0
    for rel in ("mse.py", "derivations/mse_steps.md"):
        (out / rel).write_text((out / rel).read_text() + "\n# mine\n")
    status, _, err = run("generate", "mse", "--no-prove", "--out", out, capsys=capsys)
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 2 and all("was edited by hand" in line and "--force" in line for line in lines)
    assert {str(out / "mse.py"), str(out / "derivations" / "mse_steps.md")} == {line.split()[1] for line in lines}
    assert run("generate", "mse", "--no-prove", "--force", "--out", out, capsys=capsys)[0] == 0
    assert ownership(out / "mse.py") == ownership(out / "derivations" / "mse_steps.md") == "ours"


def test_only_derives_own_temporaries_are_cleaned(tmp_path, capsys):
    out = tmp_path / "gen"
    users = [out / "data" / ".results.2024.final.tmp", out / ".notes.1.draft.tmp", out / "derivations" / ".x.7.y.tmp"]
    for path in users:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("the user's")
    dead = out / f".mse.py.{TAG}-999999999-abcdef.tmp"  # a pid no process can have
    dead.write_text("half")
    assert run("generate", "mse", "--no-prove", "--out", out, capsys=capsys)[0] == 0
    assert all(p.read_text() == "the user's" for p in users) and not dead.exists()


def test_colliding_output_names_are_refused_before_anything_is_written(tmp_path, capsys):
    both = spec(tmp_path / "both.py", name="f")
    both.write_text(both.read_text() + SPEC.format(name="f_steps", body="torch.exp(x)", imports="").split("\n", 3)[3])
    twin = spec(tmp_path / "other" / "twin.py", name="f", body="torch.sigmoid(x)")
    for layers in (["--layer", both], ["--layer", spec(tmp_path / "one.py", name="f"), "--layer", twin]):
        out = tmp_path / "out"
        status, _, err = run("generate", "--no-prove", *layers, "--out", out, capsys=capsys)
        assert status == 2 and "would both write" in err and "f_steps.py" in err and "rename one" in err, err
        assert not out.exists()
        status, _, err = run("check", *layers, "--out", out, capsys=capsys)
        assert status == 1 and "would both write" in err


def test_file_modes_follow_the_umask(tmp_path):
    umasks = [0o022, 0o002, 0o077]
    script = ("import os, sys; from derive.cli import main\n"
              "for umask in (0o022, 0o002, 0o077):\n"
              "    os.umask(umask)\n"
              "    assert main(['generate', 'mse', '--no-prove', '--out', f'{sys.argv[1]}/{umask:o}']) == 0\n")
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    for umask in umasks:
        files = [p for p in (tmp_path / f"{umask:o}").rglob("*") if p.is_file()]
        assert len(files) >= 7
        assert {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o666 & ~umask}, oct(umask)


def test_odd_output_paths_get_one_line(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "gen" / "mse.py").mkdir(parents=True)
    cases = [(tmp_path / "afile", "is a file, not a folder"), (tmp_path / "afile" / "below", "is a file, not a folder"),
             (tmp_path / "gen", "mse.py is in the way")]
    for out, problem in cases:
        status, _, err = run("generate", "mse", "--no-prove", "--out", out, capsys=capsys)
        assert status == 2 and err.count("\n") == 1 and problem in err and "--out" in err, err
    assert sorted(p.name for p in (tmp_path / "gen").iterdir()) == ["mse.py"]


def test_a_read_only_output_folder_gets_one_line():
    """As a user without write permission (root may write anywhere, so the test drops to nobody)."""
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None:
        pytest.skip("needs root and setpriv to run the command as another user")
    home = Path(tempfile.mkdtemp(prefix="derive-read-only-"))  # /tmp is open to all; this folder is made so
    try:
        out = home / "ro"
        out.mkdir()
        os.chmod(home, 0o755)
        os.chmod(out, 0o755)
        result = subprocess.run([setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m",
                                 "derive", "generate", "mse", "--no-prove", "--out", str(out)], cwd=ROOT,
                                capture_output=True, text=True, env={**os.environ, "HOME": str(home)})
        assert result.returncode == 2, result.stderr
        assert result.stderr == f"derive: {out} is not writable; make it writable (chmod u+w), or choose another --out\n"
        assert list(out.iterdir()) == []
    finally:
        shutil.rmtree(home)


# Ctrl-C heard as a terminal's process hears it: one started from a process that ignores SIGINT (a
# shell's background job, ``cmd &``) inherits it ignored, and then no Ctrl-C reaches it
HEARD = "import signal; signal.signal(signal.SIGINT, signal.default_int_handler); "


def _started_workers(proc: subprocess.Popen, timeout: float = 120) -> None:
    """Wait until ``proc`` has forked its derivation workers."""
    deadline = time.time() + timeout
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"derive ended before it forked workers: {proc.communicate()}")
        if children.exists() and children.read_text().split():
            return
        time.sleep(0.05)
    pytest.fail("derive never forked its workers")


@pytest.mark.parametrize("sent, status, word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_sigint_and_sigterm_end_with_one_line(tmp_path, sent, status, word):
    if not Path("/proc/self/task").is_dir():
        pytest.skip("needs /proc to see the workers")
    out = tmp_path / "gen"
    derive = HEARD + "import runpy; runpy.run_module('derive', run_name='__main__', alter_sys=True)"
    proc = subprocess.Popen([sys.executable, "-c", derive, "generate", "--out", str(out)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _started_workers(proc)
        time.sleep(0.3)
        os.killpg(proc.pid, sent) if sent == signal.SIGINT else proc.send_signal(sent)  # Ctrl-C reaches the group
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == status, stderr
    assert stderr.splitlines() == [f"derive: {word} ({sent.name if sent == signal.SIGTERM else 'Ctrl-C'}); every file "
                                   "written is whole, the others are as they were"], stderr
    assert not [p for p in out.rglob("*.tmp")] if out.exists() else True


def _sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def test_a_signal_another_thread_takes_still_stops_the_workers_at_once(monkeypatch):
    """The kernel hands a process's Ctrl-C to any thread not blocking it (the main thread blocks
    every signal for a moment whenever it starts a thread). Taken by another thread, the signal is
    handled only when the main thread wakes: waiting for the pool without a bound, derive went on
    until every derivation had ended (past a minute under load)."""
    import threading

    from derive import parallel
    if threading.current_thread() is not threading.main_thread() or "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("needs the main thread and fork")
    monkeypatch.setattr(parallel, "cores", lambda: 2)  # a pool, even on one core
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # (see HEARD)
    other = threading.Thread(target=lambda: (time.sleep(1.0), signal.pthread_kill(threading.get_ident(), signal.SIGINT)))
    start = time.perf_counter()
    other.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            parallel.fork_map(_sleep, [30.0, 30.0])
    finally:
        signal.signal(signal.SIGINT, previous)
    other.join()
    assert time.perf_counter() - start < 10


FORKED_INTERRUPT = """
import os, signal, sys, time
from derive import parallel
parallel.cores = lambda: 2
armed = [True]
def interrupt():  # Ctrl-C, handled while the pool forks a worker
    if armed:
        armed.clear()
        signal.raise_signal(signal.SIGINT)
os.register_at_fork(after_in_parent=interrupt)
def nap(seconds):
    time.sleep(seconds)
start = time.perf_counter()
try:
    parallel.fork_map(nap, [30.0, 30.0])
except KeyboardInterrupt:
    print(f"interrupted after {time.perf_counter() - start:.1f} s")
"""


def test_a_signal_that_comes_while_the_pool_forks_stops_the_run():
    """A Ctrl-C handled in an at-fork hook raises there, and Python reports it as ignored: derive
    went on until every derivation had ended. The parent holds the signal while it forks."""
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("needs fork")
    run = subprocess.run([sys.executable, "-c", HEARD + FORKED_INTERRUPT], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert run.stdout.startswith("interrupted after"), run.stdout + run.stderr
    assert float(run.stdout.split()[2]) < 10 and "ignored" not in run.stderr, run.stdout + run.stderr


# -- the fast path is never stale ------------------------------------------------------------------
def test_a_helper_the_spec_calls_is_part_of_the_runs_key(tmp_path, capsys):
    helper = tmp_path / "helpers" / "acts.py"
    helper.parent.mkdir()
    helper.write_text("import torch\n\n\ndef act(x):\n    return torch.tanh(x)\n")
    mine = spec(tmp_path / "helpers" / "mine.py", body="acts.act(x)", imports="import acts\n")
    out = tmp_path / "gen"
    args = ("generate", "--no-prove", "--layer", mine, "--out", out)
    assert run(*args, capsys=capsys)[0] == 0
    assert "unchanged since" in run(*args, capsys=capsys)[1]
    helper.write_text("import torch\n\n\ndef act(x):\n    return torch.sigmoid(x)\n")
    status, stdout, _ = run(*args, capsys=capsys)
    assert status == 0 and "unchanged since" not in stdout and "sigmoid" in (out / "scaled.py").read_text()
    assert run("check", "--layer", mine, "--out", out, capsys=capsys)[0] == 0


def test_a_constant_imported_from_a_helper_is_covered(tmp_path, capsys):
    """A helper whose code never runs while tracing (only its value is read, at import) is still covered."""
    (tmp_path / "settings.py").write_text("SCALE = 2.0\n")
    mine = spec(tmp_path / "mine.py", body="torch.tanh(x) * SCALE", imports="from settings import SCALE\n")
    out = tmp_path / "gen"
    args = ("generate", "--no-prove", "--layer", mine, "--out", out)
    assert run(*args, capsys=capsys)[0] == 0
    before = (out / "scaled_steps.py").read_text()
    (tmp_path / "settings.py").write_text("SCALE = 3.0\n")
    status, stdout, _ = run(*args, capsys=capsys)
    assert status == 0 and "unchanged since" not in stdout
    assert (out / "scaled_steps.py").read_text() != before
    assert run("check", "--layer", mine, "--out", out, capsys=capsys)[0] == 0


def test_hints_and_headers_carry_the_exact_command(tmp_path, capsys):
    mine = spec(tmp_path / "mylayers" / "x.py")
    out = tmp_path / "mylayers" / "generated"
    assert run("generate", "--no-prove", "--layer", mine, "--out", out, capsys=capsys)[0] == 0
    command = f"derive generate --layer {mine} --out {out}"
    for rel in ("scaled.py", "scaled_steps.py", "derivations/scaled.md", "derivations/README.md", "__init__.py"):
        assert f"regenerate: {command}" in (out / rel).read_text(), rel
    mine.write_text(mine.read_text().replace("torch.tanh(x)", "torch.sigmoid(x)"))
    status, _, err = run("check", "--layer", mine, "--out", out, capsys=capsys)
    assert status == 1 and err.strip().splitlines()[-1].endswith(f"run `{command}`")
    assert run("generate", "--no-prove", "--layer", mine, "--out", out, capsys=capsys)[0] == 0
    assert run("check", "--layer", mine, "--out", out, capsys=capsys)[0] == 0


def test_several_spec_files_share_one_output_folder(tmp_path, capsys):
    a = spec(tmp_path / "specs" / "a.py", name="first")
    b = spec(tmp_path / "specs" / "b.py", name="second", body="torch.exp(x)")
    out = tmp_path / "gen"
    for one in (a, b):
        assert run("generate", "--no-prove", "--layer", one, "--out", out, capsys=capsys)[0] == 0
    index = (out / "derivations" / "README.md").read_text()
    assert "`first`" in index and "`second`" in index
    for one in (a, b, tmp_path / "specs"):
        status, _, err = run("check", "--layer", one, "--out", out, capsys=capsys)
        assert status == 0, (one, err)
    # a spec file that is gone leaves the index when the folder is next generated
    b.unlink()
    assert run("generate", "--no-prove", "--layer", a, "--out", out, capsys=capsys)[0] == 0
    assert "`second`" not in (out / "derivations" / "README.md").read_text()


def test_a_folder_of_spec_files(tmp_path, capsys):
    folder = tmp_path / "mylayers"
    spec(folder / "a.py", name="first")
    spec(folder / "b.py", name="second", body="torch.exp(x)")
    (folder / "notes.py").write_text("NOTE = 'not a spec'\n")
    out = folder / "generated"
    status, stdout, err = run("generate", "--no-prove", "--layer", folder, "--out", out, capsys=capsys)
    assert status == 0, err
    assert {line.split()[0] for line in stdout.splitlines()[1:-1]} == {"first", "second"}
    assert run("check", "--layer", folder, "--out", out, capsys=capsys)[0] == 0
    spec(folder / "c.py", name="third", body="torch.sigmoid(x)")  # a new spec file is a new run
    status, stdout, _ = run("generate", "--no-prove", "--layer", folder, "--out", out, capsys=capsys)
    assert "unchanged since this generation" not in stdout and (out / "third.py").is_file()


def _remember_many(out: str, prefix: str) -> None:
    for k in range(15):
        cache.remember(Path(out), {f"{prefix}{k}": ["f.txt"]})


def test_concurrent_runs_do_not_lose_record_entries(tmp_path):
    (tmp_path / "f.txt").write_text("same\n")
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_remember_many, args=(str(tmp_path), p)) for p in "abc"]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert all(w.exitcode == 0 for w in workers)
    record = json.loads((tmp_path / cache.RECORD).read_text())
    assert {f"{p}{k}" for p in "abc" for k in range(15)} <= set(record)


# -- generated modules import from wherever their folder is ---------------------------------------
def test_the_generated_folder_is_a_package_that_imports_from_anywhere(tmp_path, capsys):
    """The same module as a package's (``mylayers.kernels.mse``, ``kernels.mse``) and as a plain module
    with its folder on the path (``mse``): each imports and runs alike, from a folder unrelated to it."""
    project = tmp_path / "project"
    out = project / "mylayers" / "kernels"
    assert run("generate", "mse", "--no-prove", "--out", out, capsys=capsys)[0] == 0
    script = ("import importlib, sys, torch\n"
              "sys.path[:0] = sys.argv[1:]\n"
              "for name in ('mylayers.kernels.mse', 'kernels.mse', 'mse'):\n"
              "    torch.manual_seed(0)\n"
              "    p = torch.randn(4, 3, requires_grad=True)\n"
              "    importlib.import_module(name).mse(p, torch.zeros(4, 3)).backward()\n"
              "    print(name, importlib.import_module(name).__file__, round(float(p.grad.abs().sum()), 6))\n")
    unrelated = tmp_path / "elsewhere"
    unrelated.mkdir()
    result = subprocess.run([sys.executable, "-c", script, str(project), str(project / "mylayers"), str(out)],
                            cwd=unrelated, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""})
    assert result.returncode == 0, result.stderr
    lines = [line.split() for line in result.stdout.splitlines()]
    assert [name for name, _, _ in lines] == ["mylayers.kernels.mse", "kernels.mse", "mse"]
    assert {Path(file) for _, file, _ in lines} == {out / "mse.py"}
    assert len({value for _, _, value in lines}) == 1 and float(lines[0][2]) > 0


# -- verdicts in exit codes ---------------------------------------------------------------------
LONG = '''import torch
from derive import Tensor, layer


@layer(a_rather_long_input_name=Tensor("n", "d"), w=Tensor("d"))
def a_layer_with_a_rather_long_name(a_rather_long_input_name, w):
    """A layer with long names."""
    squashed_intermediate_value = torch.tanh(a_rather_long_input_name)
    out = squashed_intermediate_value * w
    return out
'''


def test_verify_exits_1_on_a_hand_edit_and_keeps_its_table_aligned(tmp_path, capsys):
    mine = tmp_path / "long_names.py"
    mine.write_text(LONG)
    out = tmp_path / "gen"
    assert run("generate", "--no-prove", "--layer", mine, "--out", out, capsys=capsys)[0] == 0
    status, stdout, err = run("verify", "--layer", mine, "--out", out, capsys=capsys)
    assert status == 0 and "FAIL" not in err, err
    assert "sizes n=32, d=64:" in stdout and "{" not in stdout
    rows = [line for line in stdout.splitlines() if " | exact: " in line]
    assert len(rows) == 6 and len({line.index(" | exact: ") for line in rows[:3]}) == 1
    assert len({line.index(" | exact: ") for line in rows[3:]}) == 1
    kernel = out / "a_layer_with_a_rather_long_name.py"
    text = kernel.read_text()
    line = "        da_rather_long_input_name = torch.ops.aten.tanh_backward(dout, squashed_intermediate_value)*w\n"
    # the eager backward, in place (the upstream gradient alone through tanh_backward, then w)
    in_place = "        da_rather_long_input_name = torch.ops.aten.tanh_backward(dout, squashed_intermediate_value).mul_(w)\n"
    assert line in text and in_place in text
    kernel.write_text(text.replace(in_place, in_place.replace("w)\n", "w*1.01)\n")))  # a 1% edit
    status, stdout, err = run("verify", "--layer", mine, "--out", out, capsys=capsys)
    assert status == 1
    assert err.startswith("FAIL: a_layer_with_a_rather_long_name: the fused kernel's da_rather_long_input_name is not "
                          "close to autograd of the spec"), err
    assert "sizes n=32, d=64" in err and err.count("FAIL:") == 1


def test_the_record_and_header_lines_do_not_decide_freshness(tmp_path, capsys):
    """The command lines in a header depend on how derive was invoked (--out as written); check
    compares everything else, so the same folder checked under another spelling, from another
    folder, is up to date (a generated file's text names a spec by its path in its repository)."""
    out = tmp_path / "gen"
    assert run("generate", "mse", "--no-prove", "--out", out, capsys=capsys)[0] == 0
    text = (out / "mse.py").read_text()
    assert comparable(text) != text  # the header names the folder as it was written
    mine = spec(tmp_path / "repo" / "specs" / "mine.py")
    (tmp_path / "repo" / ".git").mkdir()  # a repository: files name the spec by its path in it
    assert run("generate", "--no-prove", "--layer", mine, "--out", tmp_path / "repo" / "kernels", capsys=capsys)[0] == 0
    assert "specs/mine.py" in (tmp_path / "repo" / "kernels" / "derivations" / "scaled.md").read_text()
    os.chdir(tmp_path)
    try:
        assert run("check", "mse", "--out", "gen/", capsys=capsys)[0] == 0
        os.chdir(tmp_path / "repo" / "specs")
        status, _, err = run("check", "--layer", "mine.py", "--out", "../kernels", capsys=capsys)
        assert status == 0, err
    finally:
        os.chdir(ROOT)
