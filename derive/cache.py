"""Skip a ``derive generate`` whose inputs did not change since it last ran.

A run's *key* hashes everything its files depend on: the toolkit's own source (``derive/``, the
built-in specs included) and templates, the spec files named with ``--layer``, the layers chosen,
whether proofs run, and the versions of the libraries that shape the output (sympy, torch,
jinja2). ``<out>/.derive-cache.json`` maps each key to the content hash of every file that run
wrote. When the key is known and every one of those files is still there with that hash, the
files are exactly what the run would write again, and ``derive generate`` returns at once.

Deliberately light: no torch or sympy import, and the specs are not even loaded.
``derive check`` never uses the record: it re-derives everything.
"""
from __future__ import annotations

import hashlib
import json
from importlib import metadata
from pathlib import Path

from .files import content_hash, write_atomic

RECORD = ".derive-cache.json"
PACKAGE = Path(__file__).resolve().parent
TEMPLATES = PACKAGE.parent / "templates"
LIBRARIES = ("sympy", "torch", "jinja2")


def _library_versions() -> str:
    versions = []
    for name in LIBRARIES:
        try:
            versions.append(f"{name}={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{name}=none")
    return ";".join(versions)


def _toolkit_digest() -> bytes:
    h = hashlib.sha256()
    for path in sorted(PACKAGE.rglob("*.py")) + sorted(TEMPLATES.glob("*.j2")):
        h.update(str(path.relative_to(PACKAGE.parent)).encode() + b"\0" + path.read_bytes())
    h.update(_library_versions().encode())
    return h.digest()


def run_key(spec_files: list[str], names: list[str], proven: bool) -> str:
    """Hash of the toolkit, the spec files (``FILE.py`` or ``FILE.py:name``), the names and ``proven``."""
    h = hashlib.sha256(_toolkit_digest())
    for argument in sorted(spec_files):
        path = Path(argument.partition(":")[0])
        h.update(argument.encode() + b"\0" + (path.read_bytes() if path.is_file() else b"missing"))
    h.update(("names:" + ",".join(sorted(names)) + f";proven:{proven}").encode())
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


def remember(key: str, out: Path, files: list[str]) -> None:
    """Record the files (paths relative to ``out``) that the run ``key`` just wrote."""
    record = _load(out)
    record[key] = {rel: _file_hash(Path(out) / rel) for rel in sorted(files)}
    write_atomic(Path(out) / RECORD, json.dumps(record, indent=1, sort_keys=True) + "\n")


__all__ = ["run_key", "unchanged", "remember", "RECORD"]
