"""The built-in layers, and loading layers from a user's file.

To add a built-in layer: write its spec in a module here and list it in ``BUILTIN``.
"""
from __future__ import annotations

import hashlib
import importlib.util
import linecache
import os
import sys
from pathlib import Path
from types import ModuleType

from ..errors import SpecError
from ..spec import Layer
from .activations import gelu_tanh, relu, sigmoid, softplus, tanh
from .attention import attention
from .batchnorm import batchnorm, batchnorm_biased
from .cross_entropy import cross_entropy
from .losses import (bce_with_logits, cross_entropy_ignore, cross_entropy_smooth, cross_entropy_temperature,
                     cross_entropy_weighted, mse)
from .makemore_mlp import makemore_mlp
from .makemore_model import makemore_model
from .mlp_parts import embedding, linear
from .normalization import batchnorm3d, layernorm, rmsnorm

BUILTIN: list[Layer] = [cross_entropy, batchnorm, batchnorm_biased, embedding, linear, tanh,
                        makemore_mlp, makemore_model,
                        layernorm, rmsnorm, batchnorm3d, cross_entropy_smooth, cross_entropy_temperature,
                        cross_entropy_weighted, cross_entropy_ignore, mse,
                        bce_with_logits, sigmoid, relu, softplus, gelu_tanh, attention]
FUSED: list[Layer] = [layer for layer in BUILTIN if layer.fused]


def by_name(name: str) -> Layer:
    for layer in BUILTIN:
        if layer.name == name:
            return layer
    known = ", ".join(layer.name for layer in BUILTIN)
    raise SpecError(name, "no built-in layer of that name", f"use one of: {known}, or --layer FILE.py[:name]")


def spec_files(argument: str) -> list[tuple[Path, str]]:
    """``(file, wanted)`` for a ``--layer`` argument: ``FILE.py``, ``FILE.py:name`` (wanted = name),
    or a folder ``DIR``: each of its ``*.py`` files that declares a layer (generated files left out)."""
    from ..files import ownership

    path, _, wanted = argument.partition(":")
    folder = Path(path)
    if folder.is_dir():
        if wanted:
            raise SpecError("", f"--layer {argument}: a folder takes every layer of its spec files",
                            f"pass --layer {path}, or --layer FILE.py:{wanted}", file=path)
        files = [p for p in sorted(folder.glob("*.py")) if p.is_file() and ownership(p) == "theirs"
                 and "@layer" in p.read_text(errors="replace")]
        if not files:
            raise SpecError("", "no spec file here (no *.py file with @layer)",
                            "pass the folder that holds your spec files, or a FILE.py", file=path)
        return [(p, "") for p in files]
    if not folder.is_file():
        raise SpecError("", f"no such file {path!r}", "pass the path of a Python file with @layer specs, or a folder of them",
                        file=path)
    return [(folder, wanted)]


def from_file(argument: str) -> list[Layer]:
    """Layers declared with ``@layer`` in ``FILE.py``; ``FILE.py:name`` picks one; ``DIR`` takes
    every spec file in the folder."""
    found = []
    for file, wanted in spec_files(argument):
        layers = [v for v in vars(_load(file)).values() if isinstance(v, Layer)]
        if wanted:
            layers = [layer for layer in layers if layer.name == wanted]
        if not layers and (wanted or file == Path(argument.partition(":")[0])):
            raise SpecError(wanted, "no @layer spec found" + (f" named {wanted!r}" if wanted else ""),
                            "decorate the forward function with @layer(...)", file=str(file))
        for layer in layers:
            layer.module = source_name(file)
            layer.spec_path = os.path.normpath(str(file))
        found += layers
    return found


def source_name(file: Path) -> str:
    """How generated files name a spec file (in their text, so the same whatever the command line):
    its path in its repository (from the folder holding ``.git``), or its name outside one."""
    resolved = Path(file).resolve()
    for folder in resolved.parents:
        if (folder / ".git").exists():
            return resolved.relative_to(folder).as_posix()
    return resolved.name


# spec file -> (digest of it and of the user's modules it imported, the module, those modules' names):
# a file is loaded once per process, and again when it or one of those modules changed
_LOADED: dict[Path, tuple[str, ModuleType, list[str]]] = {}


def _digest(files) -> str:
    h = hashlib.sha256()
    for f in sorted(map(str, files)):
        try:
            h.update(f.encode() + b"\0" + Path(f).read_bytes())
        except OSError:
            h.update(f.encode() + b"\0missing")
    return h.hexdigest()


def _load(file: Path) -> ModuleType:
    """Import a spec file by path, once per process, as ``python FILE`` would run it: its own folder
    first on the import path, so a helper module beside it imports. Whatever goes wrong while it
    loads is one line naming the file, the line and the fix; the user's modules it imports are
    recorded on its layers (``Layer.depends``: what its generated files depend on)."""
    resolved = file.resolve()
    if resolved in _LOADED:
        digest, module, imported = _LOADED[resolved]
        files = [resolved] + [getattr(sys.modules.get(name), "__file__", None) or name for name in imported]
        if _digest(files) == digest:
            return module
        for name in imported:  # changed since: import them afresh with the spec
            sys.modules.pop(name, None)
    linecache.checkcache()  # an error quotes the files as they are now
    module_name = f"_derive_user_{file.stem}_{hashlib.sha256(str(resolved).encode()).hexdigest()[:8]}"
    spec = importlib.util.spec_from_file_location(module_name, resolved)
    module = importlib.util.module_from_spec(spec)
    folder = str(resolved.parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    before = set(sys.modules)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except SpecError as e:
        if not e.file or Path(e.file).resolve() == resolved:
            e.file = str(file)
        raise
    except SyntaxError as e:  # IndentationError too
        where = str(file) if not e.filename or Path(e.filename).resolve() == resolved else e.filename
        raise SpecError("", f"{type(e).__name__}: {e.msg}", "correct the Python syntax", e.lineno, e.text or "",
                        file=where) from None
    except SystemExit as e:
        line, source = _spec_line(e, resolved)
        raise SpecError("", f"the file calls sys.exit({e.code!r}) while it loads",
                        "a spec file only declares layers: remove the exit, or put it under "
                        "if __name__ == '__main__':", line, source, file=str(file)) from None
    except ImportError as e:
        line, source = _spec_line(e, resolved)
        raise SpecError("", f"{type(e).__name__}: {e}", "install the module, or put it beside the spec file "
                        "(the spec's folder is on the import path)", line, source, file=str(file)) from None
    except Exception as e:
        line, source = _spec_line(e, resolved)
        raise SpecError("", f"the file raised {type(e).__name__} while it loads: {e}",
                        f"make `python {file}` run without an error", line, source, file=str(file)) from None
    from ..cache import user_files  # the user's modules: not the toolkit's, the standard library's or torch's

    imported = sorted(name for name in set(sys.modules) - before - {module_name}
                      if user_files({getattr(sys.modules[name], "__file__", None) or ""}))
    depends = frozenset({str(resolved)} | {sys.modules[name].__file__ for name in imported})
    for value in vars(module).values():
        if isinstance(value, Layer):
            value.depends = value.depends | depends
    _LOADED[resolved] = (_digest(depends), module, imported)
    return module


def _spec_line(error: BaseException, spec: Path) -> tuple[int | None, str]:
    """The spec file's own line where ``error`` came from (the deepest frame in that file)."""
    line, tb = None, error.__traceback__
    while tb is not None:
        if Path(tb.tb_frame.f_code.co_filename).resolve() == spec:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line, linecache.getline(str(spec), line) if line else ""
