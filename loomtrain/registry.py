"""Named implementations of each kind of technique a YAML experiment picks by name.

One :class:`Registry` per kind lives in that kind's folder (``parallel/cp``, ``parallel/dp_sync``,
``trainer/models``, ...) next to the ``typing.Protocol`` its implementations follow. Built-in
implementations are registered as ``"module:attribute"`` strings and imported on first use (a name
check needs no import); plugins (``plugins:`` in YAML, :func:`load_plugins`) register objects.
Config validation, ``loomtrain plan``, the cost models and the one-line errors all take their list of
valid names from here: no code outside an implementation compares a strategy's name.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from typing import Any, Iterator

from loomtrain.errors import ConfigError


class RegistryError(ConfigError):
    """A name registered twice, or a plugin that cannot be imported (one line, exit 2 like config errors)."""


class Registry:
    """Implementations of one kind by name, in registration order (built-ins first)."""

    def __init__(self, field: str, kind: str, special: tuple[str, ...] = ()):
        self.field = field  # the config field that selects one, e.g. "parallel.cp_impl"
        self.kind = kind  # what an implementation is, for messages
        self.special = special  # names the field accepts that are not implementations (e.g. "auto")
        self._entries: dict[str, Any] = {}
        self._origin: dict[str, str] = {}

    def add(self, name: str, target: Any, origin: str | None = None) -> Any:
        """Register ``target`` (an object, or ``"module:attribute"`` imported on first use) as ``name``."""
        if not isinstance(name, str) or not name or name in self.special:
            raise RegistryError(f"{self.field}: cannot register {name!r} as a {self.kind} name")
        if name in self._entries:
            raise RegistryError(f"{self.field}: {self.kind} '{name}' is already registered (by "
                                f"{self._origin[name]}); register it under another name")
        self._entries[name] = target
        self._origin[name] = origin or (target.split(":")[0] if isinstance(target, str) else
                                        getattr(target, "__module__", "?"))
        return target

    def register(self, name: str):
        """Class decorator for kinds whose entries are classes: ``@DP_SYNC.register("grad_allreduce")``."""
        return lambda target: self.add(name, target)

    def remove(self, name: str) -> None:
        """Forget ``name`` (tests that register throw-away implementations)."""
        self._entries.pop(name, None)
        self._origin.pop(name, None)

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def choices(self) -> tuple[str, ...]:
        """What the config field accepts: the special names (e.g. "auto", "none"), then the registered ones."""
        return self.special + self.names()

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def get(self, name: str) -> Any:
        """The implementation named ``name``, or a one-line ConfigError listing the valid names."""
        if name not in self._entries:
            raise ConfigError(f"{self.field}: must be one of {', '.join(self.choices())}, got {name!r}")
        target = self._entries[name]
        if isinstance(target, str):
            module, attr = target.split(":")
            target = self._entries[name] = getattr(importlib.import_module(module), attr)
        return target

    def items(self) -> Iterator[tuple[str, Any]]:
        for name in self.names():
            yield name, self.get(name)


def load_plugins(modules) -> None:
    """Import the experiment's ``plugins`` (module names, or paths of .py files) so they register their
    implementations; one that fails to import is a one-line RegistryError naming it."""
    for spec in modules or ():
        if not isinstance(spec, str) or not spec.strip():
            raise RegistryError(f"plugins: expected module names or .py paths, got {spec!r}")
        if spec in _loaded:
            continue
        try:
            if spec.endswith(".py"):
                if not os.path.isfile(spec):
                    raise FileNotFoundError(f"no such file {spec}")
                name = "loomtrain_plugin_" + os.path.splitext(os.path.basename(spec))[0]
                loader = importlib.util.spec_from_file_location(name, spec)
                module = importlib.util.module_from_spec(loader)
                sys.modules[name] = module
                loader.loader.exec_module(module)
            else:
                importlib.import_module(spec)
        except RegistryError:
            raise
        except Exception as e:  # noqa: BLE001 - any failure of a user's module is reported the same way
            first = (str(e).splitlines() or [""])[0]
            raise RegistryError(f"plugins: cannot import '{spec}': {type(e).__name__}: {first}") from None
        _loaded.add(spec)


_loaded: set[str] = set()  # plugins already imported in this process (forked ranks inherit them)
