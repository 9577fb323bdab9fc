"""Model families and the registry that picks one from a checkpoint's ``model_type``."""

from __future__ import annotations

from offload_infer.models.base import CausalLM, FamilyConfig, ModelWeights, ResidentLayers
from offload_infer.models.llama import LlamaConfig
from offload_infer.models.opt import OPTConfig

FAMILIES: dict[str, type] = {
    "llama": LlamaConfig,
    "mistral": LlamaConfig,
    "qwen2": LlamaConfig,
    "opt": OPTConfig,
}


class UnsupportedModelError(ValueError):
    pass


def config_from_dict(d: dict, override: str | None = None) -> FamilyConfig:
    """Build the family config from a ``config.json``-style dict; ``override`` forces the family."""
    model_type = (override or d.get("model_type") or "").lower()
    if model_type not in FAMILIES:
        found = repr(model_type) if model_type else "no model_type"
        raise UnsupportedModelError(
            f"unsupported model type {found}; supported: {', '.join(sorted(FAMILIES))}"
        )
    d = dict(d)
    if override:
        d["model_type"] = model_type
    try:
        return FAMILIES[model_type].from_hf(d)
    except KeyError as e:
        raise UnsupportedModelError(f"config for model type {model_type!r} lacks the field {e.args[0]!r}") from None


__all__ = ["CausalLM", "FamilyConfig", "ModelWeights", "ResidentLayers", "FAMILIES", "config_from_dict",
           "UnsupportedModelError"]
