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


_POSITIVE_INTS = ("vocab_size", "hidden_size", "intermediate_size", "ffn_dim", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
                  "word_embed_proj_dim")
_POSITIVE_FLOATS = ("rms_norm_eps", "rope_theta", "layer_norm_eps")


def _check_fields(d: dict) -> None:
    """Types and ranges of the fields the families read, so a bad config is one clear error."""
    for k in _POSITIVE_INTS:
        v = d.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise UnsupportedModelError(f"config field {k} must be a positive integer, found {v!r}")
    for k in _POSITIVE_FLOATS:
        v = d.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0):
            raise UnsupportedModelError(f"config field {k} must be a positive number, found {v!r}")
    for k in ("model_type", "hidden_act", "activation_function"):
        if d.get(k) is not None and not isinstance(d[k], str):
            raise UnsupportedModelError(f"config field {k} must be a string, found {d[k]!r}")
    if d.get("rope_scaling") is not None and not isinstance(d["rope_scaling"], dict):
        raise UnsupportedModelError(f"config field rope_scaling must be an object, found {d['rope_scaling']!r}")


def config_from_dict(d: dict, override: str | None = None) -> FamilyConfig:
    """Build the family config from a ``config.json``-style dict; ``override`` forces the family."""
    if not isinstance(d, dict):
        raise UnsupportedModelError(f"a model config must be a JSON object, found a {type(d).__name__}")
    _check_fields(d)
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
    except (TypeError, ValueError) as e:
        if isinstance(e, UnsupportedModelError):
            raise
        raise UnsupportedModelError(f"config for model type {model_type!r} has a field of the wrong type or "
                                    f"value: {e}") from None


__all__ = ["CausalLM", "FamilyConfig", "ModelWeights", "ResidentLayers", "FAMILIES", "config_from_dict",
           "UnsupportedModelError"]
