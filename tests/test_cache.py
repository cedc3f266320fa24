"""An unchanged `derive generate` is skipped; any change to what it depends on re-derives."""
import shutil
from pathlib import Path

from derive import cache
from derive.cli import main

SPECS = Path(__file__).parent / "specs" / "unseen_layers.py"


def _generate(spec: Path, out: Path, capsys) -> str:
    assert main(["generate", "--no-prove", "--layer", f"{spec}:logcosh", "--out", str(out)]) == 0
    return capsys.readouterr().out


def test_unchanged_generation_is_skipped_and_changes_are_not(tmp_path, capsys):
    spec = tmp_path / "my_layers.py"
    shutil.copy(SPECS, spec)
    out = tmp_path / "out"
    first = _generate(spec, out, capsys)
    assert "unchanged since" not in first and (out / "logcosh.py").is_file()
    written = {p: p.stat().st_mtime_ns for p in out.rglob("*.py")}

    second = _generate(spec, out, capsys)
    assert "unchanged since this generation last ran" in second
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.py")} == written

    # a change to the spec file is a new key: derived again
    spec.write_text(spec.read_text() + "\n# a comment changes the file\n")
    assert "unchanged since" not in _generate(spec, out, capsys)

    # a generated file deleted (or edited) since: the record no longer describes the folder
    (out / "logcosh.py").unlink()
    assert "unchanged since" not in _generate(spec, out, capsys)
    assert (out / "logcosh.py").is_file()


def test_the_key_covers_the_toolkit_the_spec_and_the_options(tmp_path):
    spec = tmp_path / "a.py"
    spec.write_text("x = 1\n")
    key = cache.run_key([str(spec)], [], proven=True)
    assert cache.run_key([str(spec)], [], proven=False) != key
    assert cache.run_key([str(spec)], ["mse"], proven=True) != key
    spec.write_text("x = 2\n")
    assert cache.run_key([str(spec)], [], proven=True) != key
    assert not cache.unchanged(key, tmp_path / "never_written")
