"""Per-architecture adapters, importable as ``hieravid.adapters``.

Built in: :mod:`~hieravid.adapters.llava_onevision` (LLaVA-OneVision and LLaVA-Video checkpoints,
both newline layouts), :mod:`~hieravid.adapters.llava_next_video` (LLaVA-NeXT-Video),
:mod:`~hieravid.adapters.qwen2_vl` (Qwen2-VL, Qwen2.5-VL), :mod:`~hieravid.adapters.qwen3_vl` (Qwen3-VL and its MoE
variant: deepstack), :mod:`~hieravid.adapters.internvl` (InternVL3/3.5: frames as image spans) and
:mod:`~hieravid.adapters.qwen3_5` (Qwen3.5: linear-attention layers).

Writing an adapter for another architecture (see :class:`~hieravid.adapters.base.Adapter`):

1. subclass ``Adapter``, set ``model_types`` (the ``config.model_type`` values it serves),
   ``default_query_rows`` and ``position_rows`` (0 for ``[B, S]`` position ids, 3 for M-RoPE);
2. implement ``locate_videos(call, inputs_embeds)``: one ``VideoLayout`` (``[F, P]`` frame-token
   positions, newline positions, rows, cols) per sample, derived from the call's inputs and the config;
3. override module accessors (``multimodal_module``, ``language_model``, ``decoder_layers``,
   ``query_key_projections``, ``post_attention_norm``, ``mlp``) and ``stage_query_key`` only where the
   model differs from transformers' Llama/Qwen2 layout; ``prepare_continuation_call`` if the model
   derives decode positions from the cache length;
4. register it: ``hieravid.runtime.register_adapter(MyAdapter)``, or from another package through the
   ``hieravid.adapters`` entry-point group (name = model type, value = ``"package.module:MyAdapter"``);
5. run the conformance kit (:mod:`hieravid.testing`: subclass ``AdapterConformance`` with an ``AdapterCase``)
   on a tiny random-weight model of the architecture.
"""
