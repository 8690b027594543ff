"""Name -> object registries for triggers, defenses, detectors (OpenBackdoor's shape, peft's care).

    DEFENSES = Registry("defense", base=Defense)

    @DEFENSES.register("w2s", "W2SDefense: ...")
    class W2SDefense(Defense):
        name = "w2s"

``register`` checks what it is given: a class must subclass the registry's ``base`` (an instance must
be one of it), an object whose own non-empty ``name`` differs from the registered name is refused,
and a name is registered once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from kdshield.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """A named family of implementations. ``@REG.register("name", description=...)`` adds one.

    ``base``: the type every registered class must subclass (None: anything). A registry created before
    its base class is defined (in the same module, above it) may pass a function returning it, e.g.
    ``base=lambda: Trigger``; it is called at the first registration.
    """

    def __init__(self, kind: str, base: type | Callable[[], type] | None = None):
        self.kind = kind
        self._base = base
        self._items: dict[str, T] = {}
        self._descriptions: dict[str, str] = {}

    @property
    def base(self) -> type | None:
        if self._base is not None and not isinstance(self._base, type):
            resolved = self._base()
            if not isinstance(resolved, type):
                raise TypeError(f"{self.kind} registry: base must be a class, got {resolved!r}")
            self._base = resolved
        return self._base

    def _check(self, name: str, obj) -> None:
        base = self.base
        if base is not None:
            if isinstance(obj, type):
                if not issubclass(obj, base):
                    raise TypeError(f"{self.kind} {name!r}: {obj.__qualname__} is not a subclass of "
                                    f"{base.__qualname__}")
            elif not isinstance(obj, base):
                raise TypeError(f"{self.kind} {name!r}: {obj!r} is not a {base.__qualname__}")
        own = getattr(obj, "name", None)
        if isinstance(own, str) and own and own != name:
            label = obj.__qualname__ if isinstance(obj, type) else repr(obj)
            raise ValueError(f"{self.kind} {name!r}: {label} calls itself {own!r}; register it under that "
                             "name or change its name attribute")

    def register(self, name: str, description: str = "") -> Callable[[T], T]:
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} names must be non-empty strings, got {name!r}")

        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._check(name, obj)
            self._items[name] = obj
            self._descriptions[name] = description or (getattr(obj, "__doc__", "") or "").strip().split("\n")[0]
            return obj

        return deco

    def get(self, name: str) -> T:
        if name not in self._items:
            raise ConfigError(f"unknown {self.kind} {name!r}; available: {', '.join(self.names())}")
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def describe(self) -> dict[str, str]:
        return {n: self._descriptions[n] for n in self.names()}

    def __contains__(self, name: str) -> bool:
        return name in self._items
