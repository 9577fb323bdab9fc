"""OPT family (Zhang et al. 2022): learned positions with an offset of 2, LayerNorm, ReLU MLP.

Follows Hugging Face ``modeling_opt.py``, including OPT-350m's quirks: ``word_embed_proj_dim`` !=
``hidden_size`` (``project_in``/``project_out``) and post-norm layers (``do_layer_norm_before=False``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from offload_infer.kv_cache import KVCache
from offload_infer.models.attention import attend, head_rows
from offload_infer.models.base import ModelWeights

POSITION_OFFSET = 2  # OPT's learned position table starts at index 2
_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}
_P = "model.decoder."


@dataclass(frozen=True)
class OPTConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    ffn_dim: int
    n_layers: int
    n_heads: int
    word_embed_proj_dim: int
    max_position_embeddings: int
    do_layer_norm_before: bool
    final_layer_norm: bool  # a final LayerNorm after the last layer (pre-norm models, unless removed)
    enable_bias: bool
    activation: str
    tie_word_embeddings: bool
    layer_norm_eps: float = 1e-5

    @property
    def n_kv_heads(self) -> int:
        return self.n_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_heads

    @property
    def projects(self) -> bool:
        return self.word_embed_proj_dim != self.hidden_size

    @classmethod
    def from_hf(cls, d: dict) -> "OPTConfig":
        hidden = int(d["hidden_size"])
        act = d.get("activation_function", "relu")
        if act not in _ACTIVATIONS:
            raise ValueError(f"unsupported activation_function {act!r}; supported: {sorted(_ACTIVATIONS)}")
        pre = bool(d.get("do_layer_norm_before", True))
        return cls(
            model_type="opt",
            vocab_size=int(d["vocab_size"]),
            hidden_size=hidden,
            ffn_dim=int(d["ffn_dim"]),
            n_layers=int(d["num_hidden_layers"]),
            n_heads=int(d["num_attention_heads"]),
            word_embed_proj_dim=int(d.get("word_embed_proj_dim") or hidden),
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            do_layer_norm_before=pre,
            final_layer_norm=pre and not bool(d.get("_remove_final_layer_norm", False)),
            enable_bias=bool(d.get("enable_bias", True)),
            activation=act,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
        )

    def global_shapes(self) -> dict[str, tuple[int, ...]]:
        h, e = self.hidden_size, self.word_embed_proj_dim
        shapes: dict[str, tuple[int, ...]] = {
            _P + "embed_tokens.weight": (self.vocab_size, e),
            _P + "embed_positions.weight": (self.max_position_embeddings + POSITION_OFFSET, h),
        }
        if self.final_layer_norm:
            shapes |= {_P + "final_layer_norm.weight": (h,), _P + "final_layer_norm.bias": (h,)}
        if self.projects:
            shapes |= {_P + "project_in.weight": (h, e), _P + "project_out.weight": (e, h)}
        if not self.tie_word_embeddings:
            shapes["lm_head.weight"] = (self.vocab_size, e)
        return shapes

    def layer_shapes(self) -> dict[str, tuple[int, ...]]:
        h, f = self.hidden_size, self.ffn_dim
        shapes: dict[str, tuple[int, ...]] = {}
        for p in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[f"self_attn.{p}.weight"] = (h, h)
            if self.enable_bias:
                shapes[f"self_attn.{p}.bias"] = (h,)
        shapes |= {"fc1.weight": (f, h), "fc2.weight": (h, f)}
        if self.enable_bias:
            shapes |= {"fc1.bias": (f,), "fc2.bias": (h,)}
        for ln in ("self_attn_layer_norm", "final_layer_norm"):
            shapes |= {f"{ln}.weight": (h,), f"{ln}.bias": (h,)}
        return shapes

    def layer_prefix(self, i: int) -> str:
        return f"{_P}layers.{i}."

    def aliases(self, name: str) -> list[str]:
        # facebook/opt-* checkpoints name tensors without the leading "model."
        return [name[len("model.") :]] if name.startswith("model.") else []

    def forward(
        self, weights: ModelWeights, tokens: Tensor, positions: Tensor, cache: KVCache, start: int, mask: Tensor
    ) -> Tensor:
        g = weights.globals
        n, h, hd = tokens.numel(), self.hidden_size, self.head_dim
        x = F.embedding(tokens, g[_P + "embed_tokens.weight"])  # [N, e]
        if self.projects:
            x = F.linear(x, g[_P + "project_in.weight"])  # [N, h]
        x = x + F.embedding(positions + POSITION_OFFSET, g[_P + "embed_positions.weight"])
        act = _ACTIVATIONS[self.activation]
        eps = self.layer_norm_eps
        for i, w in weights.layers.layers():
            ln1 = (w["self_attn_layer_norm.weight"], w["self_attn_layer_norm.bias"])
            y = F.layer_norm(x, (h,), *ln1, eps) if self.do_layer_norm_before else x
            q = F.linear(y, w["self_attn.q_proj.weight"], w.get("self_attn.q_proj.bias")).view(n, self.n_heads, hd)
            k = F.linear(y, w["self_attn.k_proj.weight"], w.get("self_attn.k_proj.bias")).view(n, self.n_heads, hd)
            v = F.linear(y, w["self_attn.v_proj.weight"], w.get("self_attn.v_proj.bias")).view(n, self.n_heads, hd)
            a = attend(q, k, v, cache, i, start, mask)  # [N, h]
            x = x + F.linear(a, w["self_attn.out_proj.weight"], w.get("self_attn.out_proj.bias"))
            if not self.do_layer_norm_before:
                x = F.layer_norm(x, (h,), *ln1, eps)
            ln2 = (w["final_layer_norm.weight"], w["final_layer_norm.bias"])
            y = F.layer_norm(x, (h,), *ln2, eps) if self.do_layer_norm_before else x
            y = F.linear(act(F.linear(y, w["fc1.weight"], w.get("fc1.bias"))), w["fc2.weight"], w.get("fc2.bias"))
            x = x + y
            if not self.do_layer_norm_before:
                x = F.layer_norm(x, (h,), *ln2, eps)
        x = head_rows(cache, x)  # [M, h]
        if self.final_layer_norm:
            x = F.layer_norm(x, (h,), g[_P + "final_layer_norm.weight"], g[_P + "final_layer_norm.bias"], eps)
        if self.projects:
            x = F.linear(x, g[_P + "project_out.weight"])  # [N, e]
        head = g[_P + "embed_tokens.weight"] if self.tie_word_embeddings else g["lm_head.weight"]
        return F.linear(x, head)  # [N, V]
