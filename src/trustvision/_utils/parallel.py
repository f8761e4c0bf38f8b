"""Units of per-image work that may run elsewhere and may be stored as they finish.

A unit is a call ``fn(model, *args, **kw)`` of a module-level function (so a Ray actor can import
it by name) on a chunk of images. :func:`run_units` runs the units in order, here or through an
executor's ``map(fn, calls)`` (:class:`trustvision.audit.distributed.RayPool`: every unit is
submitted at once and the actors share them), reads the ones already in ``cache`` (the audit's
scratch store: a resumed audit recomputes only the unit that was running) and stores each new
result as it arrives. Results come back in unit order whatever ran them, so the merged result is
the one-process result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

__all__ = ["Unit", "run_units", "local_map"]


@dataclass
class Unit:
    """One call ``fn(model, *args, **kw)``; ``key``: what names its result in a cache (None: never cached)."""

    args: tuple
    kw: dict = field(default_factory=dict)
    key: str | None = None


def local_map(model, fn: Callable, calls: Sequence[tuple[tuple, dict]]) -> Iterator[Any]:
    for args, kw in calls:
        yield fn(model, *args, **kw)


def run_units(model, fn: Callable, units: Sequence[Unit], *, executor: Any = None, cache: Any = None,
              encode: Callable[[Any], Any] | None = None, decode: Callable[[Any, Unit], Any] | None = None,
              ) -> Iterator[Any]:
    """The result of every unit, in order. ``executor``: anything with ``map(fn, calls)`` yielding
    the results of ``calls`` (``[(args, kw), ...]``) in order, each run as ``fn(model, *args, **kw)``
    on a copy of the model (None: here). ``cache`` (``get(key)`` / ``cache[key] = json``) with
    ``encode(result) -> json`` and ``decode(json, unit) -> result`` (None when the entry is
    unusable: recomputed)."""
    stored: list[Any] = [None] * len(units)
    use_cache = cache is not None and encode is not None and decode is not None
    if use_cache:
        for i, u in enumerate(units):
            if u.key is not None:
                hit = cache.get(u.key)
                stored[i] = None if hit is None else decode(hit, u)
    todo = [i for i in range(len(units)) if stored[i] is None]
    calls = [(units[i].args, units[i].kw) for i in todo]
    mapper = getattr(executor, "map", None)
    computed = iter(mapper(fn, calls) if mapper is not None else local_map(model, fn, calls))
    for i, u in enumerate(units):
        if stored[i] is not None:
            yield stored[i]
            continue
        out = next(computed)
        if use_cache and u.key is not None:
            try:
                cache[u.key] = encode(out)
            except ValueError:  # not JSON (e.g. NaN): not stored
                pass
        yield out
