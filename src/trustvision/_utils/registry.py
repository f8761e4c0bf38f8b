"""A small name -> factory registry shared by datasets, models, checks and explanation methods."""

from __future__ import annotations

import difflib
from typing import Callable, Generic, Iterator, TypeVar

from trustvision.errors import TrustVisionError

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to objects; unknown names raise a one-line :class:`TrustVisionError`."""

    def __init__(self, kind: str, list_hint: str):
        self.kind = kind
        self.list_hint = list_hint
        self._items: dict[str, T] = {}

    def register(self, name: str | None = None) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            key = name or getattr(obj, "__name__").replace("_", "-")
            if key in self._items:
                raise ValueError(f"{self.kind} {key!r} is registered twice")
            self._items[key] = obj
            return obj

        return deco

    def add(self, name: str, obj: T) -> None:
        self.register(name)(obj)

    def remove(self, name: str) -> None:
        """Unregister ``name`` (tests and interactive sessions); an unknown name is a no-op."""
        self._items.pop(name, None)

    def lookup(self, name: str) -> T | None:
        """The object registered as ``name``, or None (no error)."""
        return self._items.get(name)

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            close = difflib.get_close_matches(name, list(self._items), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise TrustVisionError(
                f"unknown {self.kind} {name!r}{hint}; {self.list_hint} lists the valid names"
            ) from None

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def names(self) -> list[str]:
        return sorted(self._items)
