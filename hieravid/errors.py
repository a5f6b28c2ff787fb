"""Exception types raised by hieravid. Every message names the problem and what was expected."""

from __future__ import annotations


class HieravidError(Exception):
    """Base class of every error hieravid raises on bad input."""


class PolicyError(HieravidError, ValueError):
    """A policy file or mapping is invalid (unknown key, wrong type, out-of-range value, ...)."""


class PlanError(HieravidError, ValueError):
    """A policy cannot be compiled for a model (stage beyond depth, nothing kept, ...)."""


class SpecError(HieravidError, ValueError):
    """A model spec cannot be found or derived (unknown name, unreadable config, ...)."""


class AdapterError(HieravidError, RuntimeError):
    """An adapter cannot be applied to a model (unsupported type, already applied, ...)."""
