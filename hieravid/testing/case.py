"""What the conformance kit needs to know about one architecture: :class:`AdapterCase`."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor, nn

from hieravid.errors import HieravidError

if TYPE_CHECKING:
    from hieravid.specs import ModelSpec

__all__ = ["AdapterCase", "SampleBuilder", "left_padded_batch"]

#: Decoder layers the kit's policies need (one of them prunes after layer 7).
MIN_DECODER_LAYERS = 8


class SampleBuilder(Protocol):
    """Builds one prompt with a video, as the model's processor returns it for a batch of one."""

    def __call__(self, *, seed: int, frames: int) -> Mapping[str, Tensor]:
        """``input_ids`` ``[1, L]`` (text around the video's placeholder tokens), optionally ``attention_mask``,
        the per-token inputs the case names, and the video tensors (``pixel_values_videos``, grids, ...).

        ``frames`` counts frames as the language model sees them (Qwen2-VL: temporal patches). The same ``seed``
        and ``frames`` must give the same tensors; content should vary over time (a few scenes plus noise), so
        that the segment level finds segments and merges redundancy.
        """
        ...


@dataclass(frozen=True)
class AdapterCase:
    """One architecture as the conformance kit runs it: a tiny model and prompts with a video.

    The kit builds the model as ``model_class._from_config(config, attn_implementation=...)`` after
    ``torch.manual_seed(seed)`` (a deep copy of ``config``, once per attention implementation), compiles its
    policies for that model with ``frames`` frames, and builds every input with ``sample``. The language model
    needs at least 8 decoder layers; keep it tiny (hidden size 64, a one-layer vision tower): the kit runs
    about 45 prefills and generations per attention implementation.
    """

    name: str
    """Shown in messages (e.g. the model type)."""
    model_class: type[nn.Module]
    """A transformers ``...ForConditionalGeneration`` class (or a subclass of one)."""
    config: Any
    """A transformers config object of ``model_class``; its ``model_type`` selects the adapter under test."""
    sample: SampleBuilder
    """One prompt with a video (see :class:`SampleBuilder`)."""
    frames: int = 8
    """Frames (as the language model sees them) of the prompts the single-sample tests build."""
    batch_frames: tuple[int, ...] | None = None
    """Frames of each sample of the two-sample batches (default: ``frames`` each); give different counts where
    the model takes videos of different lengths in one batch (Qwen2-VL does, LLaVA does not)."""
    attention: tuple[str, ...] = ("sdpa", "eager")
    """Attention implementations the per-attention tests run on (the others run on the first)."""
    token_inputs: tuple[str, ...] = ("mm_token_type_ids",)
    """Inputs besides ``input_ids`` and ``attention_mask`` with one value per token: left-padded with 0 in a
    batch (when present); every other tensor input is concatenated along dimension 0."""
    pad_token_id: int = 0
    """Left padding of ``input_ids`` (masked out, so any id in the vocabulary works)."""
    seed: int = 0
    """Seed of the random weights."""
    device: str | torch.device = "cpu"
    """Where the model and inputs live."""
    torch_threads: int | None = 1
    """Intra-op threads while a kit test runs (tiny matrices only contend on more); None leaves torch's."""

    def __post_init__(self) -> None:
        if not isinstance(self.model_class, type) or not hasattr(self.model_class, "_from_config"):
            raise HieravidError(
                f"AdapterCase {self.name!r}: model_class must be a transformers model class, got {self.model_class!r}"
            )
        if not isinstance(getattr(self.config, "model_type", None), str):
            raise HieravidError(
                f"AdapterCase {self.name!r}: config must be a transformers config object with a model_type, "
                f"got {type(self.config).__name__}"
            )
        text_config = self.config.get_text_config() if hasattr(self.config, "get_text_config") else self.config
        layers = getattr(text_config, "num_hidden_layers", None)
        if not isinstance(layers, int) or layers < MIN_DECODER_LAYERS:
            raise HieravidError(
                f"AdapterCase {self.name!r}: the language model has {layers} decoder layers; the kit's policies need "
                f"at least {MIN_DECODER_LAYERS}"
            )
        if not callable(self.sample):
            raise HieravidError(f"AdapterCase {self.name!r}: sample must be callable as sample(seed=, frames=)")
        if not isinstance(self.two_sample_frames, tuple) or len(self.two_sample_frames) != 2:
            raise HieravidError(
                f"AdapterCase {self.name!r}: batch_frames gives the frames of a two-sample batch, got "
                f"{self.batch_frames!r}"
            )
        for frames in (self.frames, *self.two_sample_frames):
            if not isinstance(frames, int) or isinstance(frames, bool) or frames < 1:
                raise HieravidError(
                    f"AdapterCase {self.name!r}: frame counts must be positive integers, got {frames!r}"
                )
        if not self.attention or not all(isinstance(name, str) and name for name in self.attention):
            raise HieravidError(
                f"AdapterCase {self.name!r}: attention must name at least one attention implementation, got "
                f"{self.attention!r}"
            )

    @property
    def two_sample_frames(self) -> tuple[int, ...]:
        """Frames of each sample of the kit's two-sample batches."""
        return self.batch_frames if self.batch_frames is not None else (self.frames, self.frames)

    def build_model(self, attention: str) -> nn.Module:
        """A fresh model with this case's random weights (the same for every call), in eval mode on ``device``."""
        with torch.random.fork_rng(devices=[]):  # leaves the caller's random stream alone
            torch.manual_seed(self.seed)
            model = self.model_class._from_config(copy.deepcopy(self.config), attn_implementation=attention)
        return model.to(self.device).eval()

    def spec(self, model: nn.Module) -> ModelSpec:
        """The spec of ``model`` seeing this case's single-sample prompts (for ``compile_plan``): the language
        model's shapes from the config, the video geometry the adapter reads from a prompt (``inputs_geometry``).

        Raises :class:`~hieravid.errors.HieravidError` when that geometry has other than ``frames`` frames.
        """
        from hieravid.adapters.registry import get_adapter
        from hieravid.specs import load_spec

        inputs = self.inputs(seed=0)
        geometry = get_adapter(model.config.model_type).inputs_geometry(model.config, inputs)
        if geometry.frames != self.frames:
            raise HieravidError(
                f"AdapterCase {self.name!r}: sample(frames={self.frames}) built a video the adapter reads as "
                f"{geometry.frames} frames"
            )
        return dataclasses.replace(
            load_spec(model, frames=geometry.frames),
            name=f"tiny-{self.name}",
            rows=geometry.rows,
            cols=geometry.cols,
            newline_layout=geometry.newline_layout,
            default_query_rows=geometry.query_rows,
        )

    def inputs(
        self, *, seed: int, batch: int = 1, pads: Sequence[int] | None = None, frames: Sequence[int] | None = None
    ) -> dict[str, Tensor]:
        """``batch`` prompts (sample ``b`` built with seed ``seed + b``) as one left-padded batch on ``device``;
        ``pads[b]`` more padding tokens before sample ``b`` than its length needs (see :func:`left_padded_batch`)."""
        frames = tuple(frames) if frames is not None else (self.frames,) * batch
        if len(frames) != batch:
            raise HieravidError(f"AdapterCase {self.name!r}: {batch} samples but {len(frames)} frame counts")
        samples = [self.sample(seed=seed + index, frames=count) for index, count in enumerate(frames)]
        return left_padded_batch(
            samples,
            pads=pads,
            pad_token_id=self.pad_token_id,
            token_inputs=self.token_inputs,
            device=self.device,
            name=self.name,
        )


def left_padded_batch(
    samples: Sequence[Mapping[str, Tensor]],
    *,
    pads: Sequence[int] | None = None,
    pad_token_id: int = 0,
    token_inputs: Sequence[str] = ("mm_token_type_ids",),
    device: str | torch.device = "cpu",
    name: str = "samples",
) -> dict[str, Tensor]:
    """One batch from single prompts, as a processor with ``padding_side="left"`` builds it.

    Every sample has ``input_ids`` ``[1, L_b]``; the batch is ``max_b(L_b + pads[b])`` long, sample ``b``
    right-aligned: ``input_ids`` padded with ``pad_token_id``, ``attention_mask`` (ones where a sample has
    none) and ``token_inputs`` with 0. Every other tensor is concatenated along dimension 0 (a batch dimension,
    or the patch rows of Qwen2-VL's flattened pixels). Raises :class:`~hieravid.errors.HieravidError` naming the
    input when samples disagree.
    """
    if not samples:
        raise HieravidError(f"{name}: a batch needs at least one sample")
    pads = tuple(pads) if pads is not None else (0,) * len(samples)
    if len(pads) != len(samples) or any(not isinstance(pad, int) or pad < 0 for pad in pads):
        raise HieravidError(f"{name}: pads must be one non-negative integer per sample, got {pads!r}")
    keys = set(samples[0])
    for index, sample in enumerate(samples):
        if set(sample) != keys:
            raise HieravidError(f"{name}: sample {index} has inputs {sorted(sample)}, sample 0 has {sorted(keys)}")
        ids = sample.get("input_ids")
        if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.shape[0] != 1:
            shape = tuple(ids.shape) if isinstance(ids, Tensor) else type(ids).__name__
            raise HieravidError(f"{name}: sample {index}'s input_ids must be a [1, length] tensor, got {shape}")
    per_token = ["input_ids", "attention_mask", *(key for key in token_inputs if key in keys)]
    lengths = [sample["input_ids"].shape[1] for sample in samples]
    total = max(length + pad for length, pad in zip(lengths, pads))
    batch: dict[str, Tensor] = {}
    for key in per_token:
        fill = pad_token_id if key == "input_ids" else 0
        rows = torch.full((len(samples), total), fill, dtype=torch.long)
        for index, (sample, length) in enumerate(zip(samples, lengths)):
            values = sample.get(key, torch.ones(1, length, dtype=torch.long))
            if tuple(values.shape) != (1, length):
                raise HieravidError(
                    f"{name}: sample {index}'s {key} must be [1, {length}] like its input_ids, got "
                    f"{tuple(values.shape)}"
                )
            rows[index, total - length :] = values[0]
        batch[key] = rows
    for key in sorted(keys - set(per_token)):
        try:
            batch[key] = torch.cat([torch.as_tensor(sample[key]) for sample in samples])
        except RuntimeError as error:
            raise HieravidError(
                f"{name}: the samples' {key} cannot be concatenated along dimension 0 ({error})"
            ) from None
    return {key: value.to(device) for key, value in batch.items()}
