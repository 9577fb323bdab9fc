"""Models with random weights at real shapes, for the benchmarks: one place that builds them.

- ``build``: an offloaded (streamed) model at a shape and precision, packed layer by layer into pinned
  buffers straight from random (or given) weights; precisions fp16, int8, int4 (NF4) and, as a
  checkpoint would store them, q4_k_m (GGUF Q4_K/Q6_K blocks laid out like llama.cpp's Q4_K_M), awq
  (AutoAWQ int4, group 128) and gptq (int4, group 128, v1 zeros);
- ``random_resident``: a resident model (an SSM) at a shape;
- ``agreeing_pair``: an LLM and an SSM that agree by construction (the SSM is the LLM's embeddings, first
  layers and head; the LLM's later layers barely move the residual stream), streamed or resident.
"""

from __future__ import annotations

import time

import torch

SHAPES = {
    "llama-7b": dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                     num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096),
    "llama-13b": dict(model_type="llama", vocab_size=32000, hidden_size=5120, intermediate_size=13824,
                      num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40,
                      max_position_embeddings=4096),
    "llama-70b": dict(model_type="llama", vocab_size=32000, hidden_size=8192, intermediate_size=28672,
                      num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=4096),
    "opt-6.7b": dict(model_type="opt", vocab_size=50272, hidden_size=4096, ffn_dim=16384, num_hidden_layers=32,
                     num_attention_heads=32, max_position_embeddings=2048, word_embed_proj_dim=4096),
    "opt-13b": dict(model_type="opt", vocab_size=50272, hidden_size=5120, ffn_dim=20480, num_hidden_layers=40,
                    num_attention_heads=40, max_position_embeddings=2048, word_embed_proj_dim=5120),
    # the Qwen2.5-Coder pair of MODELS.md (1.5B LLM, 0.5B SSM), tied embeddings
    "qwen2.5-1.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                         num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                         max_position_embeddings=32768, tie_word_embeddings=True),
    "qwen2.5-0.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         max_position_embeddings=32768, tie_word_embeddings=True),
}
CODEC = {"fp16": None, "int8": "int8-row", "int4": "nf4"}


SSM_SHAPE = dict(model_type="llama", vocab_size=32000, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096)


def draw(shapes: dict, device: str | torch.device, dtype: torch.dtype, generator: torch.Generator | None = None,
         scale: float = 0.02) -> dict:
    """Random matrices (``scale`` x N(0, 1)) and ones for vectors (norms), at ``shapes``."""
    return {k: (torch.randn(s, device=device, dtype=dtype, generator=generator) * scale if len(s) == 2
                else torch.ones(s, device=device, dtype=dtype)) for k, s in shapes.items()}


def random_layers(config, dtype, device: str = "cuda"):
    for _ in range(config.n_layers):
        yield draw(config.layer_shapes(), device, dtype)


STORED = ("q4_k_m", "awq", "gptq")  # precisions whose matrices are random blocks of a checkpoint's own format
_GGUF_BLOCK = {"Q4_K": (144, (0, 2)), "Q6_K": (210, (208,))}  # bytes per 256 weights, offsets of fp16 scales


def q4_k_m_type(name: str, layer: int, n_layers: int) -> str:
    """The block type llama.cpp's Q4_K_M gives a layer matrix: Q6_K for attn_v and ffn_down in the first
    and last eighth of the layers and every third one between, Q4_K elsewhere."""
    more = layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2
    return "Q6_K" if more and name in ("self_attn.v_proj.weight", "mlp.down_proj.weight") else "Q4_K"


def random_stored(name: str, shape: tuple[int, int], precision: str, layer: int, n_layers: int, device: str):
    """A random matrix in a checkpoint's own format (valid blocks: finite, small scales) at ``shape``."""
    from quant.formats import AWQFormat, GGUFFormat, GPTQFormat, Stored

    out, n_in = shape
    if precision == "q4_k_m":
        kind = q4_k_m_type(name, layer, n_layers)
        nbytes, f16 = _GGUF_BLOCK[kind]
        b = torch.randint(0, 256, (out * n_in // 256, nbytes), dtype=torch.uint8, device=device)
        for off in f16:
            b[:, off : off + 2] = (torch.rand(len(b), 1, device=device) * 1e-3 + 1e-4).half().view(torch.uint8)
        return Stored(GGUFFormat(kind, nbytes, shape), {"blocks": b.reshape(out, -1)})
    group = 128
    ints = lambda *s: torch.randint(-2**31, 2**31 - 1, s, dtype=torch.int32, device=device)  # noqa: E731
    scales = (torch.rand(n_in // group, out, device=device) * 1e-3 + 1e-4).half()
    if precision == "gptq":
        return Stored(GPTQFormat(4, group, 1, shape), {"qweight": ints(n_in // 8, out),
                                                        "qzeros": ints(n_in // group, out // 8), "scales": scales})
    return Stored(AWQFormat(group, shape), {"qweight": ints(n_in, out // 8), "qzeros": ints(n_in // group, out // 8),
                                            "scales": scales})


def stored_sizes(config, precision: str) -> list[dict[str, list[int]]]:
    """Per layer, the piece sizes of ``random_stored``'s matrices (what the plan needs before building)."""
    out = []
    for i in range(config.n_layers):
        sizes = {}
        for k, (rows, cols) in ((k, s) for k, s in config.layer_shapes().items() if len(s) == 2):
            if precision == "q4_k_m":
                sizes[k] = [rows * cols // 256 * _GGUF_BLOCK[q4_k_m_type(k, i, config.n_layers)][0]]
            else:
                sizes[k] = [cols * rows // 8 * 4, cols // 128 * rows // 8 * 4, cols // 128 * rows * 2]
        out.append(sizes)
    return out


def random_stored_layers(config, precision: str, dtype, device: str = "cuda"):
    for i in range(config.n_layers):
        yield {k: random_stored(k, s, precision, i, config.n_layers, device) if len(s) == 2
               else torch.ones(s, device=device, dtype=dtype) for k, s in config.layer_shapes().items()}


def build(shape: str | dict, precision: str, reserve: int, ring: int = 2, resident_compressed: bool = True,
          layers=None, globals_=None, dtype: torch.dtype = torch.float16, device: str = "cuda",
          pin_allocator: str = "registered"):
    """An offloaded model at ``shape`` (a SHAPES name or a config dict) from ``layers`` (an iterator of
    layer dicts; default random); ``pin_allocator``: "registered" (exact) or "caching" (PyTorch's)."""
    from offload_infer.models import CausalLM, ModelWeights, config_from_dict
    from offload_infer.offload import OffloadBuilder

    dev = torch.device(device)
    config = config_from_dict(SHAPES[shape] if isinstance(shape, str) else shape)
    stored = precision in STORED
    builder = OffloadBuilder(reserve, None if stored else CODEC[precision], 64, ring, kv_bytes=2 << 30,
                             resident_compressed=resident_compressed, pin_allocator=pin_allocator)
    plan = builder.prepare(config, dev, dtype, stored_sizes(config, precision) if stored else None)
    glob = globals_ or {k: torch.randn(s, device=dev, dtype=dtype) * 0.02 for k, s in config.global_shapes().items()}
    t0 = time.perf_counter()
    if layers is None:
        layers = random_stored_layers(config, precision, dtype, device) if stored else random_layers(config, dtype, device)
    layers = builder(config, layers, dev, dtype)
    build_s = time.perf_counter() - t0
    return CausalLM(config, ModelWeights(glob, layers), dev, dtype), plan, build_s


def random_resident(shape: dict, device: str = "cuda", dtype: torch.dtype = torch.float16):
    """A resident model at ``shape`` with random weights (every tensor, vectors too, N(0, 0.02))."""
    from offload_infer.models import CausalLM, ModelWeights, ResidentLayers, config_from_dict

    cfg = config_from_dict(shape)
    g = {k: torch.randn(s, device=device, dtype=dtype) * 0.02 for k, s in cfg.global_shapes().items()}
    layers = [{k: torch.randn(s, device=device, dtype=dtype) * 0.02 for k, s in cfg.layer_shapes().items()}
              for _ in range(cfg.n_layers)]
    return CausalLM(cfg, ModelWeights(g, ResidentLayers(layers)), torch.device(device), dtype)


_RESIDUAL_OUT = {"llama": ("self_attn.o_proj.weight", "mlp.down_proj.weight"),
                 "opt": ("self_attn.out_proj.weight", "fc2.weight")}


def agreeing_weights(config, eps: float, ssm_layers: int, head_scale: float, device: torch.device,
                     dtype: torch.dtype, generator: torch.Generator, codec: str | None = None):
    """The pair's weights: the globals (shared), an iterator over the LLM's layers (drawn as it is
    consumed), and the list that collects the SSM's layers (the LLM's first ``ssm_layers``, round-tripped
    through ``codec`` so they equal what the LLM decompresses) while the iterator runs."""

    glob = draw(config.global_shapes(), device, dtype, generator)
    head = next(k for k in glob if k.endswith("embed_tokens.weight")) if config.tie_word_embeddings else "lm_head.weight"
    glob[head] *= head_scale
    kept: list[dict] = []

    def layers():
        for i in range(config.n_layers):
            w = draw(config.layer_shapes(), device, dtype, generator)
            if i < ssm_layers:
                if codec:  # NF4/int8 round trips are idempotent: the first layers agree exactly
                    from quant.codecs import dequantize, quantize

                    w = {k: dequantize(*quantize(t, codec, 64), dtype) if t.dim() == 2 else t for k, t in w.items()}
                kept.append({k: t.clone() for k, t in w.items()})
            else:  # the later layers barely move the residual stream: the LLM stays close to the SSM
                for name in _RESIDUAL_OUT.get(config.model_type, _RESIDUAL_OUT["llama"]):
                    w[name] *= eps
            yield w

    return glob, layers(), kept


def ssm_of(shape: dict, glob: dict, kept: list[dict], device: torch.device, dtype: torch.dtype):
    """The SSM: the shared globals and the collected first layers."""
    from offload_infer.models import CausalLM, ModelWeights, ResidentLayers, config_from_dict

    cfg = config_from_dict({**shape, "num_hidden_layers": len(kept)})
    return CausalLM(cfg, ModelWeights(glob, ResidentLayers(kept)), device, dtype)


def agreeing_pair(shape: str | dict, precision: str, reserve: int, eps: float, ssm_layers: int, head_scale: float,
                  dtype: torch.dtype = torch.float16, device: str = "cuda"):
    from offload_infer.models import config_from_dict

    dev = torch.device(device)
    shape_dict = SHAPES[shape] if isinstance(shape, str) else shape
    config = config_from_dict(shape_dict)
    gen = torch.Generator(device=dev).manual_seed(0)
    glob, layers, kept = agreeing_weights(config, eps, ssm_layers, head_scale, dev, dtype, gen, CODEC[precision])
    llm, plan, _ = build(shape_dict, precision, reserve, layers=layers, globals_=glob, dtype=dtype, device=device)
    return llm, ssm_of(shape_dict, glob, kept, dev, dtype), plan


