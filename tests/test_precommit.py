"""The pre-commit hook this repository defines (``.pre-commit-hooks.yaml``) runs ``derive check`` in
a user's repository: it passes on fresh generated files and fails the commit once a spec changes."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from derive.cli import main

ROOT = Path(__file__).resolve().parent.parent


def _git(*args, cwd):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True,
                   capture_output=True)


def test_the_hook_runs_derive_check_in_a_users_repository(tmp_path):
    hooks = tmp_path / "hooks"  # the hook's repository: this repository's manifest, committed
    hooks.mkdir()
    shutil.copy(ROOT / ".pre-commit-hooks.yaml", hooks)
    _git("init", "-q", cwd=hooks)
    _git("add", "-A", cwd=hooks)
    _git("commit", "-qm", "hooks", cwd=hooks)
    rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=hooks, capture_output=True, text=True, check=True).stdout.strip()

    user = tmp_path / "user"
    user.mkdir()
    _git("init", "-q", cwd=user)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}",
           "PRE_COMMIT_HOME": str(tmp_path / "cache")}
    env.pop("PYTHONPATH", None)

    def run(*args):
        return subprocess.run([*map(str, args)], cwd=user, capture_output=True, text=True, env=env)

    assert main(["new", "my_norm", "--out", str(user / "mylayers")]) == 0
    assert main(["generate", "--no-prove", "--layer", str(user / "mylayers"), "--out", str(user / "mylayers" / "generated")]) == 0
    (user / ".pre-commit-config.yaml").write_text(
        f"repos:\n  - repo: {hooks}\n    rev: {rev}\n    hooks:\n      - id: derive-check\n"
        f"        args: [--layer, mylayers, --out, mylayers/generated]\n")
    _git("add", "-A", cwd=user)
    pre_commit = [sys.executable, "-m", "pre_commit", "run", "--all-files"]
    passed = run(*pre_commit)
    assert passed.returncode == 0 and "derive check" in passed.stdout and "Passed" in passed.stdout, passed.stdout + passed.stderr

    spec = user / "mylayers" / "my_norm.py"
    spec.write_text(spec.read_text().replace("squares = x**2", "squares = x**2 + x"))
    _git("add", "-A", cwd=user)
    failed = run(*pre_commit)
    assert failed.returncode == 1 and "Failed" in failed.stdout and "my_norm.py: stale" in failed.stdout, failed.stdout
    assert "derive generate --layer mylayers --out mylayers/generated" in failed.stdout
