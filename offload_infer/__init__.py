"""offload-infer: run LLMs larger than GPU memory, weights streamed from host memory, with token-tree
speculation. ``from offload_infer import LLM, SamplingParams``."""

from __future__ import annotations

__all__ = ["LLM", "Result", "SamplingParams"]


def __getattr__(name: str):
    # imported on first use, so `offload-infer --help` does not pay for torch
    if name in ("LLM", "Result"):
        from offload_infer import llm

        return getattr(llm, name)
    if name == "SamplingParams":
        from offload_infer.sampling import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'offload_infer' has no attribute {name!r}")
