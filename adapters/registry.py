"""Adapter registry keyed by ``config.model_type``, open to third-party adapters.

Built-in adapters are referenced by import path and imported only when first needed. Third-party
packages add adapters without editing hieravid, in either of two ways:

* at runtime: ``hieravid.runtime.register_adapter(MyAdapter)`` (keys: ``MyAdapter.model_types``);
* declaratively, through the ``hieravid.adapters`` entry-point group in their ``pyproject.toml``::

      [project.entry-points."hieravid.adapters"]
      my_model_type = "my_package.hieravid_adapter:MyAdapter"

  The entry-point *name* is the ``model_type`` it serves; its value is an :class:`~hieravid.adapters.base.Adapter`
  subclass. Entry points are discovered lazily, the first time a model type is looked up that no
  explicit registration covers (or when :func:`supported_model_types` lists everything).

Explicit registrations win over entry points, which win over built-ins.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import warnings
from typing import TYPE_CHECKING

from hieravid.errors import AdapterError

if TYPE_CHECKING:
    from hieravid.adapters.base import Adapter

__all__ = [
    "ENTRY_POINT_GROUP",
    "AdapterRegistry",
    "get_adapter",
    "register_adapter",
    "registry",
    "supported_model_types",
    "unregister_adapter",
]

ENTRY_POINT_GROUP = "hieravid.adapters"

BUILTIN_ADAPTERS: dict[str, str] = {
    "llava_onevision": "hieravid.adapters.llava_onevision:LlavaOnevisionAdapter",
    "llava_next_video": "hieravid.adapters.llava_next_video:LlavaNextVideoAdapter",
    "qwen2_vl": "hieravid.adapters.qwen2_vl:Qwen2VLAdapter",
    "qwen2_5_vl": "hieravid.adapters.qwen2_vl:Qwen2_5_VLAdapter",
    "qwen3_vl": "hieravid.adapters.qwen3_vl:Qwen3VLAdapter",
    "qwen3_vl_moe": "hieravid.adapters.qwen3_vl:Qwen3VLAdapter",
    "internvl": "hieravid.adapters.internvl:InternVLAdapter",
    "qwen3_5": "hieravid.adapters.qwen3_5:Qwen3_5Adapter",
}

#: Video architectures of transformers that hieravid's adapter model cannot serve, and why (CONTRIBUTING.md,
#: "Architectures not supported and why"). Looking one up raises an AdapterError with the reason.
UNSUPPORTED_ARCHITECTURES: dict[str, str] = {
    "video_llama_3": (
        "VideoLLaMA3 (VideoLlama3ForConditionalGeneration) is not supported: its video processor compresses tokens "
        "by default (use_token_compression=True drops each patch whose pixels differ from the previous frame's by "
        "at most 0.1), so frames reach the language model with different token counts and without a common grid "
        "(the model gathers features with video_compression_mask), and the prompt puts a 'Time t s:' text block "
        "before each frame; hieravid needs a [frames, tokens per frame] grid per video, aligned across frames"
    ),
}


def _load_reference(reference: str) -> type[Adapter]:
    module_name, _, attribute = reference.partition(":")
    return getattr(importlib.import_module(module_name), attribute)


def _check_adapter_class(candidate: object, source: str) -> type[Adapter]:
    from hieravid.adapters.base import Adapter

    if not (isinstance(candidate, type) and issubclass(candidate, Adapter)):
        raise AdapterError(f"{source}: expected a subclass of hieravid.adapters.base.Adapter, got {candidate!r}")
    return candidate


class AdapterRegistry:
    """Maps ``model_type`` to an adapter class: explicit registrations, entry points, built-ins."""

    def __init__(self, builtins: dict[str, str] | None = None, group: str = ENTRY_POINT_GROUP) -> None:
        self._builtins = dict(BUILTIN_ADAPTERS if builtins is None else builtins)
        self._group = group
        self._explicit: dict[str, type[Adapter]] = {}
        self._entry_points: dict[str, importlib.metadata.EntryPoint] | None = None
        self._loaded_entry_points: dict[str, type[Adapter]] = {}

    # -------------------------------------------------------------- registration
    def register(
        self, adapter: type[Adapter], *, model_types: tuple[str, ...] | None = None, replace: bool = False
    ) -> type[Adapter]:
        """Register ``adapter`` for ``model_types`` (default: ``adapter.model_types``).

        Raises:
            AdapterError: not an Adapter subclass, no model type given, or a type already registered
                explicitly (pass ``replace=True`` to override).
        """
        adapter = _check_adapter_class(adapter, "register_adapter")
        types = tuple(model_types if model_types is not None else adapter.model_types)
        if not types:
            raise AdapterError(f"{adapter.__name__} declares no model_types; pass model_types=(...)")
        for model_type in types:
            current = self._explicit.get(model_type)
            if current is not None and current is not adapter and not replace:
                raise AdapterError(
                    f"model_type {model_type!r} already has adapter {current.__name__}; pass replace=True to override"
                )
        for model_type in types:
            self._explicit[model_type] = adapter
        return adapter

    def unregister(self, model_type: str) -> None:
        """Remove an explicit registration (built-ins and entry points are unaffected)."""
        self._explicit.pop(model_type, None)

    # -------------------------------------------------------------- discovery
    def _discover(self) -> dict[str, importlib.metadata.EntryPoint]:
        if self._entry_points is None:
            found: dict[str, importlib.metadata.EntryPoint] = {}
            try:
                entry_points = importlib.metadata.entry_points(group=self._group)
            except Exception as error:  # a broken environment must not break built-in adapters
                warnings.warn(f"hieravid: cannot read entry points of {self._group!r}: {error}", stacklevel=3)
                entry_points = ()
            for entry_point in entry_points:
                found.setdefault(entry_point.name, entry_point)
            self._entry_points = found
        return self._entry_points

    def refresh(self) -> None:
        """Forget discovered entry points (they are read again on the next lookup)."""
        self._entry_points = None
        self._loaded_entry_points.clear()

    def _from_entry_point(self, model_type: str) -> type[Adapter] | None:
        if model_type in self._loaded_entry_points:
            return self._loaded_entry_points[model_type]
        entry_point = self._discover().get(model_type)
        if entry_point is None:
            return None
        source = f"entry point {entry_point.name!r} = {entry_point.value!r} (group {self._group!r})"
        try:
            loaded = entry_point.load()
        except Exception as error:
            raise AdapterError(f"{source} failed to load: {type(error).__name__}: {error}") from error
        adapter = _check_adapter_class(loaded, source)
        self._loaded_entry_points[model_type] = adapter
        return adapter

    # -------------------------------------------------------------- lookup
    def get(self, model_type: str) -> type[Adapter]:
        """The adapter class for ``model_type``.

        Raises:
            AdapterError: no adapter for this model type; the message lists the supported ones.
        """
        if model_type in self._explicit:
            return self._explicit[model_type]
        adapter = self._from_entry_point(model_type)
        if adapter is not None:
            return adapter
        if model_type in self._builtins:
            return _check_adapter_class(_load_reference(self._builtins[model_type]), f"built-in {model_type!r}")
        if model_type in UNSUPPORTED_ARCHITECTURES:
            raise AdapterError(UNSUPPORTED_ARCHITECTURES[model_type])
        supported = ", ".join(self.supported_model_types())
        raise AdapterError(
            f"no hieravid adapter for model_type {model_type!r}. Supported model types: {supported}. "
            f"Third-party adapters register with hieravid.runtime.register_adapter or the {self._group!r} "
            "entry-point group"
        )

    def supported_model_types(self) -> tuple[str, ...]:
        """Every model type with an adapter: built-in, explicitly registered, or from entry points."""
        return tuple(sorted({*self._builtins, *self._explicit, *self._discover()}))


#: The process-wide registry :func:`hieravid.runtime.apply` consults.
registry = AdapterRegistry()


def register_adapter(
    adapter: type[Adapter], *, model_types: tuple[str, ...] | None = None, replace: bool = False
) -> type[Adapter]:
    """Register a third-party adapter class (usable as a class decorator); see :meth:`AdapterRegistry.register`."""
    return registry.register(adapter, model_types=model_types, replace=replace)


def unregister_adapter(model_type: str) -> None:
    """Remove an explicit registration made with :func:`register_adapter`."""
    registry.unregister(model_type)


def get_adapter(model_type: str) -> type[Adapter]:
    """The adapter class for ``model_type`` (raises :class:`~hieravid.errors.AdapterError` listing supported types)."""
    return registry.get(model_type)


def supported_model_types() -> tuple[str, ...]:
    """All model types hieravid can prune in this environment."""
    return registry.supported_model_types()
