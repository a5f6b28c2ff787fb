"""lmms-eval plugin: HieraVid-pruned LLaVA-OneVision / LLaVA-Video and Qwen2-VL models.

Registered through lmms-eval's ``lmms_eval.models`` entry-point group (see ``pyproject.toml``), so with
hieravid installed::

    lmms-eval --model hieravid_llava_onevision \\
        --model_args pretrained=llava-hf/llava-onevision-qwen2-7b-ov-hf,policy=policies/hieravid-30.yaml \\
        --tasks videomme --batch_size 1

Importing this package does not import lmms-eval; :func:`manifests` does, when lmms-eval asks.
"""

from __future__ import annotations

from typing import Any

MODELS: dict[str, str] = {
    "hieravid_llava_onevision": "hieravid.integrations.lmms_eval.models.HieravidLlavaOnevision",
    "hieravid_llava_video": "hieravid.integrations.lmms_eval.models.HieravidLlavaOnevision",
    "hieravid_qwen2_vl": "hieravid.integrations.lmms_eval.models.HieravidQwen2VL",
    "hieravid_qwen2_5_vl": "hieravid.integrations.lmms_eval.models.HieravidQwen2VL",
}
"""lmms-eval model names → classes (LLaVA-Video checkpoints use the OneVision class and adapter)."""

__all__ = ["MODELS", "manifests"]


def manifests() -> list[Any]:
    """The ``ModelManifest`` list lmms-eval loads from the ``lmms_eval.models`` entry point."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=name, simple_class_path=path) for name, path in MODELS.items()]
