"""One registry mechanism for every extension point (norms, optimizers, models, suites).

Each entry is an object (a class or a factory function) plus a frozen info record. Registering a
name twice is an error rather than a silent override, so two plugins can never shadow each other,
and looking up an unknown name raises a user-facing error that names the closest matches.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from normbench.errors import UnknownNameError

T = TypeVar("T")


@dataclass(frozen=True)
class EntryInfo:
    """What every registry entry states about itself."""

    name: str
    description: str = ""
    family: str = ""
    capabilities: frozenset[str] = field(default_factory=frozenset)

    def has(self, capability: str) -> bool:
        return capability in self.capabilities


@dataclass(frozen=True)
class Entry(Generic[T]):
    obj: T
    info: EntryInfo


class Registry(Generic[T]):
    """A named collection of entries of one kind (``kind`` is used in messages: "norm", ...)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def register(
        self,
        name: str,
        *,
        description: str = "",
        family: str = "",
        capabilities: frozenset[str] | set[str] | tuple[str, ...] = (),
    ) -> Callable[[T], T]:
        """Decorator registering ``obj`` under ``name``; raises ``ValueError`` on a duplicate."""

        def decorator(obj: T) -> T:
            self.add(
                name,
                obj,
                EntryInfo(
                    name, description or _first_doc_line(obj), family, frozenset(capabilities)
                ),
            )
            return obj

        return decorator

    def add(self, name: str, obj: T, info: EntryInfo) -> None:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = Entry(obj, info)

    def get(self, name: str) -> Entry[T]:
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(
                self.kind, name, self.closest(name), sorted(self._entries)
            ) from None

    def info(self, name: str) -> EntryInfo:
        return self.get(name).info

    def names(self, pattern: str = "*") -> list[str]:
        return sorted(n for n in self._entries if fnmatch.fnmatchcase(n, pattern))

    def closest(self, name: str, n: int = 3) -> list[str]:
        return difflib.get_close_matches(name, list(self._entries), n=n, cutoff=0.5)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry[T]]:
        return iter(self._entries[n] for n in self.names())


def _first_doc_line(obj: Any) -> str:
    doc = getattr(obj, "__doc__", None) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""
