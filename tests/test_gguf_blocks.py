"""quant/gguf_blocks.py dequantizes every handled GGUF block type to the bit what the gguf package does."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from quant.gguf_blocks import DEQUANTIZE, dequantize


@pytest.mark.parametrize("name", sorted(DEQUANTIZE))
def test_bit_identical_to_the_gguf_package(name):
    import gguf

    qtype = gguf.GGMLQuantizationType[name]
    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, size=(3000, nbytes), dtype=np.uint8)
    fp16 = rng.standard_normal(3000).astype(np.float16).view(np.uint8).reshape(3000, 2)
    scale_at = {"Q6_K": 208}.get(name, 0)  # most of the fp16 scales finite (random bytes give some inf/NaN too)
    blocks[:2000, scale_at: scale_at + 2] = fp16[:2000]
    with np.errstate(invalid="ignore", over="ignore"):  # the inf/NaN scales
        ref = gguf.quants.dequantize(blocks, qtype)  # [3000, block]
    ours = DEQUANTIZE[name](torch.from_numpy(blocks)).numpy()
    np.testing.assert_array_equal(ours, ref)


def test_a_real_checkpoints_tensors(smollm2_path):
    import gguf

    from weights.gguf_reader import GGUFFile

    f = GGUFFile(smollm2_path)
    seen = set()
    for t in f.tensors:
        if t.tensor_type.name in DEQUANTIZE and t.tensor_type.name not in seen:
            seen.add(t.tensor_type.name)
            shape = tuple(reversed(t.shape))
            ours = dequantize(t.data, t.tensor_type.name, gguf.GGML_QUANT_SIZES[t.tensor_type][1], shape)
            np.testing.assert_array_equal(ours.numpy(), gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape))
    assert seen
    assert dequantize(f.tensors[0].data, "IQ2_XXS", 1, (1,)) is None


@pytest.mark.cuda
@pytest.mark.parametrize("name", sorted(DEQUANTIZE))
def test_cuda_matches_the_cpu(name):
    import gguf

    nbytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]][1]
    blocks = torch.randint(0, 256, (512, nbytes), dtype=torch.uint8)
    blocks[:, :2] = torch.from_numpy(np.random.default_rng(1).standard_normal(512).astype(np.float16)
                                     .view(np.uint8).reshape(512, 2))
    cpu = DEQUANTIZE[name](blocks)
    gpu = DEQUANTIZE[name](blocks.cuda()).cpu()
    torch.testing.assert_close(gpu, cpu, equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["Q4_K", "Q5_0", "Q8_0"])
def test_chunked_dequantization_into_a_dtype_equals_the_whole(name, monkeypatch):
    """``dequantize`` works a few blocks at a time straight into its result: the same values as the whole
    tensor at once (and, for fp16, those values rounded once)."""
    import gguf

    import quant.gguf_blocks as gb

    nbytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]][1]
    per_block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]][0]
    rng = np.random.default_rng(2)
    blocks = rng.integers(0, 256, size=(40, nbytes), dtype=np.uint8)
    blocks[:, :2] = rng.standard_normal(40).astype(np.float16).view(np.uint8).reshape(40, 2)
    whole = DEQUANTIZE[name](torch.from_numpy(blocks)).reshape(40 * per_block // 64, 64)
    monkeypatch.setattr(gb, "CHUNK_BYTES", 6 * nbytes)  # 7 chunks, the last one short
    shape = (40 * per_block // 64, 64)
    torch.testing.assert_close(dequantize(blocks, name, nbytes, shape), whole, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(dequantize(blocks, name, nbytes, shape, torch.float16), whole.half(), rtol=0, atol=0,
                               equal_nan=True)
    if torch.cuda.is_available():
        on_gpu = dequantize(blocks, name, nbytes, shape, torch.float16, "cuda")
        assert on_gpu.is_cuda
        torch.testing.assert_close(on_gpu.cpu(), whole.half(), rtol=0, atol=0, equal_nan=True)
