"""Name -> callable registries used by configs (advantage estimators, policy losses, rewards)."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

F = TypeVar("F", bound=Callable)


class Registry(Generic[F]):
    """A mapping from the names configs use to callables that share one signature.

    Registering a name twice raises; looking up an unknown name raises with the valid names listed. A name
    with a dot or a colon that is not registered is imported (``"pkg.module:fn"`` or ``"pkg.module.fn"``), so a
    user's function plugs in without registering. ``needs`` declares what a callable reads beyond the
    essentials (for advantage estimators: ``values``, ``group_index``, ``baseline_scores``); the trainer builds
    a critic, groups or greedy baselines from that. An imported function declares it as a ``needs`` attribute.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, F] = {}
        self._needs: dict[str, frozenset[str]] = {}

    def register(self, name: str, needs: Iterable[str] = ()) -> Callable[[F], F]:
        def decorator(fn: F) -> F:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = fn
            self._needs[name] = frozenset(needs)
            return fn

        return decorator

    def get(self, name: str) -> F:
        if name in self._items:
            return self._items[name]
        valid = ", ".join(sorted(self._items))
        if isinstance(name, str) and ("." in name or ":" in name):
            module, _, attr = name.partition(":") if ":" in name else name.rpartition(".")
            try:
                fn = getattr(importlib.import_module(module), attr)
            except (ImportError, AttributeError, ValueError) as e:
                raise ValueError(f"unknown {self.kind} {name!r}: neither registered nor importable "
                                 f"({type(e).__name__}: {e}); valid names: {valid}") from None
            if not callable(fn):
                raise ValueError(f"{self.kind} {name!r} is not callable")
            return fn
        raise ValueError(f"unknown {self.kind} {name!r}; valid names: {valid}")

    def needs(self, name: str) -> frozenset[str]:
        """What the callable named ``name`` needs (see the class docstring)."""
        if name in self._needs:
            return self._needs[name]
        return frozenset(getattr(self.get(name), "needs", ()))

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        """Registered, or an import path that resolves to a callable."""
        if name in self._items:
            return True
        try:
            self.get(name)  # type: ignore[arg-type]
        except ValueError:
            return False
        return True

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))
