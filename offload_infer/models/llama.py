"""LLaMA family (LLaMA-1/2/3, TinyLlama, SmolLM2, Mistral, Qwen2/2.5): pre-norm decoder, RMSNorm, RoPE, GQA, SwiGLU.

Follows Hugging Face ``modeling_llama.py`` / ``modeling_qwen2.py`` (Touvron et al. 2023).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from offload_infer.kv_cache import KVCache
from offload_infer.models.attention import (apply_rope, apply_rope_rolled, attend, head_rows, rope_cos_sin, rope_inv_freq,
                                            rope_inv_freq_on, signed_sin)
from offload_infer.models.base import ModelWeights

_ACTIVATIONS = {"silu": F.silu, "swish": F.silu, "gelu": F.gelu, "relu": F.relu}
_QKV, _QKV_BIAS = "self_attn.qkv_proj.weight", "self_attn.qkv_proj.bias"  # fused by ``fuse_layer``
_GATE_UP, _GATE_UP_BIAS = "mlp.gate_up_proj.weight", "mlp.gate_up_proj.bias"


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    # normalise in fp32, scale in the model dtype, as transformers does
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def rms_norm_one_kernel(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm with the scale applied inside PyTorch's fused kernel (fp32 arithmetic throughout): one
    kernel instead of four in fp16, last-bit differences from ``rms_norm``. For drafting models only."""
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


@dataclass(frozen=True)
class LlamaConfig:
    model_type: str  # llama | mistral | qwen2
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: tuple | None  # sorted (key, value) pairs of the checkpoint's rope_scaling dict
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool  # q/k/v projections have biases (Qwen2, or LLaMA with attention_bias)
    o_bias: bool  # the output projection has a bias (LLaMA with attention_bias)
    mlp_bias: bool
    hidden_act: str

    @classmethod
    def from_hf(cls, d: dict) -> "LlamaConfig":
        model_type = str(d.get("model_type", "llama")).lower()
        hidden = int(d["hidden_size"])
        n_heads = int(d["num_attention_heads"])
        act = d.get("hidden_act", "silu")
        if act not in _ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {act!r}; supported: {sorted(_ACTIVATIONS)}")
        scaling = d.get("rope_scaling") or None
        rope_theta = d.get("rope_theta")
        rope_params = d.get("rope_parameters")  # transformers >= 5 keeps theta and scaling here
        if isinstance(rope_params, dict):
            rope_theta = rope_params.get("rope_theta", rope_theta)
            if rope_params.get("rope_type", "default") != "default":
                scaling = {k: v for k, v in rope_params.items() if k != "rope_theta"}
        rope_inv_freq(int(d.get("head_dim") or hidden // n_heads), 10000.0, scaling)  # validates the type
        attention_bias = bool(d.get("attention_bias", False))
        is_qwen2 = model_type == "qwen2"
        return cls(
            model_type=model_type,
            vocab_size=int(d["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(d["intermediate_size"]),
            n_layers=int(d["num_hidden_layers"]),
            n_heads=n_heads,
            n_kv_heads=int(d.get("num_key_value_heads") or n_heads),
            head_dim=int(d.get("head_dim") or hidden // n_heads),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta or 10000.0),
            rope_scaling=tuple(sorted(scaling.items())) if scaling else None,
            max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=is_qwen2 or attention_bias,
            o_bias=attention_bias and not is_qwen2,
            mlp_bias=bool(d.get("mlp_bias", False)),
            hidden_act=act,
        )

    def global_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = {
            "model.embed_tokens.weight": (self.vocab_size, self.hidden_size),
            "model.norm.weight": (self.hidden_size,),
        }
        if not self.tie_word_embeddings:
            shapes["lm_head.weight"] = (self.vocab_size, self.hidden_size)
        return shapes

    def layer_shapes(self) -> dict[str, tuple[int, ...]]:
        h, hd, f = self.hidden_size, self.head_dim, self.intermediate_size
        q, kv = self.n_heads * hd, self.n_kv_heads * hd
        shapes: dict[str, tuple[int, ...]] = {
            "input_layernorm.weight": (h,),
            "post_attention_layernorm.weight": (h,),
            "self_attn.q_proj.weight": (q, h),
            "self_attn.k_proj.weight": (kv, h),
            "self_attn.v_proj.weight": (kv, h),
            "self_attn.o_proj.weight": (h, q),
            "mlp.gate_proj.weight": (f, h),
            "mlp.up_proj.weight": (f, h),
            "mlp.down_proj.weight": (h, f),
        }
        if self.qkv_bias:
            shapes |= {"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,)}
        if self.o_bias:
            shapes["self_attn.o_proj.bias"] = (h,)
        if self.mlp_bias:
            shapes |= {"mlp.gate_proj.bias": (f,), "mlp.up_proj.bias": (f,), "mlp.down_proj.bias": (h,)}
        return shapes

    def layer_prefix(self, i: int) -> str:
        return f"model.layers.{i}."

    def fuse_layer(self, w: dict[str, Tensor]) -> None:
        """Replace a resident layer's q/k/v and gate/up projections by one matrix each, in place (a
        no-op if done already): a drafting SSM's forward is bound by its kernel count, not its bytes."""
        for fused, bias, names in ((_QKV, _QKV_BIAS, ("q_proj", "k_proj", "v_proj")),
                                   (_GATE_UP, _GATE_UP_BIAS, ("gate_proj", "up_proj"))):
            part = "self_attn" if fused == _QKV else "mlp"
            keys = [f"{part}.{n}.weight" for n in names]
            biases = [f"{part}.{n}.bias" for n in names]
            has_bias = [b in w for b in biases]
            if fused in w or not all(k in w for k in keys) or any(has_bias) != all(has_bias):
                continue
            w[fused] = torch.cat([w.pop(k) for k in keys])  # [sum of outs, h]
            if all(has_bias):
                w[bias] = torch.cat([w.pop(b) for b in biases])

    def aliases(self, name: str) -> list[str]:
        return []

    def forward(
        self, weights: ModelWeights, tokens: Tensor, positions: Tensor, cache: KVCache, start: int, mask: Tensor
    ) -> Tensor:
        g = weights.globals
        n = tokens.numel()
        x = F.embedding(tokens, g["model.embed_tokens.weight"])  # [N, h]
        inv_freq = rope_inv_freq_on(self.head_dim, self.rope_theta, self.rope_scaling, x.device)
        cos, sin = rope_cos_sin(positions, inv_freq, x.dtype)
        act = _ACTIVATIONS[self.hidden_act]
        sin_signed = None  # made by the first fused layer
        for i, w in weights.layers.layers():
            fused = w.get(_QKV)
            norm = rms_norm if fused is None else rms_norm_one_kernel  # a fused (drafting) layer: fewer kernels
            h = norm(x, w["input_layernorm.weight"], self.rms_norm_eps)
            if fused is None:
                q = F.linear(h, w["self_attn.q_proj.weight"], w.get("self_attn.q_proj.bias"))
                k = F.linear(h, w["self_attn.k_proj.weight"], w.get("self_attn.k_proj.bias"))
                v = F.linear(h, w["self_attn.v_proj.weight"], w.get("self_attn.v_proj.bias"))
                q = q.view(n, self.n_heads, self.head_dim)  # [N, H, D]
                k = k.view(n, self.n_kv_heads, self.head_dim)  # [N, KV, D]
                v = v.view(n, self.n_kv_heads, self.head_dim)
                q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            else:  # one projection, and q and k rotated together (fewer kernels for a small drafting model)
                qkv = F.linear(h, fused, w.get(_QKV_BIAS)).view(n, self.n_heads + 2 * self.n_kv_heads, self.head_dim)
                if sin_signed is None:
                    sin_signed = signed_sin(sin)
                qk = apply_rope_rolled(qkv[:, : self.n_heads + self.n_kv_heads], cos, sin_signed)  # [N, H + KV, D]
                q, k, v = qk[:, : self.n_heads], qk[:, self.n_heads:], qkv[:, self.n_heads + self.n_kv_heads:]
            a = attend(q, k, v, cache, i, start, mask)  # [N, H*D]
            x = x + F.linear(a, w["self_attn.o_proj.weight"], w.get("self_attn.o_proj.bias"))
            h = norm(x, w["post_attention_layernorm.weight"], self.rms_norm_eps)
            fused = w.get(_GATE_UP)
            if fused is None:
                gate = act(F.linear(h, w["mlp.gate_proj.weight"], w.get("mlp.gate_proj.bias")))
                up = F.linear(h, w["mlp.up_proj.weight"], w.get("mlp.up_proj.bias"))
            else:
                gate, up = F.linear(h, fused, w.get(_GATE_UP_BIAS)).chunk(2, dim=-1)  # [N, f] each
                gate = act(gate)
            x = x + F.linear(gate * up, w["mlp.down_proj.weight"], w.get("mlp.down_proj.bias"))
        x = head_rows(cache, x)  # [M, h]
        x = rms_norm(x, g["model.norm.weight"], self.rms_norm_eps)
        head = g["model.embed_tokens.weight"] if self.tie_word_embeddings else g["lm_head.weight"]
        return F.linear(x, head)  # [N, V]
