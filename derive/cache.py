"""Skip a ``derive generate`` whose inputs did not change since it last ran.

A run's *key* hashes everything its files depend on: the toolkit's own source (``derive/``, the
built-in specs included) and templates, the spec files named with ``--layer``, the layers chosen,
whether proofs run, and the versions of Python and of the libraries that shape the output (sympy,
torch, jinja2, numpy). ``<out>/.derive-cache.json`` maps each key to the content hash of every file that run
wrote. When the key is known and every one of those files is still there with that hash, the
files are exactly what the run would write again, and ``derive generate`` returns at once.

A run's key cannot name the files its specs import or call (helpers on the user's path): they are
known only once the specs are traced. So the record keeps, with each run's files, the content hash
of every such file (``user_files``: every file whose code ran while the specs were traced or that
loading them imported, the spec files included), and a run is skipped only when those are all
unchanged too.

A layer has a key of its own (``layer_key``): when a run's key is new (a spec file changed), the
layers whose own key is recorded, with their files intact, are not derived again.

The run's check is deliberately light: no torch or sympy import, and the specs are not even loaded.
``derive check`` never uses the record: it re-derives everything. Runs into one folder at the same
time take turns updating the record (a lock on the folder), so none loses another's entries.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import platform
import sysconfig
from importlib import metadata
from pathlib import Path

from .files import content_hash, write_atomic
from .templating import PACKAGE, TEMPLATES

RECORD = ".derive-cache.json"
SPECS = PACKAGE / "layers"
LIBRARIES = ("sympy", "torch", "jinja2", "numpy")


def _library_versions() -> str:
    versions = [f"python={platform.python_version()}"]
    for name in LIBRARIES:
        try:
            versions.append(f"{name}={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{name}=none")
    return ";".join(versions)


@functools.cache  # once per process: the code running is the code as it was imported
def _toolkit_digest(with_specs: bool = True) -> bytes:
    """The toolkit's source and templates and the library versions; ``with_specs=False`` leaves out
    the built-in specs (``derive/layers``), which a layer's own key covers where it uses them."""
    h = hashlib.sha256()
    for path in sorted(PACKAGE.rglob("*.py")) + sorted(TEMPLATES.glob("*.j2")):
        if with_specs or SPECS not in path.parents:
            h.update(str(path.relative_to(PACKAGE.parent)).encode() + b"\0" + path.read_bytes())
    h.update(_library_versions().encode())
    return h.digest()


@functools.cache
def _covered_roots() -> frozenset:
    """Folders whose files a key covers by a version instead of their content: the standard library
    and the libraries of ``LIBRARIES``."""
    roots = {Path(sysconfig.get_paths()[k]).resolve() for k in ("stdlib", "platstdlib")}
    for name in LIBRARIES:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin:
            roots.add(Path(spec.origin).resolve().parent)
    return frozenset(roots)


def _is_library(path: Path) -> bool:
    return any(root in path.parents for root in _covered_roots())


def layer_key(name: str, spec_file: str, sources, proven: bool) -> str | None:
    """Hash of what one layer's files depend on: the toolkit (the built-in specs left out), the library
    versions, ``proven``, the layer's name, and the files of ``sources`` (``Graph.sources``: every file
    whose code ran while the spec was traced) that are neither the toolkit's, nor the standard
    library's, nor of ``LIBRARIES``: the spec's own module, the modules of layers it calls, helpers
    it calls, wherever they are installed.

    None where the spec has no file (a layer built in memory): such a layer is always derived.
    A constant imported from a module none of whose code runs is not covered: ``--force`` re-derives.
    """
    spec = Path(spec_file)
    if not spec.is_file():
        return None
    h = hashlib.sha256(_toolkit_digest(with_specs=False))
    h.update(f"layer:{name};proven:{proven}".encode())
    for path in sorted(map(Path, user_files({spec_file, *sources}))):
        h.update(str(path).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def user_files(sources) -> frozenset:
    """The files of ``sources`` (paths) that a key covers by their content: those that exist and are
    neither the toolkit's own code (its built-in specs are included), nor the standard library's, nor
    of ``LIBRARIES``. Resolved paths, as strings."""
    found = set()
    for f in sources:
        path = Path(f)
        if not f or not path.is_file():
            continue
        path = path.resolve()
        if (PACKAGE in path.parents and SPECS not in path.parents) or _is_library(path):
            continue
        found.add(str(path))
    return frozenset(found)


def run_key(spec_files: list[str], names: list[str], proven: bool, options: str = "") -> str:
    """Hash of the toolkit, the spec files (``FILE.py``, ``FILE.py:name`` or a folder), the names,
    ``proven`` and any other ``options`` that change what is written."""
    h = hashlib.sha256(_toolkit_digest())
    for argument in sorted(spec_files):
        path = Path(argument.partition(":")[0])
        h.update(argument.encode() + b"\0" + (path.read_bytes() if path.is_file() else b"missing"))
        if path.is_dir():  # ``--layer DIR``: the files in it (one added is a new run)
            for file in sorted(path.glob("*.py")):
                h.update(file.name.encode() + b"\0" + (file.read_bytes() if file.is_file() else b""))
    h.update(("names:" + ",".join(sorted(names)) + f";proven:{proven};{options}").encode())
    return h.hexdigest()


def _load(out: Path) -> dict:
    try:
        record = json.loads((Path(out) / RECORD).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _file_hash(path: Path) -> str | None:
    try:
        return content_hash(Path(path).read_text())
    except (OSError, UnicodeDecodeError):
        return None


def _entry(record: dict, key: str) -> tuple[dict, dict]:
    """(files, inputs) of a record entry: output paths relative to the folder and the user's files
    (absolute) the run read, each with its hash. An entry of an older format has neither."""
    entry = record.get(key)
    if not isinstance(entry, dict) or not isinstance(entry.get("files"), dict):
        return {}, {}
    inputs = entry.get("inputs")
    return entry["files"], inputs if isinstance(inputs, dict) else {}


def unchanged(key: str, out: Path) -> bool:
    """True when the run ``key`` wrote its files into ``out``, they are all still as written, and
    every file of the user's that it read is still as it read it."""
    files, inputs = _entry(_load(out), key)
    return (bool(files) and all(_file_hash(Path(out) / rel) == digest for rel, digest in files.items())
            and all(_file_hash(Path(path)) == digest for path, digest in inputs.items()))


@contextlib.contextmanager
def _locked(out: Path):
    """Hold an exclusive lock on the folder ``out`` (where the platform has ``flock``)."""
    try:
        import fcntl
        fd = os.open(out, os.O_RDONLY)
    except (ImportError, OSError):
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def remember(out: Path, written: dict[str, list[str]], inputs: dict[str, frozenset] | None = None) -> None:
    """Record, for each key (a run's or a layer's), the files (paths relative to ``out``) it just
    wrote, and (``inputs``) the user's files it read. Earlier entries stay while their files are
    still as they were recorded; the others (a layer since changed and derived again, a file since
    edited) are dropped, so the record does not grow."""
    out = Path(out)
    hashes = {}

    def current(path: Path) -> str | None:
        if path not in hashes:
            hashes[path] = _file_hash(path)
        return hashes[path]

    out.mkdir(parents=True, exist_ok=True)
    with _locked(out):  # read, merge and write as one step: a run beside this one adds its own in turn
        record = {}
        for key, entry in _load(out).items():
            files, _ = _entry({key: entry}, key)
            if files and all(current(out / rel) == digest for rel, digest in files.items()):
                record[key] = entry
        for key, files in written.items():
            record[key] = {"files": {rel: current(out / rel) for rel in sorted(files)},
                           "inputs": {path: current(Path(path)) for path in sorted((inputs or {}).get(key, ()))}}
        write_atomic(out / RECORD, json.dumps(record, indent=1, sort_keys=True) + "\n")


def recorded_files(key: str, out: Path) -> list[str]:
    """The files the run or layer ``key`` wrote into ``out`` (empty when unknown)."""
    return sorted(_entry(_load(out), key)[0])


__all__ = ["run_key", "layer_key", "user_files", "unchanged", "remember", "recorded_files", "RECORD"]
