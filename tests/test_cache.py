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


def _run(spec_files, out, capsys) -> dict[str, str]:
    """``derive generate --no-prove`` of the spec files; each layer's line: derived or unchanged."""
    args = ["generate", "--no-prove", "--out", str(out)]
    for spec in spec_files:
        args += ["--layer", str(spec)]
    assert main(args) == 0
    lines = [line.split(None, 1) for line in capsys.readouterr().out.splitlines()[1:] if line.strip()]
    return {name: "unchanged" if rest.startswith("unchanged since") else "derived"
            for name, rest in lines if not name.startswith(("done", "note:"))}


def test_a_layer_whose_spec_did_not_change_is_not_derived_again(tmp_path, capsys):
    """A new run (here, one more spec file) derives only the layers whose own key is new: those of
    the added or edited file. The others' files are left as they were."""
    mine, other = tmp_path / "mine.py", tmp_path / "other.py"
    shutil.copy(SPECS, mine)
    other.write_text("from derive import Tensor, layer\n\n\n@layer(x=Tensor('n', 'd'))\n"
                     "def softsign(x):\n    out = x / (1 + x.abs())\n    return out\n")
    out = tmp_path / "out"
    first = _run([mine], out, capsys)
    assert set(first.values()) == {"derived"} and "logcosh" in first
    # the layers' files (__init__.py's header names every spec file generated into the folder)
    written = {p: p.stat().st_mtime_ns for p in out.rglob("*.py") if p.name != "__init__.py"}

    second = _run([mine, other], out, capsys)
    assert second == {**{name: "unchanged" for name in first}, "softsign": "derived"}
    assert {p: p.stat().st_mtime_ns for p in written} == written

    mine.write_text(mine.read_text() + "\n# an edit\n")
    assert _run([mine, other], out, capsys) == {**{name: "derived" for name in first}, "softsign": "unchanged"}

    edited = out / "softsign.py"  # the record no longer matches: derived again, and the edit is kept
    edited.write_text(edited.read_text() + "# edited by hand\n")
    assert main(["generate", "--no-prove", "--out", str(out), "--layer", str(mine), "--layer", str(other)]) == 2
    assert "edited by hand" in capsys.readouterr().err


def test_a_layer_key_covers_its_spec_the_files_its_spec_runs_and_the_options(tmp_path):
    spec, helper = tmp_path / "spec.py", tmp_path / "helper.py"
    spec.write_text("x = 1\n")
    helper.write_text("y = 1\n")
    key = cache.layer_key("mine", str(spec), [str(helper)], proven=True)
    assert cache.layer_key("mine", str(spec), [str(helper)], proven=False) != key
    assert cache.layer_key("yours", str(spec), [str(helper)], proven=True) != key
    helper.write_text("y = 2\n")
    assert cache.layer_key("mine", str(spec), [str(helper)], proven=True) != key
    key = cache.layer_key("mine", str(spec), [str(helper)], proven=True)
    # torch's files and the toolkit's own are covered by the versions and the toolkit's hash
    import torch
    assert cache.layer_key("mine", str(spec), [str(helper), torch.__file__, cache.__file__], proven=True) == key
    assert cache.layer_key("mine", "<string>", [], proven=True) is None  # no file: always derived


def test_a_spec_calling_a_layer_depends_on_that_layers_file():
    from derive.layers import makemore_model
    from derive.trace import trace

    sources = {Path(f).name for f in trace(makemore_model).sources}
    assert {"makemore_model.py", "batchnorm.py", "cross_entropy.py"} <= sources


def test_the_record_drops_entries_whose_files_changed(tmp_path):
    (tmp_path / "a.py").write_text("a\n")
    (tmp_path / "b.py").write_text("b\n")
    cache.remember(tmp_path, {"one": ["a.py"], "two": ["b.py"]})
    assert cache.unchanged("one", tmp_path) and cache.unchanged("two", tmp_path)
    (tmp_path / "b.py").write_text("b, edited\n")
    cache.remember(tmp_path, {"three": ["a.py"]})
    assert cache.recorded_files("one", tmp_path) == ["a.py"] and cache.recorded_files("three", tmp_path) == ["a.py"]
    assert cache.recorded_files("two", tmp_path) == [] and not cache.unchanged("two", tmp_path)
