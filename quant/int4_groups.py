"""Group-quantized integer weights as AutoAWQ and GPTQ store them, dequantized with PyTorch on any device.

Both store each ``k``-bit weight ``q`` with a per-group zero point ``z`` and an fp16 scale ``s``:
``w = (q - z) * s``, with ``32 // k`` values packed into each int32 (the lowest bits first).

- AWQ (AutoAWQ's "gemm" layout): ``qweight`` int32 ``[in, out / 8]`` packed along the output
  dimension, its 8 values in the order ``AWQ_ORDER`` (nibble ``i`` holds column ``AWQ_ORDER[i]``);
  ``qzeros`` int32 ``[in / group, out / 8]`` packed the same way; ``scales`` fp16 ``[in / group, out]``.
- GPTQ (AutoGPTQ / GPTQModel): ``qweight`` int32 ``[in * k / 32, out]`` packed along the input dimension
  in order; ``qzeros`` int32 ``[groups, out * k / 32]`` packed along the output dimension in order,
  stored minus one in the original ("v1") format; ``scales`` fp16 ``[groups, out]``; ``g_idx`` int32
  ``[in]``: the group of each input row (``i // group`` unless the checkpoint was quantized in
  activation order, ``desc_act``).

The result is the Linear weight ``[out, in]`` in fp32 (one rounding: the fp32 product of two exact
values), so a cast to fp16 rounds like a kernel computing in fp16 would.
"""

from __future__ import annotations

import torch
from torch import Tensor

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # logical column held by each nibble of an AWQ int32
AWQ_UNDO = (0, 4, 1, 5, 2, 6, 3, 7)  # nibble holding each logical column: AWQ_ORDER[AWQ_UNDO[c]] == c


def _unpack_last(packed: Tensor, bits: int) -> Tensor:
    """int32 ``[..., n]`` -> ``[..., n, 32 // bits]``: each int's values, lowest bits first."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
    return (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)


def awq(qweight: Tensor, qzeros: Tensor, scales: Tensor, group: int) -> Tensor:
    """AWQ int4 (gemm layout) -> fp32 ``[out, in]``."""
    n_in = qweight.shape[0]
    undo = torch.tensor(AWQ_UNDO, device=qweight.device)
    q = _unpack_last(qweight, 4)[..., undo].reshape(n_in // group, group, -1)  # [groups, group, out]
    z = _unpack_last(qzeros, 4)[..., undo].reshape(n_in // group, 1, -1)  # [groups, 1, out]
    w = (q - z).float() * scales.float().unsqueeze(1)  # [groups, group, out]
    return w.reshape(n_in, -1).t()


def gptq(qweight: Tensor, qzeros: Tensor, scales: Tensor, g_idx: Tensor | None, bits: int, group: int,
         zero_offset: int) -> Tensor:
    """GPTQ ``bits``-bit -> fp32 ``[out, in]``. ``zero_offset``: 1 for the v1 format (zeros stored minus one),
    0 for v2. Without ``g_idx`` the rows are grouped in order, ``group`` at a time."""
    mask = (1 << bits) - 1
    # [in * bits / 32, out] -> [in * bits / 32, 32 / bits, out] -> [in, out]: the values of row r's int in order
    q = _unpack_last(qweight.t(), bits).permute(1, 2, 0).reshape(-1, qweight.shape[1])
    z = (_unpack_last(qzeros, bits).reshape(qzeros.shape[0], -1) + zero_offset) & mask  # [groups, out]
    s = scales.float()
    if g_idx is None:
        n_in = q.shape[0]
        w = (q.reshape(n_in // group, group, -1) - z.unsqueeze(1)).float() * s.unsqueeze(1)  # [groups, group, out]
        return w.reshape(n_in, -1).t()
    g = g_idx.long()
    return ((q - z[g]).float() * s[g]).t()  # [in, out] rows gathered by group, then [out, in]
