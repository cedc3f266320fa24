"""Writing generated files safely: atomic replace, header hash, hand-edit detection."""
from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path

HASH_LINE = re.compile(r"^(?:#|%|<!--) content-hash: ([0-9a-f]{64})", re.M)


def content_hash(body: str) -> str:
    """Hash of a generated file's body (everything after the header)."""
    return hashlib.sha256(body.encode()).hexdigest()


def recorded_hash(text: str) -> str | None:
    match = HASH_LINE.search(text)
    return match.group(1) if match else None


def body_of(text: str) -> str:
    """The part of a generated file that its content hash covers."""
    marker = text.find("\n", HASH_LINE.search(text).end()) + 1 if HASH_LINE.search(text) else 0
    return text[marker:]


def is_hand_edited(path: Path) -> bool:
    """True when ``path`` carries a content hash that its body no longer matches."""
    if not path.exists():
        return False
    text = path.read_text()
    recorded = recorded_hash(text)
    return recorded is not None and recorded != content_hash(body_of(text))


def write_atomic(path: Path, text: str) -> bool:
    """Write ``text`` to ``path`` via a temporary file and rename; False when unchanged."""
    path = Path(path)
    if path.exists() and path.read_text() == text:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return True
