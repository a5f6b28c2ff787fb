"""The adapter base class: everything model-specific the runtime needs, and nothing else.

An adapter answers four questions about one architecture:

1. *Where are the modules?* The multimodal module (the one that receives ``input_ids`` and the
   pixel inputs and calls the language model), the language model (the decoder stack that receives
   ``inputs_embeds``, ``attention_mask``, ``position_ids`` and the KV cache) and its decoder layers
   with their attention, query/key projections, post-attention norm and MLP.
2. *Where is the video?* From the multimodal call (``input_ids`` and the pixel inputs' shapes or grids,
   or the pre-encoded video features and position ids that ``generate`` passes instead)
   and the embeddings the language model actually receives, one :class:`VideoLayout` per sample: a
   ``[F, P]`` map of frame tokens into the sequence and the positions of layout newline tokens.
3. *What positions would the model use?* When a caller passes no ``position_ids``, the positions the
   language model would compute itself (so that pruning can gather them, never renumber them).
4. *What are the query and key of a stage layer?* From the outputs of the query/key projections and the
   layer's rotary embeddings, the post-RoPE query rows of the last prompt tokens and all keys, exactly as
   the attention module computes them (used for the cheap last-query relevance score).

The runtime (:mod:`hieravid.runtime`) owns hooks, per-request state, masks and the KV cache; an adapter
never installs hooks and keeps no state besides a reference to its model.

An adapter may also declare *speedups* (:meth:`Adapter.speedups`): instance attributes of the model's
modules or configs to replace while a handle is installed (e.g. a faster, bit-identical replacement for
an upstream method). It only describes them (:class:`Speedup`); the runtime installs and removes them
(:mod:`hieravid.runtime.overrides`).

Third-party adapters subclass :class:`Adapter`, set :attr:`Adapter.model_types`, and are registered
with :func:`hieravid.runtime.register_adapter` or through the ``hieravid.adapters`` entry-point group
(see ``CONTRIBUTING.md``).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from hieravid.compat import video_encoder_output
from hieravid.errors import AdapterError

__all__ = [
    "ABSENT",
    "Adapter",
    "CompiledForward",
    "MultimodalCall",
    "Speedup",
    "VideoGeometry",
    "VideoInputs",
    "VideoLayout",
    "compile_speedup",
    "config_value",
]


def config_value(config: Any, key: str, default: Any = None) -> Any:
    """``config[key]`` for a ``config.json`` mapping, ``config.key`` for a transformers config object."""
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


@dataclass(frozen=True)
class VideoGeometry:
    """How a video enters one architecture's language model, known from its config alone (the planner's view).

    Attributes:
        frames: frames as the language model sees them (Qwen2-VL: temporal patches of ``frames_per_step``).
        rows, cols: tokens per frame row and column.
        newline_layout: ``"none"``, ``"per_row"``, ``"per_frame"`` or ``"per_video"``.
        query_rows: last prompt rows whose attention measures relevance by default (Qwen2-VL: 4).
        frames_per_step: video frames sampled per language-model frame (Qwen2-VL's temporal patch: 2).
        first_stage_layer: earliest decoder layer a frame-level stage may prune at (Qwen3-VL: the first layer
            after its deepstack injections; 0 for architectures that allow a stage anywhere).
        recurrent_layers: decoder layers whose token mixer is a recurrence (Qwen3.5's linear attention), where a
            stage has no attention to score relevance with (see :meth:`Adapter.recurrent_layers`).
    """

    frames: int
    rows: int
    cols: int
    newline_layout: str = "none"
    query_rows: int = 1
    frames_per_step: int = 1
    first_stage_layer: int = 0
    recurrent_layers: tuple[int, ...] = ()


@dataclass
class VideoInputs:
    """Pixel inputs of one video for a model, and how many placeholder tokens the prompt needs.

    Attributes:
        tensors: keyword arguments for the model (``pixel_values_videos``, plus ``video_grid_thw`` for Qwen2-VL).
        num_placeholders: copies of the video token the prompt must hold.
    """

    tensors: dict[str, Any]
    num_placeholders: int


def processor_setting(processor_config: Mapping[str, Any], key: str, default: Any) -> Any:
    """A video processor setting (``video_preprocessor_config.json``), or ``default`` when absent or null."""
    value = processor_config.get(key)
    return default if value is None else value


class FramePixels:
    """Frames ``[T, H, W, 3]`` uint8 as the float tensor ``[T, 3, H, W]`` a processor resizes and normalises."""

    def __init__(self, frames: Any, processor_config: Mapping[str, Any]) -> None:
        import numpy as np

        clip_mean, clip_std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
        self.mean = torch.tensor(processor_setting(processor_config, "image_mean", clip_mean), dtype=torch.float32)
        self.std = torch.tensor(processor_setting(processor_config, "image_std", clip_std), dtype=torch.float32)
        self.rescale = float(processor_setting(processor_config, "rescale_factor", 1 / 255))
        self.video = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
        self.height, self.width = self.video.shape[-2:]

    def resized(self, height: int, width: int) -> Tensor:
        """Bicubic, antialiased resize to ``height × width`` in the 0..255 range (the frames when unchanged)."""
        if (height, width) == (self.height, self.width):
            return self.video
        resized = torch.nn.functional.interpolate(
            self.video, size=(height, width), mode="bicubic", align_corners=False, antialias=True
        )
        return resized.round().clamp(0, 255)

    def normalised(self, pixels: Tensor) -> Tensor:
        return (pixels * self.rescale - self.mean[:, None, None]) / self.std[:, None, None]


class _Absent:
    """The type of :data:`ABSENT` (one instance)."""

    def __repr__(self) -> str:
        return "ABSENT"


ABSENT: Any = _Absent()
"""No instance attribute: the owner reads the attribute from its class."""


@dataclass(frozen=True, eq=False)
class Speedup:
    """Replace attribute ``attribute`` of ``owner`` with ``value`` while a handle is installed.

    The override is instance-local: it is an entry in ``owner.__dict__`` (a module *instance* or a config
    object, never a class), so other instances never see it, and removing it restores the owner exactly —
    the previous instance value, or no instance attribute at all, so that the class attribute shows
    through again. :mod:`hieravid.runtime.overrides` installs and removes speedups; adapters only
    describe them (:meth:`Adapter.speedups`).

    Attributes:
        name: short identifier, e.g. ``"onevision-pooling-channels-last"``.
        owner: the module instance or config object whose attribute is replaced.
        attribute: the instance attribute to set (never a property or another data descriptor of the
            class: set the instance storage it reads instead).
        value: what the attribute holds while installed (a bound method, a function, a config value).
        exact: True when outputs stay bit-identical to the stock model (``apply``'s default
            ``speedups="exact"`` installs these); False for opt-in speedups that change numerics within a
            documented tolerance (``speedups="all"``).
        reason: one line: what is replaced, why it is faster, and why it is exact (or how far it is not).
        replaces: :data:`ABSENT` (default) when the class provides the attribute and the owner must not
            hold its own (then an existing instance attribute means someone else overrode it, and
            installation is refused); otherwise the instance value the speedup expects to replace
            (config values, which live on the instance), compared with ``==``.
    """

    name: str
    owner: Any = field(repr=False)
    attribute: str
    value: Any = field(repr=False)
    exact: bool
    reason: str
    replaces: Any = ABSENT

    def __post_init__(self) -> None:
        if isinstance(self.owner, type):
            raise AdapterError(
                f"speedup {self.name!r}: the owner must be a module instance or a config object, not the class "
                f"{self.owner.__name__} (class attributes are shared by every instance)"
            )
        if not self.attribute.isidentifier():
            raise AdapterError(f"speedup {self.name!r}: {self.attribute!r} is not an attribute name")

    @property
    def target(self) -> str:
        """``"OwnerClass.attribute"``, for messages."""
        return f"{type(self.owner).__name__}.{self.attribute}"


@dataclass(frozen=True)
class VideoLayout:
    """Where one sample's video sits in the sequence the language model receives.

    Attributes:
        frame_index: ``[F, P]`` int64 sequence positions of the video's content tokens, frame-major,
            raster order (row by row) inside a frame. ``frame_index[f, p]`` is token ``p`` of frame ``f``.
        newline_index: ``[n]`` int64 sequence positions of layout newline tokens (structure, not content).
        rows: token rows per frame.
        cols: token columns per frame (``rows * cols == P``).
        newline_layout: ``"none"``, ``"per_row"``, ``"per_frame"``, ``"per_video"`` or a ``+``-joined
            combination (e.g. ``"per_row+per_video"``), as observed in the sequence.
    """

    frame_index: Tensor
    newline_index: Tensor
    rows: int
    cols: int
    newline_layout: str = "none"
    known_span: tuple[int, int] | None = field(default=None, repr=False, compare=False)
    """The span when the adapter knows it on the host (read without a device sync); None computes it."""

    @property
    def frames(self) -> int:
        """Frames as the language model sees them (Qwen2-VL: temporal patches)."""
        return int(self.frame_index.shape[0])

    @property
    def tokens_per_frame(self) -> int:
        return int(self.frame_index.shape[1])

    @property
    def content_tokens(self) -> int:
        return self.frames * self.tokens_per_frame

    @property
    def video_tokens(self) -> int:
        """N_v: content tokens plus newline tokens."""
        return self.content_tokens + int(self.newline_index.numel())

    @property
    def span(self) -> tuple[int, int]:
        """``[start, end)`` of the sequence positions the video occupies."""
        if self.known_span is not None:
            return self.known_span
        positions = torch.cat([self.frame_index.flatten(), self.newline_index.flatten()])
        low, high = torch.stack([positions.min(), positions.max()]).tolist()  # one host sync
        return int(low), int(high) + 1

    def describe(self) -> dict[str, Any]:
        """Plain-Python summary (for traces and ``last_request``)."""
        return {
            "frames": self.frames,
            "rows": self.rows,
            "cols": self.cols,
            "newline_layout": self.newline_layout,
            "content_tokens": self.content_tokens,
            "newline_tokens": int(self.newline_index.numel()),
            "video_tokens": self.video_tokens,
            "span": self.span,
        }


@dataclass
class MultimodalCall:
    """What the multimodal module was called with (recorded by a forward pre-hook, read by the adapter).

    Attributes:
        input_ids: ``[B, S]`` token ids, or None when the caller passed ``inputs_embeds``.
        video_mask: ``[B, S]`` bool, True at video placeholder positions (from ``input_ids`` and the
            configured video token id, or from the placeholder embedding when ids are absent).
        kwargs: the call's keyword arguments (pixel inputs, grids, masks, ...), by reference. With
            transformers >= 5.24, ``generate`` encodes the video before the forward: the call then holds
            ``mm_encoder_outputs`` (see :attr:`encoded_video`) instead of ``pixel_values_videos``, and no
            other argument the encoder consumed (Qwen2-VL: no ``video_grid_thw``).
    """

    input_ids: Tensor | None
    video_mask: Tensor | None
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    @property
    def encoded_video(self) -> Any:
        """The video encoder's output passed in ``mm_encoder_outputs["video"]`` (transformers >= 5.24), or None."""
        return video_encoder_output(self.kwargs)


class CompiledForward:
    """A module's class ``forward`` under ``torch.compile``, compiled on its first call (``torch.compile``'s
    defaults; a new input shape recompiles, then shapes become dynamic). Removing the override restores
    eager execution: the compiled code is only entered through this object."""

    def __init__(self, module: nn.Module, **options: Any) -> None:
        import functools

        self._forward = type(module).forward.__get__(module, type(module))
        self._options = options
        self._compiled: Any = None
        functools.update_wrapper(self, self._forward)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._compiled is None:
            self._compiled = torch.compile(self._forward, **self._options)
        return self._compiled(*args, **kwargs)


def compile_speedup(module: nn.Module, what: str) -> Speedup:
    """The opt-in (not exact) speedup that runs ``module``'s forward through ``torch.compile``."""
    return Speedup(
        name="compile-vision-tower",
        owner=module,
        attribute="forward",
        value=CompiledForward(module),
        exact=False,
        reason=f"torch.compile of the {what}'s forward fuses its elementwise work; fused kernels round "
        "differently (features within 1e-5 relative error in fp32 on CPU; SigLIP in bf16 on an H200: 1.4e-2)",
    )


class Adapter:
    """Base class of per-architecture adapters (see the module docstring for the contract).

    Subclasses must set :attr:`model_types` and implement :meth:`locate_videos`; most architectures
    built like transformers' Llama/Qwen2 families need nothing else.
    """

    #: ``config.model_type`` values this adapter handles.
    model_types: ClassVar[tuple[str, ...]] = ()
    #: Query rows averaged for relevance when a policy leaves ``relevance.query_rows`` unset.
    default_query_rows: ClassVar[int] = 1
    #: Video frames sampled when a caller does not say (``hieravid run``'s default, the planner's default).
    default_sampled_frames: ClassVar[int] = 32
    #: Dimensions (before the sequence axis) of the position ids the language model takes:
    #: 0 for ``[B, S]`` 1-D RoPE, 3 for Qwen2-VL's ``[3, B, S]`` M-RoPE.
    position_rows: ClassVar[int] = 0

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    # ------------------------------------------------------------------ geometry (no weights needed)
    @classmethod
    def video_geometry(
        cls, config: Any, *, sampled_frames: int | None = None, processor_config: Mapping[str, Any] | None = None
    ) -> VideoGeometry:
        """The video layout this architecture builds from ``sampled_frames`` frames, from its config alone.

        Args:
            config: the model's config (a transformers config object or a ``config.json`` mapping).
            sampled_frames: frames sampled from the video (default :attr:`default_sampled_frames`).
            processor_config: the checkpoint's (video) preprocessor settings, when known (resize target).

        Raises:
            SpecError: the config does not describe a video model this adapter can read.
        """
        raise NotImplementedError(f"{cls.__name__} does not describe its video geometry")

    @classmethod
    def inputs_geometry(cls, config: Any, inputs: Mapping[str, Any]) -> VideoGeometry:
        """The geometry of a prepared request's (first) video, from its pixel inputs and the config."""
        raise NotImplementedError(f"{cls.__name__} does not read the geometry of prepared inputs")

    @classmethod
    def preprocess_video(cls, frames: Any, processor_config: Mapping[str, Any], config: Any) -> VideoInputs:
        """Resize, rescale and normalise frames ``[T, H, W, 3]`` (uint8) as the model's video processor would,
        without torchvision (which transformers' video processors need); resampling can differ from the
        processor's in the last bits."""
        raise AdapterError(
            f"{cls.__name__}: no built-in video preprocessing; install torchvision so that the model's own video "
            "processor can be used"
        )

    @classmethod
    def _check_video_config(cls, config: Any) -> Any:
        """The config's vision config; a clear error for configs that are not this adapter's video models."""
        from hieravid.errors import SpecError

        vision = config_value(config, "vision_config")
        token = config_value(config, "video_token_id", config_value(config, "video_token_index"))
        if vision is None or token is None:
            missing = "vision_config" if vision is None else "video_token_id"
            raise SpecError(
                f"config of model_type {config_value(config, 'model_type')!r} has no {missing}: not a video model "
                f"{cls.__name__} can prune"
            )
        return vision

    # ------------------------------------------------------------------ modules
    @property
    def config(self) -> Any:
        """The top-level model config."""
        return self.model.config

    def multimodal_module(self) -> nn.Module:
        """The module that receives ``input_ids`` plus pixel inputs and calls the language model."""
        inner = getattr(self.model, "model", None)
        if inner is not None and hasattr(inner, "language_model"):
            return inner
        if hasattr(self.model, "language_model"):
            return self.model
        raise AdapterError(f"{type(self.model).__name__}: cannot find the multimodal module (no .language_model)")

    def language_model(self) -> nn.Module:
        """The decoder stack the runtime prunes inside."""
        return self.multimodal_module().language_model

    def text_config(self) -> Any:
        """The language model's config (shared by its layers)."""
        return self.language_model().config

    def decoder_layers(self) -> Sequence[nn.Module]:
        layers = getattr(self.language_model(), "layers", None)
        if layers is None:
            raise AdapterError(f"{type(self.language_model()).__name__}: no .layers decoder list")
        return layers

    def attention(self, layer: nn.Module) -> nn.Module:
        return layer.self_attn

    def query_key_projections(self, layer: nn.Module) -> tuple[nn.Module, nn.Module]:
        """The modules whose outputs are the (pre-RoPE) queries and keys of ``layer``'s attention."""
        attention = self.attention(layer)
        return attention.q_proj, attention.k_proj

    def post_attention_norm(self, layer: nn.Module) -> nn.Module:
        """The norm whose input is the post-attention residual stream (residual + attention output)."""
        return layer.post_attention_layernorm

    def mlp(self, layer: nn.Module) -> nn.Module:
        return layer.mlp

    def recurrent_layers(self) -> frozenset[int]:
        """Decoder layers whose token mixer is a recurrence (linear attention) rather than attention (default: none).

        Such a layer takes a 2-D ``[B, S]`` padding mask (or None) instead of a causal mask and zeroes masked rows,
        which is neutral only before a sample's first real row: the runtime then puts padding slots first and gives
        these layers the 2-D mask of their coordinate system. They have no attention to score relevance with, so an
        adapter must refuse stages placed on them (in :meth:`query_key_projections`).
        """
        return frozenset()

    def vision_tower(self) -> nn.Module | None:
        """The vision encoder (SigLIP, Qwen2-VL's ViT), or None when the architecture has none or it cannot be found."""
        return None

    def speedups(self) -> list[Speedup]:
        """Speedups of this architecture for this model instance (default: none).

        Return only speedups valid for *this* model: an ``exact`` speedup must give bit-identical outputs on
        every input the model accepts (check the classes and config values it relies on, and leave it out
        otherwise); one that is not exact is only installed with ``apply(..., speedups="all")``. Building
        the list must be cheap and must not change the model (a value that needs work, e.g. compilation,
        does it lazily on first use).
        """
        return []

    def validate(self) -> None:
        """Raise :class:`~hieravid.errors.AdapterError` if the model cannot be pruned by this adapter."""
        layers = self.decoder_layers()
        if len(layers) == 0:
            raise AdapterError(f"{type(self.model).__name__}: the language model has no decoder layers")
        for name in ("self_attn", "mlp", "post_attention_layernorm"):
            if not hasattr(layers[0], name):
                raise AdapterError(
                    f"{type(self.model).__name__}: decoder layers have no .{name}; override the adapter's accessors"
                )
        layer_types = getattr(self.text_config(), "layer_types", None) or ()
        unsupported = sorted(set(layer_types) - {"full_attention"})
        if unsupported:
            raise AdapterError(
                f"{type(self.model).__name__}: layer types {unsupported} are not supported (hieravid rebuilds full "
                "causal masks in pruned coordinates; sliding-window layers would see a different window)"
            )

    # ------------------------------------------------------------------ video
    def video_token_id(self) -> int:
        token_id = getattr(self.config, "video_token_id", None)
        if token_id is None:
            token_id = getattr(self.config, "video_token_index", None)
        if token_id is None:
            raise AdapterError(f"{type(self.model).__name__}: config has no video_token_id")
        return int(token_id)

    def video_mask(self, input_ids: Tensor | None, inputs_embeds: Tensor | None) -> Tensor | None:
        """``[B, S]`` bool mask of video placeholder positions in the multimodal call's inputs."""
        token_id = self.video_token_id()
        if input_ids is not None:
            return input_ids == token_id
        if inputs_embeds is None:
            return None
        embedding = self.multimodal_module().get_input_embeddings()
        placeholder = embedding(torch.full((), token_id, dtype=torch.long, device=inputs_embeds.device))
        return (inputs_embeds == placeholder.to(inputs_embeds.dtype)).all(-1)

    def locate_videos(self, call: MultimodalCall, inputs_embeds: Tensor) -> list[VideoLayout | None]:
        """One :class:`VideoLayout` per sample (None for a sample without video).

        Args:
            call: the recorded multimodal call of this forward.
            inputs_embeds: ``[B, S, D]`` the embeddings the language model receives (video features
                already scattered in), in the same coordinates as ``call.video_mask``.
        """
        raise NotImplementedError

    @staticmethod
    def video_spans(video_mask_row: Tensor) -> list[tuple[int, int]]:
        """Maximal runs ``[start, end)`` of True in a 1-D mask."""
        return Adapter.spans_from_edges(Adapter.span_edges(video_mask_row).cpu())  # one host sync

    @staticmethod
    def single_span(sample: int, spans: list[tuple[int, int]]) -> tuple[int, int] | None:
        """The one video span of ``sample`` (None without video); several videos are not supported."""
        if not spans:
            return None
        if len(spans) > 1:
            raise NotImplementedError(
                f"sample {sample} holds {len(spans)} videos; hieravid prunes one video per sample"
            )
        return spans[0]

    @staticmethod
    def span_edges(video_mask_row: Tensor) -> Tensor:
        """``[S + 1]`` int8 on the mask's device: +1 where a run of True starts, -1 one past where it ends."""
        row = video_mask_row.flatten().to(torch.int8)
        zero = row.new_zeros(1)
        return torch.diff(row, prepend=zero, append=zero)

    @staticmethod
    def spans_from_edges(edges: Tensor) -> list[tuple[int, int]]:
        """The runs ``[start, end)`` of :meth:`span_edges` read on the host (``edges`` a CPU tensor)."""
        bounds = torch.nonzero(edges, as_tuple=False).flatten().tolist()
        return list(zip(bounds[0::2], bounds[1::2]))

    # ------------------------------------------------------------------ positions
    def default_position_ids(self, inputs_embeds: Tensor, past_length: int) -> Tensor:
        """The positions the language model computes itself when called without ``position_ids``."""
        batch, length = inputs_embeds.shape[:2]
        positions = torch.arange(length, device=inputs_embeds.device) + past_length
        if self.position_rows:
            return positions.view(1, 1, -1).expand(self.position_rows, batch, -1)
        return positions.unsqueeze(0)

    def text_positions(self, position_ids: Tensor | None) -> Tensor | None:
        """The plain text positions ``[B or 1, S]`` in a call's ``position_ids``, or None when they cannot be read.

        The runtime checks that a continuation of a pruned cache without padding starts at the original
        length. The default reads ``[B, S]`` positions and the text row of ``[1 + position_rows, B, S]``
        positions (``generate``'s M-RoPE layout).
        """
        if not isinstance(position_ids, Tensor):
            return None
        if position_ids.dim() == 2:
            return position_ids
        if self.position_rows and position_ids.dim() == 3 and position_ids.shape[0] == self.position_rows + 1:
            return position_ids[0]
        return None

    def prefill_capturable(self) -> bool:
        """Whether the language model's forward runs without reading the device (no host sync, no data-dependent
        shape) once hieravid has prepared its inputs, with the speedups installed now, so that ``cuda_graphs=True``
        can capture whole prefills (:mod:`hieravid.runtime.capture`). False runs them eagerly."""
        return True

    def gather_extra_inputs(
        self, kwargs: dict[str, Any], index: Tensor, valid: Tensor, kept_rows: Sequence[int]
    ) -> None:
        """Prune the language model's per-token inputs besides embeddings, positions and mask, in place.

        Called by the input level after it gathered ``inputs_embeds`` and ``position_ids`` (never when the input
        level is off: then the language model's inputs stay untouched). The default does nothing: Llama/Qwen2
        language models take no other per-token input. Qwen3-VL's deepstack features override this.

        Args:
            kwargs: the language model's call, already holding the gathered ``inputs_embeds``.
            index: ``[B, S0]`` int64 original sequence position of each stage-0 row.
            valid: ``[B, S0]`` bool, False at padding slots (copies of a real row, masked).
            kept_rows: per sample, its real rows (known on the host): the rest of ``S0`` are padding slots.
        """

    def check_plan(self, plan: Any) -> None:
        """Raise :class:`~hieravid.errors.PlanError` if ``plan`` cannot run on this model (default: any plan can).

        Called by ``apply`` before any hook is installed, also for plans compiled from hand-made specs that do
        not know this model's constraints.
        """

    def prepare_continuation_call(
        self, kwargs: dict[str, Any], *, total_length: int, new_length: int, batch: int, device: torch.device
    ) -> None:
        """Adjust a multimodal call that continues a pruned cache (decode step or later turn), in place.

        The model must not derive positions from the (pruned) cache length. The default does nothing:
        the runtime gives the language model explicit positions. Adapters whose multimodal module
        computes positions itself (Qwen2-VL's rope deltas) override this.
        """

    # ------------------------------------------------------------------ relevance
    def rotary_function(self, layer: nn.Module) -> Any:
        """The function the attention module applies RoPE with (its modeling module's ``apply_rotary_pos_emb``)."""
        attention = self.attention(layer)
        module = sys.modules[type(attention).__module__]
        function = getattr(module, "apply_rotary_pos_emb", None)
        if function is None:
            raise AdapterError(
                f"{type(attention).__name__}: no apply_rotary_pos_emb in {module.__name__}; override rotary_function"
            )
        return function

    def stage_query_key(
        self,
        layer: nn.Module,
        query_states: Tensor,
        key_states: Tensor,
        position_embeddings: tuple[Tensor, Tensor],
        query_rows: int,
    ) -> tuple[Tensor, Tensor]:
        """Post-RoPE queries of the last ``query_rows`` rows and keys of all rows, as attention uses them.

        Args:
            layer: the stage decoder layer.
            query_states: ``[B, S, Hq*d]`` output of the query projection (this forward).
            key_states: ``[B, S, Hkv*d]`` output of the key projection.
            position_embeddings: ``(cos, sin)`` the layer received, ``[B or 1, S, d]``.
            query_rows: number of trailing rows to return queries for.

        Returns:
            ``query [B, Hq, query_rows, d]`` and ``key [B, Hkv, S, d]``.
        """
        attention = self.attention(layer)
        head_dim = int(attention.head_dim)
        batch, length = key_states.shape[:2]
        query = query_states[:, -query_rows:].reshape(batch, query_rows, -1, head_dim).transpose(1, 2)
        key = key_states.reshape(batch, length, -1, head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        rotate = self.rotary_function(layer)
        query, _ = rotate(query, query, cos[:, -query_rows:], sin[:, -query_rows:])
        key, _ = rotate(key, key, cos, sin)
        return query, key

    def attention_scaling(self, layer: nn.Module) -> float:
        attention = self.attention(layer)
        scaling = getattr(attention, "scaling", None)
        return float(scaling) if scaling is not None else float(attention.head_dim) ** -0.5
