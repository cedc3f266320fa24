"""``derive new NAME``: write a spec file to start a layer from, with its contract in comments.

The file is a working spec (it generates as it stands), so a new user edits a layer that already
derives instead of starting from a blank page.
"""
from __future__ import annotations

import keyword
from pathlib import Path

from .codegen import environment
from .errors import SpecError
from .files import write_atomic
from .spec import RESERVED
from .trace import SUPPORTED


def scaffold_text(name: str, path: str, out: str) -> str:
    """The scaffold's text for layer ``name`` saved at ``path``, regenerated into ``out``."""
    return environment().get_template("new_layer.py.j2").render(name=name, path=path, out=out,
                                                                supported=SUPPORTED)


def new_layer(name: str, folder: Path, out: str = "generated", force: bool = False) -> Path:
    """Write ``folder/<name>.py``; refuse a name that is not a usable identifier or an existing file."""
    if not name.isidentifier() or keyword.iskeyword(name) or name in RESERVED or name.startswith("_"):
        raise SpecError(name, "the layer name must be a Python identifier that is not a keyword or a "
                        f"reserved name ({', '.join(sorted(RESERVED))})", "pick a name such as my_layer")
    path = Path(folder) / f"{name}.py"
    if path.exists() and not force:
        raise SpecError(name, f"{path} already exists", "pick another name, or pass --force to overwrite it")
    write_atomic(path, scaffold_text(name, str(path), out))
    return path
