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


def _own_names(scope: ast.AST) -> set:
    """The names ``scope`` (a module or a function) binds or reads itself, not those of the functions
    and classes nested in it (their own scopes), and not a comprehension's loop variables."""
    names, todo = set(), list(ast.iter_child_nodes(scope))
    if isinstance(scope, (ast.FunctionDef, ast.Lambda)):
        names |= {a.arg for a in ast.walk(scope.args) if isinstance(a, ast.arg)}
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
            todo += node.decorator_list  # evaluated in this scope
            continue
        if isinstance(node, ast.Lambda):
            continue
        if isinstance(node, ast.comprehension):
            todo += [node.iter, *node.ifs]  # its target is the comprehension's own
            continue
        if isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.alias):
            names.add((node.asname or node.name).split(".")[0])
        todo += list(ast.iter_child_nodes(node))
    return names


def _scopes(tree: ast.AST):
    """Every function (and lambda) of ``tree``, with the module itself first."""
    yield tree
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.Lambda)):
            yield node


@functools.cache
def generated_names() -> tuple[frozenset, frozenset]:
    """``(names, ctx_attributes)``: the identifiers a spec name could clash with in the generated
    modules, and the attributes they set or read on ``ctx`` (``sizes``, ``saved_tensors``...). A
    Constant, stored as ``ctx.<name>``, must not be one of the second.

    Each template is rendered with a probe in place of everything the spec provides, so what is left
    is the template's own code. A spec's names (its inputs, values, sizes, the layer's name) live at
    the module's level and in the functions the probe reaches: there a name of the spec's and one
    of the template's share a scope (``labels`` as an input, where a function reads ``labels``).
    The names of helper functions the spec never reaches (``_function_jvp``'s ``tangent``) are
    their own; every module-level name, and every builtin any function reads, is shared."""
    import builtins

    names, attributes = set(), set()
    for template in MODULE_TEMPLATES:
        source = environment().get_template(template).render(_probes(template))
        tree = ast.parse(source)
        for scope in _scopes(tree):
            own = _own_names(scope)
            if scope is tree or any(n.startswith(_PROBE) for n in own):
                names |= own
            names |= {n for n in own if hasattr(builtins, n)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "ctx":
                attributes.add(node.attr)
    names = {n for n in names if not n.startswith(_PROBE)}
    return frozenset(names), frozenset(a for a in attributes if not a.startswith(_PROBE))


__all__ = ["TEMPLATES", "environment", "generated_names", "shipped"]
