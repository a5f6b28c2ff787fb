"""Registries that bind a frozen config class to the operator that runs it (as torchao's ``quantize_`` does).

The config class *is* the contract: a policy holds config objects, the plan carries them, and the runtime runs
``registry.lookup(config)(..., config)``. Looking up walks the config's class hierarchy, so a subclass of a
registered config runs its parent's operator unless it registers its own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

from hieravid.errors import HieravidError

__all__ = ["OperatorRegistry", "UnregisteredOperatorError"]

F = TypeVar("F", bound=Callable[..., Any])


class UnregisteredOperatorError(HieravidError, LookupError):
    """A config class has no operator bound to it."""


class OperatorRegistry(Generic[F]):
    """Operators by config class, for one family (``what``: "selector", "input-level operator").

    Args:
        what: the family's name in messages.
        base: the config base class every registered class must derive from.
        decorator: the public decorator's name, for messages.
    """

    def __init__(self, what: str, base: type, decorator: str) -> None:
        self.what = what
        self.base = base
        self.decorator = decorator
        self._operators: dict[type, F] = {}

    def register(self, config_class: type) -> Callable[[F], F]:
        """Decorator binding ``config_class`` to the decorated operator (re-registering replaces)."""
        if not (isinstance(config_class, type) and issubclass(config_class, self.base)):
            raise TypeError(
                f"{self.decorator} takes a subclass of {self.base.__module__}.{self.base.__qualname__}, "
                f"got {config_class!r}"
            )

        def bind(operator: F) -> F:
            self._operators[config_class] = operator
            return operator

        return bind

    def lookup(self, config: Any) -> F:
        """The operator bound to ``config``'s class (or the nearest registered base class)."""
        for cls in type(config).__mro__:
            operator = self._operators.get(cls)
            if operator is not None:
                return operator
        kind = getattr(config, "kind", "?")
        raise UnregisteredOperatorError(
            f"{self.what} config {type(config).__name__} (kind {kind!r}) has no operator; bind one with "
            f"@{self.decorator}({type(config).__name__}) in the module that defines it"
        )

    def __contains__(self, config_class: object) -> bool:
        return config_class in self._operators

    def config_classes(self) -> tuple[type, ...]:
        """Every config class with a bound operator, in registration order."""
        return tuple(self._operators)
