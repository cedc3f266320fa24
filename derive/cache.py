"""Skip a ``derive generate`` whose inputs did not change since it last ran.

A run's *key* hashes everything its files depend on: the toolkit's own source (``derive/``, the
built-in specs included) and templates, the spec files named with ``--layer``, the layers chosen,
whether proofs run, and the versions of Python and of the libraries that shape the output (sympy,
torch, jinja2, numpy). ``<out>/.derive-cache.json`` maps each key to the content hash of every file that run
wrote. When the key is known and every one of those files is still there with that hash, the
files are exactly what the run would write again, and ``derive generate`` returns at once.

A layer has a key of its own (``layer_key``): when a run's key is new (a spec file changed), the
layers whose own key is recorded, with their files intact, are not derived again.

The run's check is deliberately light: no torch or sympy import, and the specs are not even loaded.
``derive check`` never uses the record: it re-derives everything.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import platform
import sysconfig
from importlib import metadata
from pathlib import Path

from .files import content_hash, write_atomic

RECORD = ".derive-cache.json"
PACKAGE = Path(__file__).resolve().parent
TEMPLATES = PACKAGE.parent / "templates"
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
    spec = spec.resolve()
    ran = {Path(f).resolve() for f in sources if Path(f).is_file()}
    toolkit = {f for f in ran if PACKAGE in f.parents and SPECS not in f.parents}
    for path in sorted({spec} | {f for f in ran - toolkit if not _is_library(f)}):
        h.update(str(path).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def run_key(spec_files: list[str], names: list[str], proven: bool, fused_only: bool = False) -> str:
    """Hash of the toolkit, the spec files (``FILE.py`` or ``FILE.py:name``), the names, ``proven``
    and ``fused_only``."""
    h = hashlib.sha256(_toolkit_digest())
    for argument in sorted(spec_files):
        path = Path(argument.partition(":")[0])
        h.update(argument.encode() + b"\0" + (path.read_bytes() if path.is_file() else b"missing"))
    h.update(("names:" + ",".join(sorted(names)) + f";proven:{proven}" + (";fused-only" if fused_only else "")).encode())
    return h.hexdigest()


def _load(out: Path) -> dict:
    try:
        return json.loads((Path(out) / RECORD).read_text())
    except (OSError, ValueError):
        return {}


def _file_hash(path: Path) -> str | None:
    try:
        return content_hash(path.read_text())
    except OSError:
        return None


def unchanged(key: str, out: Path) -> bool:
    """True when the run ``key`` wrote its files into ``out`` and they are all still as written."""
    files = _load(out).get(key)
    return bool(files) and all(_file_hash(Path(out) / rel) == digest for rel, digest in files.items())


def remember(out: Path, written: dict[str, list[str]]) -> None:
    """Record, for each key (a run's or a layer's), the files (paths relative to ``out``) it just
    wrote. Earlier entries stay while their files are still as they were recorded; the others (a
    layer since changed and derived again, a file since edited) are dropped, so the record does not grow."""
    record, hashes = _load(out), {}

    def current(rel: str) -> str | None:
        if rel not in hashes:
            hashes[rel] = _file_hash(Path(out) / rel)
        return hashes[rel]

    record = {key: files for key, files in record.items()
              if isinstance(files, dict) and files and all(current(rel) == digest for rel, digest in files.items())}
    for key, files in written.items():
        record[key] = {rel: current(rel) for rel in sorted(files)}
    write_atomic(Path(out) / RECORD, json.dumps(record, indent=1, sort_keys=True) + "\n")


def recorded_files(key: str, out: Path) -> list[str]:
    """The files the run or layer ``key`` wrote into ``out`` (empty when unknown)."""
    return sorted(_load(out).get(key) or [])


__all__ = ["run_key", "layer_key", "unchanged", "remember", "recorded_files", "RECORD"]
