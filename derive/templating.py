"""Where the Jinja2 templates are, the one environment that renders them, and the names the
generated code takes for itself (read off the templates, so a spec cannot shadow them).

The top-level ``templates/`` folder of a checkout is the source. A built wheel or sdist carries the
same files as package data, ``derive/templates/`` (``pyproject.toml`` maps the folder into the
package), so an installed ``derive`` finds them beside its own code.
"""
from __future__ import annotations

import ast
import functools
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent


def shipped(folder: str) -> Path:
    """``derive/<folder>`` where an installed package carries it, else the checkout's ``<folder>``."""
    inside = PACKAGE / folder
    return inside if inside.is_dir() else PACKAGE.parent / folder


TEMPLATES = shipped("templates")
# the templates of the Python modules ``derive generate`` writes
MODULE_TEMPLATES = ("function.py.j2", "steps.py.j2", "function_synced.py.j2")


@functools.cache
def environment():
    """One ``jinja2.Environment`` per process: it keeps each template compiled (and reloads one edited
    on disk). jinja2 is imported here: a run answered from the cache never needs it."""
    import jinja2

    return jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), undefined=jinja2.StrictUndefined,
                              keep_trailing_newline=True, trim_blocks=False, autoescape=False)


_PROBE = "derive_probe_"


class _Probe:
    """Stands in for every value a template is given: it prints as one identifier, iterates as two
    items (a loop body appears, and ``for a, b in ...`` unpacks), and is true (every branch shows)."""

    def __str__(self):
        return _PROBE

    def __iter__(self):
        return iter((_Probe(), _Probe()))

    def __getattr__(self, name):
        return _Probe()

    def __bool__(self):
        return True


def _probes(template: str) -> dict:
    """A probe for every variable ``template`` (and the templates it includes) reads."""
    from jinja2 import meta

    env, wanted, seen = environment(), set(), set()
    todo = [template]
    while todo:
        name = todo.pop()
        seen.add(name)
        tree = env.parse(env.loader.get_source(env, name)[0])
        wanted |= meta.find_undeclared_variables(tree)
        todo += [t for t in meta.find_referenced_templates(tree) if t and t not in seen]
    return {name: _Probe() for name in wanted}


@functools.cache
def generated_names() -> tuple[frozenset, frozenset]:
    """``(names, ctx_attributes)``: every identifier the generated modules' templates write themselves
    (imports, functions, locals, parameters, and the builtins they call: ``torch``, ``F``, ``saved``,
    ``tuple``, ``ValueError``, ``compile_kernels``...), and the attributes they set or read on ``ctx``
    (``sizes``, ``saved_tensors``...). A spec name among the first would shadow or be shadowed by
    generated code; a Constant, stored as ``ctx.<name>``, must not be one of the second.

    Each template is rendered with a probe in place of everything the spec provides, so what is left
    is the template's own code; a comprehension's loop variables are local to it and left out."""
    names, attributes = set(), set()
    for template in MODULE_TEMPLATES:
        source = environment().get_template(template).render(_probes(template))
        tree = ast.parse(source)
        local = {t.id for c in ast.walk(tree) if isinstance(c, ast.comprehension)
                 for t in ast.walk(c.target) if isinstance(t, ast.Name)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Name) and node.id not in local:
                names.add(node.id)
            elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.arg):
                names.add(node.arg)
            elif isinstance(node, ast.alias):
                names.add((node.asname or node.name).split(".")[0])
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "ctx":
                attributes.add(node.attr)
    names = {n for n in names if not n.startswith(_PROBE)}
    return frozenset(names), frozenset(a for a in attributes if not a.startswith(_PROBE))


__all__ = ["TEMPLATES", "environment", "generated_names", "shipped"]
