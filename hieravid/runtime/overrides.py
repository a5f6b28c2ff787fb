"""Install and remove an adapter's :class:`~hieravid.adapters.base.Speedup` list, exactly.

A speedup replaces one *instance* attribute (an entry in a module's or config's ``__dict__``) while a
handle is installed. :class:`Overrides` installs a list of them all or nothing and removes them exactly:

* install refuses, with :class:`~hieravid.errors.AdapterError` and before changing anything, an override
  that would not be instance-local or not exact to undo: a class as owner, an owner without ``__dict__``,
  a property or other data descriptor of the class (it would shadow the instance entry), a parameter,
  buffer or submodule of a module, the same attribute twice, and an attribute someone else already
  overrode (an instance attribute where the class should show through, or an instance value other than
  the one the speedup expects);
* if setting an attribute fails midway, everything set so far is undone before the error propagates;
* remove puts back the previous instance value, or deletes the instance attribute when there was none
  (so the class attribute shows through again). It is idempotent, and the list can be installed again.

``select_speedups(adapter, mode)`` picks an adapter's speedups for ``apply(..., speedups=mode)``:
``"exact"`` (default: the bit-identical ones), ``"all"`` (also the opt-in ones that change numerics within
a documented tolerance) or ``"none"`` (stock behaviour).
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal, get_args

from torch import nn

from hieravid.errors import AdapterError

if TYPE_CHECKING:
    from hieravid.adapters.base import Adapter, Speedup

__all__ = ["SPEEDUP_MODES", "Overrides", "SpeedupMode", "check_speedup_mode", "select_speedups"]

SpeedupMode = Literal["exact", "all", "none"]
SPEEDUP_MODES: tuple[str, ...] = get_args(SpeedupMode)


def check_speedup_mode(mode: str) -> SpeedupMode:
    """``mode`` if it is one of :data:`SPEEDUP_MODES`; raises ``ValueError`` otherwise."""
    if mode not in SPEEDUP_MODES:
        raise ValueError(f"speedups must be one of {', '.join(map(repr, SPEEDUP_MODES))}, got {mode!r}")
    return mode  # type: ignore[return-value]


def select_speedups(adapter: Adapter, mode: str) -> list[Speedup]:
    """The speedups of ``adapter`` that ``mode`` asks for (``"exact"``, ``"all"`` or ``"none"``)."""
    check_speedup_mode(mode)
    if mode == "none":
        return []
    speedups = list(adapter.speedups())
    return speedups if mode == "all" else [speedup for speedup in speedups if speedup.exact]


def _refusal(speedup: Speedup) -> str | None:
    """Why ``speedup`` cannot be installed as an exact, instance-local override (None: it can)."""
    from hieravid.adapters.base import ABSENT

    owner, attribute = speedup.owner, speedup.attribute
    if isinstance(owner, type):
        return "its owner is a class; overrides are per instance"
    storage = getattr(owner, "__dict__", None)
    if not isinstance(storage, dict):
        return f"{type(owner).__name__} instances have no __dict__"
    descriptor = inspect.getattr_static(type(owner), attribute, None)
    if hasattr(type(descriptor), "__set__") or hasattr(type(descriptor), "__delete__"):
        return (
            f"{speedup.target} is a {type(descriptor).__name__} of the class, which an instance attribute would not "
            "override; replace the instance attribute it reads instead"
        )
    if isinstance(owner, nn.Module):
        for table in ("_parameters", "_buffers", "_modules"):
            if attribute in getattr(owner, table, {}):
                return f"{speedup.target} is an entry of the module's {table}, not a plain attribute"
    if speedup.replaces is ABSENT:
        if attribute in storage:
            return (
                f"{speedup.target} is already overridden on this instance by someone else (e.g. another library's "
                "patch or accelerate's hooks); remove that override first or pass speedups='none'"
            )
    elif attribute not in storage:
        return f"{speedup.target} has no instance value to replace (expected {speedup.replaces!r})"
    elif storage[attribute] != speedup.replaces:
        return (
            f"{speedup.target} is {storage[attribute]!r}, not {speedup.replaces!r} as the speedup expects: someone "
            "else changed it"
        )
    return None


class Overrides:
    """A list of speedups, installed all or nothing and removed exactly (see the module docstring)."""

    def __init__(self, speedups: Sequence[Speedup] = ()) -> None:
        self.speedups: tuple[Speedup, ...] = tuple(speedups)
        # (speedup, the instance value it replaced or ABSENT), in installation order.
        self._undo: list[tuple[Speedup, Any]] = []

    @property
    def installed(self) -> tuple[Speedup, ...]:
        """The speedups currently installed."""
        return tuple(speedup for speedup, _ in self._undo)

    def install(self) -> None:
        """Install every speedup, or none: raises :class:`~hieravid.errors.AdapterError` before changing
        anything when one cannot be installed, and undoes partial work if setting an attribute fails."""
        from hieravid.adapters.base import ABSENT

        if self._undo:
            raise AdapterError("these speedups are already installed")
        seen: set[tuple[int, str]] = set()
        for speedup in self.speedups:
            key = (id(speedup.owner), speedup.attribute)
            if key in seen:
                raise AdapterError(f"speedup {speedup.name!r}: {speedup.target} is overridden twice in one list")
            seen.add(key)
            reason = _refusal(speedup)
            if reason is not None:
                raise AdapterError(f"cannot install speedup {speedup.name!r}: {reason}")
        done: list[tuple[Speedup, Any]] = []
        try:
            for speedup in self.speedups:
                storage = vars(speedup.owner)
                previous = storage.get(speedup.attribute, ABSENT)
                storage[speedup.attribute] = speedup.value
                done.append((speedup, previous))
        except BaseException:
            self._restore(done)
            raise
        self._undo = done

    def remove(self) -> None:
        """Restore every overridden attribute (the previous instance value, or none). Idempotent."""
        done, self._undo = self._undo, []
        self._restore(done)

    @staticmethod
    def _restore(done: list[tuple[Speedup, Any]]) -> None:
        from hieravid.adapters.base import ABSENT

        for speedup, previous in reversed(done):
            storage = vars(speedup.owner)
            current = storage.get(speedup.attribute, ABSENT)
            if current is not speedup.value:
                warnings.warn(
                    f"hieravid: {speedup.target} was changed while speedup {speedup.name!r} was installed; "
                    "restoring the value it had before apply()",
                    RuntimeWarning,
                    stacklevel=4,
                )
            if previous is ABSENT:
                storage.pop(speedup.attribute, None)
            else:
                storage[speedup.attribute] = previous

    def __repr__(self) -> str:
        names = ", ".join(speedup.name for speedup in self.speedups) or "none"
        return f"<Overrides {len(self._undo)}/{len(self.speedups)} installed: {names}>"
