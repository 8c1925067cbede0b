"""The one error every name registry of the toolkit raises, and the lookup that raises it.

This module imports nothing of the toolkit, so every package (``fusion`` and ``tasks`` included) may use it
without an import circle: nets, losses, metrics, datasets, tasks, estimators, aggregators and presets all
report an unknown name the same way.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import TypeVar

__all__ = ["UnknownNameError", "lookup"]

T = TypeVar("T")


class UnknownNameError(KeyError, ValueError):
    """A name that no registry entry has; the message lists the valid names (and a close match).

    It is both a ``KeyError`` (a failed lookup) and a ``ValueError`` (a bad argument value), so callers that
    caught either before keep working.
    """

    def __init__(self, kind: str, name: object, valid: Iterable[str]):
        self.kind, self.name, self.valid = kind, name, sorted(valid)
        close = difflib.get_close_matches(str(name), self.valid, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        super().__init__(f"unknown {kind} {name!r}{hint}; valid names: {', '.join(self.valid) or '(none)'}")

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


def lookup(registry: Mapping[str, T], kind: str, name: str) -> T:
    """``registry[name]``, or an :class:`UnknownNameError` naming ``kind`` and the valid names."""
    try:
        return registry[name]
    except (KeyError, TypeError):
        raise UnknownNameError(kind, name, registry) from None
