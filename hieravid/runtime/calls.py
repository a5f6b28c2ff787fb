"""Turning a forward call's positional arguments into keywords, so hooks can read and replace them by name."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

__all__ = ["KeywordBinder"]


class KeywordBinder:
    """Binds ``(args, kwargs)`` of one forward method to keywords only (its signature is read once)."""

    def __init__(self, forward: Callable[..., Any]) -> None:
        self.signature = inspect.signature(forward)

    def __call__(self, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        """All arguments by name; a ``**kwargs`` catch-all is flattened into the result."""
        if not args:
            return kwargs
        bound = dict(self.signature.bind_partial(*args, **kwargs).arguments)
        for name, parameter in self.signature.parameters.items():
            if parameter.kind is inspect.Parameter.VAR_KEYWORD and isinstance(bound.get(name), dict):
                bound.update(bound.pop(name))
        return bound
