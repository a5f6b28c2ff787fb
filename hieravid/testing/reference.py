"""The conformance kit's reference: the *unpatched* model run, layer by layer, on a pruned sequence.

For one sample, the reference takes the original language-model inputs (captured from an unpatched
run), keeps the rows a pruned request kept (from ``handle.last_request``), and runs the model's own
decoder layers one by one on a plain contiguous sequence — no padding, no cache, a fresh causal mask,
RoPE computed by the model's rotary embedding from the gathered *original* position ids — gathering the
kept rows after each stage layer (the MLP is token-wise, so cutting after it equals cutting before it).
Qwen3-VL's deepstack features are added after the first layers as its text model does, at the kept visual
rows only, each kept row receiving its own original deepstack row.
The merged segment-level features are recomputed from the original embeddings with the operator.

Use it to check a pruned request of any adapter against the model it prunes::

    lm_inputs = capture_lm_inputs(adapter, model, inputs)          # no handle installed
    with hieravid.apply(model, plan) as handle:
        logits = model(**inputs).logits
        stats = handle.last_request
    reference = reference_run(model, adapter, plan, stats, lm_inputs, sample=0)
    # reference.logits are the logits of the rows stats.output_positions[0] names (padding aside)

It needs torch only (no pytest), so benchmarks can use it on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "LMInputs",
    "ReferenceResult",
    "capture_layer_outputs",
    "capture_lm_inputs",
    "continuation_positions",
    "reference_run",
    "sample_positions",
    "stage_of_output",
]


@dataclass
class LMInputs:
    """What the language model received in an unpatched call (per batch)."""

    inputs_embeds: Tensor
    position_ids: Tensor | None
    attention_mask: Tensor | None
    visual_pos_masks: Tensor | None = None
    """Qwen3-VL: ``[B, S]`` positions that receive deepstack features."""
    deepstack: tuple[Tensor, ...] = ()
    """Qwen3-VL: per injected layer, ``[visual rows, D]`` features in the row-major order of ``visual_pos_masks``."""


def capture_lm_inputs(adapter: Any, model: torch.nn.Module, inputs: dict, *, generate: bool = False) -> LMInputs:
    """Run the model once (no hieravid handle installed) and record the first language-model call's inputs.

    ``adapter`` is an adapter instance bound to ``model`` (``handle.adapter``); ``generate=True`` records the
    prefill of a one-token ``generate`` instead of a plain forward (the two can differ, e.g. in position ids).
    """
    language_model = adapter.language_model()
    captured: list[dict] = []

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if not captured:
            captured.append(dict(kwargs))

    removable = language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            if generate:
                model.generate(**inputs, max_new_tokens=1, do_sample=False)
            else:
                model(**inputs)
    finally:
        removable.remove()
    kwargs = captured[0]
    mask = kwargs.get("attention_mask")
    visual = kwargs.get("visual_pos_masks")
    return LMInputs(
        kwargs["inputs_embeds"].detach().clone(),
        None if kwargs.get("position_ids") is None else kwargs["position_ids"].clone(),
        None if mask is None else mask.clone(),
        None if visual is None else visual.clone(),
        tuple(feature.detach().clone() for feature in kwargs.get("deepstack_visual_embeds") or ()),
    )


def sample_positions(lm_inputs: LMInputs, sample: int, position_rows: int) -> Tensor:
    """Original position ids of one sample: ``[S]`` (1-D RoPE, ``position_rows == 0``) or ``[position_rows, S]``
    (M-RoPE; the adapter's ``position_rows``)."""
    length = lm_inputs.inputs_embeds.shape[1]
    pos = lm_inputs.position_ids
    if pos is None:
        base = torch.arange(length, device=lm_inputs.inputs_embeds.device)
        return base.expand(position_rows, -1).clone() if position_rows else base
    if pos.dim() == 2:
        row = pos[0] if pos.shape[0] == 1 else pos[sample]
        return row.expand(position_rows, -1).clone() if position_rows else row
    # generate's M-RoPE layout prepends the text row: [1 + position_rows, B, S]
    rows = pos[1:] if pos.shape[0] == position_rows + 1 else pos
    return rows[:, 0 if rows.shape[1] == 1 else sample]


@dataclass
class ReferenceResult:
    """What the unpatched model computes on one sample's pruned sequence."""

    layer_outputs: list[Tensor]
    """Per decoder layer, ``[K_i, D]`` output rows (after the stage cut for stage layers)."""
    layer_positions: list[Tensor]
    """Per decoder layer, original positions of the output rows (prompt length + j for appended tokens)."""
    logits: Tensor
    """``[K_last, V]``."""
    input_embeds: Tensor
    """``[K_0, D]`` layer-0 input (merged segment-level features on the kept video rows)."""
    input_positions: Tensor
    """Original positions of the layer-0 input rows."""


def reference_run(
    model: torch.nn.Module,
    adapter: Any,
    plan: Any,
    stats: Any,
    lm_inputs: LMInputs,
    sample: int,
    *,
    extra_ids: Tensor | None = None,
    extra_positions: Tensor | None = None,
) -> ReferenceResult:
    """The unpatched model on sample ``sample``'s pruned sequence (plus ``extra_ids`` appended tokens).

    ``adapter`` is bound to ``model``, ``plan`` is the plan the pruned request ran and ``stats`` its
    ``handle.last_request``; ``lm_inputs`` come from :func:`capture_lm_inputs` on the same inputs. Appended tokens
    get ``extra_positions`` (``[n]`` or ``[position_rows, n]``) or, by default, positions continuing from the
    prompt's last one (+1 per token on every M-RoPE row, as ``generate`` extends them).
    """
    from hieravid.compat import causal_mask
    from hieravid.ops.peers import input_level

    language_model = adapter.language_model()
    layers = list(adapter.decoder_layers())
    embeds = lm_inputs.inputs_embeds[sample]
    length = embeds.shape[0]
    device = embeds.device
    mask = (
        torch.ones(length, dtype=torch.bool, device=device)
        if lm_inputs.attention_mask is None
        else (lm_inputs.attention_mask[sample].bool())
    )
    mrope = adapter.position_rows > 0
    positions = sample_positions(lm_inputs, sample, adapter.position_rows).to(device)
    layout = stats.layouts[sample]

    real = torch.nonzero(mask).flatten()
    video = torch.zeros(length, dtype=torch.bool, device=device)
    rows_embeds = embeds.clone()
    if layout is not None:
        video[layout.frame_index.flatten()] = True
        video[layout.newline_index] = True
        kept_video = stats.input_kept_positions[sample].to(device)
        if plan.segment.enabled:  # HieraVid's segment level or a peer's input operator
            result = input_level(plan.segment.config, embeds[layout.frame_index])
            rows_embeds[layout.frame_index.flatten()[result.kept_index]] = result.features.to(embeds.dtype)
    else:
        kept_video = torch.zeros(0, dtype=torch.long, device=device)
    keep = torch.zeros(length, dtype=torch.bool, device=device)
    keep[real] = True
    keep[video] = False
    keep[kept_video] = True
    orig = torch.nonzero(keep).flatten()
    hidden = rows_embeds[orig]
    pos = positions[..., orig]
    if extra_ids is not None and extra_ids.numel():
        extra = language_model.get_input_embeddings()(extra_ids)
        count = extra_ids.numel()
        hidden = torch.cat([hidden, extra.to(hidden.dtype)])
        if extra_positions is None:
            step = torch.arange(1, count + 1, device=device)
            last = positions[..., -1:]
            extra_positions = last + step if not mrope else last + step.unsqueeze(0)
        pos = torch.cat([pos, extra_positions.to(pos.dtype)], dim=-1)
        orig = torch.cat([orig, length + torch.arange(count, device=device)])
    input_embeds, input_positions = hidden.clone(), orig.clone()

    deepstack_row = None
    if lm_inputs.visual_pos_masks is not None and lm_inputs.deepstack:
        visual_mask = lm_inputs.visual_pos_masks.bool()
        deepstack_row = (visual_mask.flatten().long().cumsum(0) - 1).view(visual_mask.shape)[sample]
        deepstack_row = torch.where(visual_mask[sample], deepstack_row, -1)

    stage_at = {stage.layer: index for index, stage in enumerate(plan.stages)}
    recurrent = adapter.recurrent_layers()  # linear attention takes a 2-D padding mask: none here
    outputs: list[Tensor] = []
    out_positions: list[Tensor] = []
    with torch.no_grad():
        for index, layer in enumerate(layers):
            batch_hidden = hidden.unsqueeze(0)
            rope_pos = pos.unsqueeze(0) if not mrope else pos.unsqueeze(1)
            cos, sin = language_model.rotary_emb(batch_hidden, rope_pos)
            causal = causal_mask(language_model.config, batch_hidden, None, None)
            out = layer(
                batch_hidden,
                attention_mask=None if index in recurrent else causal,
                position_embeddings=(cos, sin),
                position_ids=None,
                use_cache=False,
            )
            out = out[0] if isinstance(out, tuple) else out
            hidden = out[0].to(device)  # a model split over devices returns each layer's rows on its device
            if index in stage_at:
                stage_stats = stats.stages[stage_at[index]]
                kept = stage_stats.kept_positions[sample].to(device)
                is_video = torch.zeros(orig.shape[0], dtype=torch.bool, device=device)
                in_range = orig < length
                is_video[in_range] = video[orig[in_range]]
                take = ~is_video | torch.isin(orig, kept)
                hidden, pos, orig = hidden[take], pos[..., take], orig[take]
            outputs.append(hidden.clone())
            out_positions.append(orig.clone())
            # The text model adds deepstack features to the layer's output (after its forward hooks ran).
            if deepstack_row is not None and index < len(lm_inputs.deepstack):
                rows = torch.full_like(orig, -1)
                in_prompt = orig < length
                rows[in_prompt] = deepstack_row[orig[in_prompt]]
                receives = rows >= 0
                hidden = hidden.clone()
                hidden[receives] = hidden[receives] + lm_inputs.deepstack[index][rows[receives]].to(hidden.dtype)
        logits = model.lm_head(language_model.norm(hidden.unsqueeze(0)))[0]
    return ReferenceResult(outputs, out_positions, logits, input_embeds, input_positions)


def capture_layer_outputs(adapter: Any) -> tuple[list[Tensor], list[Any]]:
    """Forward hooks (registered after ``apply``, so they see pruned outputs) recording each layer's output."""
    outputs: list[Tensor] = []
    removables = []
    for layer in adapter.decoder_layers():

        def hook(module: torch.nn.Module, args: tuple, output: Any) -> None:
            outputs.append((output[0] if isinstance(output, tuple) else output).detach().clone())

        removables.append(layer.register_forward_hook(hook))
    return outputs, removables


def stage_of_output(plan: Any, layer: int) -> int:
    """Coordinate system of a layer's *output*: number of stages at or before it."""
    return sum(1 for stage in plan.stages if stage.layer <= layer)


def continuation_positions(calls: list[Tensor | None], sample: int, position_rows: int) -> Tensor:
    """Concatenate the position ids the language model received in continuation calls (one sample's), for
    :func:`reference_run`'s ``extra_positions``; ``position_rows`` is the adapter's."""
    pieces = []
    for pos in calls:
        if pos is None:
            raise ValueError("a continuation call carried no position_ids: record calls that do")
        if not position_rows:
            pieces.append(pos[0 if pos.shape[0] == 1 else sample])
            continue
        if pos.dim() == 2:
            pos = pos.unsqueeze(0)
        rows = pos[1:] if pos.shape[0] == position_rows + 1 else pos.expand(position_rows, -1, -1)
        pieces.append(rows[:, 0 if rows.shape[1] == 1 else sample])
    return torch.cat(pieces, dim=-1)
