"""Results kept per object, by identity, for objects that cannot be dictionary keys (layers, graphs
and kernels are dataclasses compared by value, and hashing them would walk their expressions)."""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable


# layers whose derivations a process keeps (``kernel``, ``select``): every layer of the largest test
# module (48 written as users write them) fits, so that its second test over them derives nothing
# again; least recently used first out, a run over hundreds of layers stays bounded
LAYERS_KEPT = 64


class ByObject:
    """``compute(obj)`` once per object, for the latest ``maxsize`` objects.

    Each entry holds its object, so that the object's ``id`` cannot be taken by a new one while the
    entry lives; the least recently used entries go past the bound (a process that derives many
    layers, such as the test suite, would otherwise keep every result)."""

    def __init__(self, maxsize: int = 32):
        self.maxsize = maxsize
        self._entries: OrderedDict[int, tuple] = OrderedDict()

    def get(self, obj, compute: Callable):
        entry = self._entries.get(id(obj))
        if entry is None:
            entry = self._entries[id(obj)] = (obj, compute(obj))
            while len(self._entries) > self.maxsize:
                self._entries.popitem(last=False)
        self._entries.move_to_end(id(obj))
        return entry[1]

    def __len__(self) -> int:
        return len(self._entries)


def kept_on(owner, table: str, key, compute: Callable[[], object]):
    """``compute()`` once per ``key`` in the table ``table`` of ``owner``'s attributes: results that
    live as long as the object they are derived from (the refold's costs and substitutions on a
    derivation's ``Elements``, asked again for each form ``select`` tries)."""
    known = owner.__dict__.setdefault(table, {})
    if key not in known:
        known[key] = compute()
    return known[key]


__all__ = ["ByObject", "kept_on", "LAYERS_KEPT"]
