"""Integer packing for every format, written once: modelslim int4 nibbles, GPTQ and AWQ int32.

Inputs are always the shared representation's SIGNED values (int8 tensors holding int4/int8
values, see quant/scheme.py). Formats with unsigned storage add 2**(bits-1).

Layouts (n = output features, k = input features, g = group size):
- modelslim W4A16: int8 [n, k/2]; byte j of a row holds k-index 2j in the LOW nibble and
  2j+1 in the HIGH nibble, both two's-complement 4-bit.
- GPTQ (bits 4 or 8): `qweight` int32 [k*b/32, n], packed along k: word r of column c holds
  k-index r*(32/b)+i at bit offset i*b, as unsigned u = q + 2**(b-1). `qzeros` int32
  [k/g, n*b/32], packed along n the same way, storing `zero - 1` (the GPTQ "v1" convention that
  vLLM's gptq kernels and vLLM-GCU read: they add 1 back; GCU's 8-bit path asserts every
  symmetric zero byte equals 127). `scales` [k/g, n].
- AWQ gemm (bits 4): `qweight` int32 [k, n/8] packed along n; nibble i of word c holds
  column c*8 + AWQ_ORDER[i]. `qzeros` int32 [k/g, n/8], same order, unsigned zero stored as is
  (no -1). `scales` [k/g, n].
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
AWQ_REVERSE_ORDER = [0, 4, 1, 5, 2, 6, 3, 7]


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """Reinterpret int64 values in [0, 2**32) as int32 bit patterns (two's complement)."""
    import torch

    words = words & 0xFFFFFFFF
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _pack_last_dim(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned `bits`-wide values along the last dim into int32, low bits first."""
    import torch

    per_word = 32 // bits
    if values.shape[-1] % per_word:
        raise ValueError(f"size {values.shape[-1]} is not a multiple of {per_word}")
    v = values.to(torch.int64).reshape(*values.shape[:-1], -1, per_word)
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    return _to_int32((v << shifts).sum(dim=-1))


def _unpack_last_dim(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of _pack_last_dim: unsigned values as int32, last dim grows by 32/bits."""
    import torch

    per_word = 32 // bits
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    v = (words.to(torch.int64).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return v.reshape(*words.shape[:-1], -1).to(torch.int32)


# ---- modelslim W4A16 -----------------------------------------------------------------------


def pack_int4_modelslim(q: torch.Tensor) -> torch.Tensor:
    """Signed int4 values [n, k] (int8 tensor) -> int8 [n, k/2], low nibble = even k."""
    import torch

    if q.shape[-1] % 2:
        raise ValueError("int4 packing needs an even number of input features")
    v = q.to(torch.int16) & 0xF
    byte = v[..., 0::2] | (v[..., 1::2] << 4)
    return torch.where(byte >= 128, byte - 256, byte).to(torch.int8)


def unpack_int4_modelslim(packed: torch.Tensor) -> torch.Tensor:
    """int8 [n, k/2] -> signed int4 values [n, k] in an int8 tensor."""
    import torch

    b = packed.to(torch.int16) & 0xFF
    low, high = b & 0xF, (b >> 4) & 0xF
    out = torch.stack([low, high], dim=-1).reshape(*packed.shape[:-1], -1)
    return torch.where(out >= 8, out - 16, out).to(torch.int8)


# ---- GPTQ ----------------------------------------------------------------------------------


def pack_gptq(
    q: torch.Tensor, offset: torch.Tensor, scale: torch.Tensor, bits: int, group_size: int
) -> dict[str, torch.Tensor]:
    """Shared representation -> GPTQ tensors {qweight, qzeros, scales, g_idx}.

    q: signed [n, k]; offset/scale: [n, groups] (groups = 1 for per-channel). group_size 0
    means one group spanning k (written as GPTQ group_size -1). g_idx is always i // g."""
    import torch

    if bits not in (4, 8):
        raise ValueError("GPTQ packing supports bits 4 and 8")
    half = 2 ** (bits - 1)
    n, k = q.shape
    unsigned = (q.to(torch.int32) + half).t().contiguous()  # [k, n]
    qweight = _pack_last_dim(unsigned.t(), bits).t().contiguous()  # [k*b/32, n]
    zeros = (torch.round(offset.float()).to(torch.int32) + half - 1).t().contiguous()  # [G, n]
    if bool((zeros < 0).any()):
        raise ValueError(
            "GPTQ (v1) cannot store a zero point at the lowest integer (it stores zero - 1): "
            "quantize with observers.scale_offset_from_range, which keeps offset >= qmin + 1"
        )
    qzeros = _pack_last_dim(zeros, bits)
    g = group_size or k
    g_idx = (torch.arange(k, dtype=torch.int32) // g).to(torch.int32)
    return {
        "qweight": qweight,
        "qzeros": qzeros,
        "scales": scale.float().t().contiguous().to(torch.float16),
        "g_idx": g_idx,
    }


def unpack_gptq(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, bits: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ tensors -> (signed q [n, k], offset [n, G], scale [n, G]) of the shared form."""
    import torch

    half = 2 ** (bits - 1)
    unsigned = _unpack_last_dim(qweight.t().contiguous(), bits)  # [n, k]
    q = (unsigned - half).to(torch.int8)
    zeros = _unpack_last_dim(qzeros, bits)  # [G, n]
    offset = (zeros + 1 - half).float().t().contiguous()
    return q, offset, scales.float().t().contiguous()


# ---- AWQ gemm ------------------------------------------------------------------------------


def _awq_interleave(values: torch.Tensor) -> torch.Tensor:
    """Reorder columns so that plain low-bits-first packing yields AWQ's nibble order."""
    cols = values.shape[-1]
    v = values.reshape(*values.shape[:-1], cols // 8, 8)
    return v[..., AWQ_ORDER].reshape(*values.shape)


def _awq_deinterleave(values: torch.Tensor) -> torch.Tensor:
    cols = values.shape[-1]
    v = values.reshape(*values.shape[:-1], cols // 8, 8)
    return v[..., AWQ_REVERSE_ORDER].reshape(*values.shape)


def pack_awq(q: torch.Tensor, offset: torch.Tensor, scale: torch.Tensor) -> dict[str, torch.Tensor]:
    """Shared representation (4-bit) -> AWQ gemm tensors {qweight, qzeros, scales}."""
    import torch

    unsigned = (q.to(torch.int32) + 8).t().contiguous()  # [k, n]
    zeros = (torch.round(offset.float()).to(torch.int32) + 8).t().contiguous()  # [G, n]
    return {
        "qweight": _pack_last_dim(_awq_interleave(unsigned), 4),
        "qzeros": _pack_last_dim(_awq_interleave(zeros), 4),
        "scales": scale.float().t().contiguous().to(torch.float16),
    }


def unpack_awq(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """AWQ gemm tensors -> (signed q [n, k], offset [n, G], scale [n, G])."""
    import torch

    unsigned = _awq_deinterleave(_unpack_last_dim(qweight, 4))  # [k, n]
    zeros = _awq_deinterleave(_unpack_last_dim(qzeros, 4))  # [G, n]
    q = (unsigned - 8).to(torch.int8).t().contiguous()
    offset = (zeros - 8).float().t().contiguous()
    return q, offset, scales.float().t().contiguous()
