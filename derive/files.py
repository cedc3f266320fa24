"""Writing generated files safely: atomic replace, header hash, hand-edit detection."""
from __future__ import annotations

import hashlib
import os
import re
import tempfile
import time
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


# what write_atomic names its temporary files: .<name>.<writer's pid>.<random>.tmp
TEMPORARY = re.compile(r"^\..+\.(\d+)\.[A-Za-z0-9_]+\.tmp$")
_writes = 0


def _test_pause(where: str) -> None:
    """Test hook: ``DERIVE_TEST_PAUSE=where:k`` stops the k-th write at ``where`` ("inside": the
    temporary file is written, not yet renamed; "after": the file is in place) until the process is
    killed, so a test can kill a generation at a known point."""
    wanted, _, count = os.environ.get("DERIVE_TEST_PAUSE", "").partition(":")
    if wanted == where and count and int(count) == _writes:
        print(f"derive: paused {where} write {_writes}", flush=True)
        time.sleep(600)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def remove_temporaries(folder: Path) -> list[Path]:
    """Delete the temporary files a killed ``write_atomic`` left in ``folder`` (and below): those
    whose writer is no longer running. A generation running beside this one keeps its own."""
    folder = Path(folder)
    candidates = [(p, TEMPORARY.match(p.name)) for p in folder.rglob(".*.tmp") if p.is_file()] if folder.is_dir() else []
    stale = [p for p, m in candidates if m and (int(m.group(1)) == os.getpid() or not _running(int(m.group(1))))]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def write_atomic(path: Path, text: str) -> bool:
    """Write ``text`` to ``path`` via a temporary file and rename; False when unchanged.

    A reader (or a process killed mid-way) sees the old file or the new one, never a mix: the new
    text is complete and on disk before ``os.replace`` swaps it in."""
    global _writes
    path = Path(path)
    if path.exists() and path.read_text() == text:
        return False
    _writes += 1
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        _test_pause("inside")
        os.replace(tmp, path)
        _test_pause("after")
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return True
