"""What `generate`, `serve` and `chat` share: the model, speculation, offload and batching options
(typer option objects, so each command lists them the same way) and the engine they build."""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional

import typer

LLM = typer.Option("demo", "--llm", "-m", "--model", help="Hub id, local directory, .gguf file, or offline model "
                   "name (demo, qwen-1.5b, qwen-0.5b).", rich_help_panel="Model")
LLM_MODEL = typer.Option(None, help="Force the model family (llama, qwen2, mistral, opt).", rich_help_panel="Model")
LLM_WEIGHT = typer.Option(None, help="Weights directory (split paths, with --llm-config).", rich_help_panel="Model")
LLM_CONFIG = typer.Option(None, help="config.json (split paths, with --llm-weight).", rich_help_panel="Model")
TOKENIZER = typer.Option(None, help="Tokenizer file or directory.", rich_help_panel="Model")
SSM = typer.Option([], "--ssm", "-md", "--model-draft", help="Small speculative model, resident on the "
                   "device; it must share the LLM's tokenizer (repeatable).", metavar="MODEL",
                   rich_help_panel="Speculation")
TREE_BUDGET = typer.Option("16", help="Speculated tokens per LLM pass (best-first growth), or 'auto'.", rich_help_panel="Speculation")
MAX_TREE_BUDGET = typer.Option(256, min=1, help="Largest budget --tree-budget auto may choose.", rich_help_panel="Speculation")
EXPANSION = typer.Option(None, help="SpecInfer per-depth expansion widths, e.g. 1,1,3,1,1,1,1,1.", rich_help_panel="Speculation")
MAX_DEPTH = typer.Option(None, min=1, help="Deepest speculated token of a tree [default: as deep as the tree budget "
                                              "(or the --expansion widths) allows].",
                         rich_help_panel="Speculation")
MAX_SEQUENCE_LENGTH = typer.Option(None, "--max-sequence-length", "-c", "--ctx-size", min=2,
                                   help="Prompt + output limit in tokens [default: min(2048, the model's context)].", rich_help_panel="Model")
FULL_PRECISION = typer.Option(False, help="fp32 (default: fp16 on CUDA, fp32 on CPU).", rich_help_panel="Model")
DEVICE = typer.Option("auto", help="auto, cpu, cuda, cuda:N.", rich_help_panel="Model")
OFFLOAD = typer.Option(False, help="Stream the LLM's decoder layers from host memory.", rich_help_panel="Offload and compression")
RESERVE = typer.Option("4G", help="Device memory cap for the LLM's weights: MB, or with a K/M/G suffix.",
                       metavar="SIZE", rich_help_panel="Offload and compression")
Q4 = typer.Option(False, "--4bit-quantization", help="Stream int4 (NF4) weights.",
                  rich_help_panel="Offload and compression")
Q8 = typer.Option(False, "--8bit-quantization", help="Stream int8 weights.", rich_help_panel="Offload and compression")
CODEC = typer.Option(None, "--quant-codec", "--codec", help="Codec: nf4, fp4, int8-row, int8-block (overrides the "
                     "4/8-bit flags).", rich_help_panel="Offload and compression")
REQUANTIZE = typer.Option(None, "--requantize", metavar="nf4|int8|dense", help="Dequantize a quantized checkpoint's "
                          "matrices (GGUF, AWQ, GPTQ, bitsandbytes) at load and compress them again with this codec "
                          "(dense: stream them at the model's precision), instead of streaming them as stored.",
                          rich_help_panel="Offload and compression")
BLOCK = typer.Option(64, "--quant-block-size", "--block-size", min=1, help="Elements per scale for block codecs.", rich_help_panel="Offload and compression")
RING = typer.Option(2, min=1, help="Device buffers streamed layers rotate through.", rich_help_panel="Offload and compression")
MAX_BATCH_SIZE = typer.Option(8, min=1, help="Most requests served together (one LLM pass per step for all).", rich_help_panel="Batching")
MAX_BATCH_TOKENS = typer.Option(2048, min=1, help="Most tokens (trees and prompt chunks) in one LLM pass.", rich_help_panel="Batching")
KV_CACHE_SIZE = typer.Option(None, metavar="SIZE", help="LLM KV pool size: MB, or with a K/M/G suffix [default: room for the "
                                        "batch at the maximum length].", rich_help_panel="Batching")
SAMPLING = "Sampling"
TEMPERATURE = typer.Option(0.0, "--temperature", "--temp", min=0.0, help="0 = greedy.", rich_help_panel=SAMPLING)
TOP_P = typer.Option(1.0, min=0.0, max=1.0, help="Nucleus sampling: keep the most likely tokens up to this "
                     "probability mass (1 = all).", rich_help_panel=SAMPLING)
TOP_K = typer.Option(0, min=0, help="Keep the k most likely tokens (0 = all).", rich_help_panel=SAMPLING)
REPETITION_PENALTY = typer.Option(1.0, min=0.0, help="Above 1 discourages tokens already in the context (1 = off).",
                                  rich_help_panel=SAMPLING)
SEED = typer.Option(None, min=0, help="Seed of each request's sampling (reproducible draws).",
                    rich_help_panel=SAMPLING)
EAGER = typer.Option(False, help="Run the SSMs eagerly instead of replaying CUDA graphs.", rich_help_panel="Speculation")


REQUANTIZE_CODECS = {"nf4": "nf4", "int8": "int8-row", "dense": None}  # dense: dequantized, streamed at the model dtype


@dataclass
class ModelOptions:
    llm: str = "demo"
    llm_model: Optional[str] = None
    llm_weight: Optional[Path] = None
    llm_config: Optional[Path] = None
    tokenizer: Optional[Path] = None
    ssm: tuple[str, ...] = ()
    tree_budget: str = "16"
    max_tree_budget: int = 256
    expansion: Optional[str] = None
    max_depth: Optional[int] = None
    max_sequence_length: Optional[int] = None
    use_full_precision: bool = False
    device: str = "auto"
    offload: bool = False
    offload_reserve_space_size: str = "4G"
    quant_4bit: bool = False
    quant_8bit: bool = False
    quant_codec: Optional[str] = None
    quant_block_size: int = 64
    requantize: Optional[str] = None
    offload_ring_slots: int = 2
    max_batch_size: int = 8
    max_batch_tokens: int = 2048
    kv_cache_size: Optional[str] = None
    enforce_eager: bool = False


# ModelOptions field -> (annotation, typer option): the options every model-loading command takes
_OPTIONS = {
    "llm": (str, LLM), "llm_model": (Optional[str], LLM_MODEL), "llm_weight": (Optional[Path], LLM_WEIGHT),
    "llm_config": (Optional[Path], LLM_CONFIG), "tokenizer": (Optional[Path], TOKENIZER), "ssm": (list[str], SSM),
    "tree_budget": (str, TREE_BUDGET), "max_tree_budget": (int, MAX_TREE_BUDGET),
    "expansion": (Optional[str], EXPANSION), "max_depth": (Optional[int], MAX_DEPTH),
    "max_sequence_length": (Optional[int], MAX_SEQUENCE_LENGTH), "use_full_precision": (bool, FULL_PRECISION),
    "device": (str, DEVICE), "offload": (bool, OFFLOAD), "offload_reserve_space_size": (str, RESERVE),
    "quant_4bit": (bool, Q4), "quant_8bit": (bool, Q8), "quant_codec": (Optional[str], CODEC),
    "quant_block_size": (int, BLOCK), "requantize": (Optional[str], REQUANTIZE), "offload_ring_slots": (int, RING), "max_batch_size": (int, MAX_BATCH_SIZE),
    "max_batch_tokens": (int, MAX_BATCH_TOKENS), "kv_cache_size": (Optional[str], KV_CACHE_SIZE),
    "enforce_eager": (bool, EAGER),
}


def model_options(batching: bool = True):
    """Give a command the model options: they are added to its signature (so typer lists them) and
    handed to it as one ``ModelOptions`` in its ``mo`` parameter. Without ``batching`` the batch options
    are left out (a chat serves one conversation)."""
    names = [n for n in _OPTIONS if batching or n not in ("max_batch_size", "max_batch_tokens")]
    assert set(_OPTIONS) == {f.name for f in fields(ModelOptions)}

    def wrap(fn):
        sig = inspect.signature(fn)
        own = [p for p in sig.parameters.values() if p.name != "mo"]
        added = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=_OPTIONS[n][1],
                                   annotation=_OPTIONS[n][0]) for n in names]

        @functools.wraps(fn)
        def command(**kwargs):
            picked = {n: kwargs.pop(n) for n in names}
            picked["ssm"] = tuple(picked["ssm"])
            return fn(mo=ModelOptions(**picked), **kwargs)

        command.__signature__ = sig.replace(parameters=own + added)
        return command
    return wrap


def device_of(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device: CUDA is not available on this machine")
    return dev


def dtype_for(device, full_precision: bool = False):
    """fp16 on a GPU, fp32 on the CPU (or whenever full precision is asked for)."""
    import torch

    return torch.float32 if (full_precision or device.type == "cpu") else torch.float16


def _expansion(text: Optional[str]) -> tuple[int, ...]:
    if not text:
        return ()
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"--expansion: expected comma-separated integers, got {text!r}") from None


def tree_config(o: ModelOptions):
    """The tree settings (ValueError for bad ones)."""
    from offload_infer.speculate import TreeConfig

    try:
        if o.max_batch_tokens < o.max_batch_size:
            raise ValueError(f"--max-batch-tokens ({o.max_batch_tokens}) must be at least --max-batch-size "
                             f"({o.max_batch_size})")
        auto = o.tree_budget.strip().lower() == "auto"
        if not auto and not o.tree_budget.strip().isdigit():
            raise ValueError(f"--tree-budget must be a positive integer or 'auto', got {o.tree_budget!r}")
        return TreeConfig(budget=o.max_tree_budget if auto else int(o.tree_budget), auto=auto,
                          expansion=_expansion(o.expansion), max_depth=o.max_depth)
    except ValueError as e:
        raise ValueError(str(e)) from None


def build_engine(o: ModelOptions, n_requests: int):
    """Load the LLM and SSMs and build the engine, with a KV pool for ``n_requests`` requests of the
    maximum length unless --kv-cache-size says otherwise. Returns (engine, tokenizer). Raises ValueError
    for bad settings (before anything loads) and ValueError/OSError/RuntimeError for what loading finds."""
    from offload_infer.engine import BLOCK_SIZE, Engine, request_slots, ssm_pool_blocks
    from offload_infer.memory import Footprint, check_footprint, kv_pool_bytes, resident_footprint
    from offload_infer.offload import OffloadBuilder, parse_size
    from offload_infer.speculate import shared_vocab_size
    from weights.load import load_model, read_config, resident_layers
    from weights.resolve import resolve

    tree_cfg = tree_config(o)
    dev = device_of(o.device)
    dtype = dtype_for(dev, o.use_full_precision)
    if o.quant_4bit and o.quant_8bit:
        raise ValueError("choose one of --4bit-quantization and --8bit-quantization")
    codec = o.quant_codec or ("nf4" if o.quant_4bit else "int8-row" if o.quant_8bit else None)
    if o.requantize is not None:
        if o.requantize not in REQUANTIZE_CODECS:
            raise ValueError(f"--requantize: choose one of {', '.join(REQUANTIZE_CODECS)}, got {o.requantize!r}")
        if codec and codec != REQUANTIZE_CODECS[o.requantize]:
            raise ValueError(f"--requantize {o.requantize} and --quant-codec {codec} disagree: give one")
        codec = REQUANTIZE_CODECS[o.requantize]
        if not o.offload:
            raise ValueError("--requantize applies to streamed weights: add --offload")
    if codec and not o.offload:
        raise ValueError("weight compression applies to streamed weights: add --offload")
    resolved = resolve(o.llm if o.llm_weight is None else None, str(o.llm_weight) if o.llm_weight else None,
                       str(o.llm_config) if o.llm_config else None, str(o.tokenizer) if o.tokenizer else None)
    ssm_resolved = [resolve(name) for name in o.ssm]  # a bad SSM name fails before the LLM loads
    llm_config = read_config(resolved, o.llm_model)
    # the KV pool: --kv-cache-size, or room for as many full-length requests as run together
    kv_bytes = parse_size(o.kv_cache_size) if o.kv_cache_size else None
    max_len = o.max_sequence_length or min(2048, llm_config.max_position_embeddings)
    full = request_slots(max_len, tree_cfg, len(o.ssm))
    kv_tokens = min(o.max_batch_size, n_requests) * -(-full // BLOCK_SIZE) * BLOCK_SIZE
    kv_cache_size = kv_bytes or kv_pool_bytes(llm_config, dtype, kv_tokens)
    llm_blocks = kv_cache_size // (kv_pool_bytes(llm_config, dtype, 1) * BLOCK_SIZE)
    # what the pools will hold: each has one scratch block beyond the blocks it hands out
    llm_kv_slots = (llm_blocks + 1) * BLOCK_SIZE
    others = Footprint()  # the SSMs, each with its KV pool (counted in the pre-flight before anything loads)
    for name, r in zip(o.ssm, ssm_resolved):
        slots = (ssm_pool_blocks(llm_blocks, full, tree_cfg) + 1) * BLOCK_SIZE
        others = others.merged(resident_footprint(f"SSM {name}", read_config(r), dtype, dev, slots))
    if o.offload:
        builder = OffloadBuilder(parse_size(o.offload_reserve_space_size), codec, o.quant_block_size,
                                 o.offload_ring_slots, kv_bytes=kv_pool_bytes(llm_config, dtype, llm_kv_slots),
                                 others=others, requantize=o.requantize is not None)
    else:
        builder = resident_layers
        fp = resident_footprint("LLM", llm_config, dtype, dev, llm_kv_slots)
        fp.add("activations", 256 * 2**20, dev)
        fp = fp.merged(others)
        check_footprint(fp, dev, hint_device=" (add --offload to stream the LLM's weights)")
    main = load_model(resolved, device=dev, dtype=dtype, model_type=o.llm_model, layer_builder=builder)
    tok = main.tokenizer
    if tok is None:
        raise ValueError(f"{resolved.name} has no tokenizer files; pass --tokenizer PATH")
    vocab = tok.vocab_size
    ssms = []
    for name, r in zip(o.ssm, ssm_resolved):
        loaded = load_model(r, device=dev, dtype=dtype)
        if loaded.tokenizer is None:
            raise ValueError(f"SSM {name} has no tokenizer files to check against the LLM's")
        vocab = min(vocab, shared_vocab_size(tok.token_strings(), loaded.tokenizer.token_strings(),
                                             main.model.vocab_size, loaded.model.vocab_size, name))
        ssms.append(loaded.model)
    engine = Engine(main.model, ssms, tree_cfg, max_len, tok.eos_ids,
                    min(vocab, main.model.vocab_size), ssm_static=False if o.enforce_eager else None,
                    max_batch_size=o.max_batch_size, max_batch_tokens=o.max_batch_tokens,
                    kv_cache_size=kv_cache_size, detokenize=tok.decode)
    engine.footprint = builder.footprint if o.offload else fp  # what the pre-flight counted (benchmarks read it)
    return engine, tok
