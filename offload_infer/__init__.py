"""offload-infer: weight-streaming, token-tree speculative LLM inference on one GPU."""
