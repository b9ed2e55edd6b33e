"""Packing layouts checked against hand-computed words, plus round trips."""

from __future__ import annotations

import torch

from gcupipe.quant import packing


def test_modelslim_int4_low_nibble_is_even_index():
    q = torch.tensor([[1, 2, -1, -8, 7, 0]], dtype=torch.int8)
    packed = packing.pack_int4_modelslim(q)
    # 0x21 = 33; low=-1 (0xF), high=-8 (0x8) -> 0x8F = 143 -> -113 as int8; 0x07 = 7
    assert packed.tolist() == [[0x21, 0x8F - 256, 0x07]]
    assert torch.equal(packing.unpack_int4_modelslim(packed), q)


def test_gptq_4bit_word_layout_and_v1_zeros():
    # n = 8 outputs (rows repeat), k = 8 inputs: one int32 word per column, k-index i at
    # bits 4i, unsigned = q + 8.
    q = torch.tensor([[-8, -7, 0, 1, 2, 3, 4, 7]], dtype=torch.int8).repeat(8, 1)
    offset = torch.zeros(8, 1)
    offset[3] = -2  # unsigned zero 6, stored as 5 at nibble 3 of the qzeros word
    scale = torch.full((8, 1), 0.5)
    t = packing.pack_gptq(q, offset, scale, bits=4, group_size=8)
    nibbles = [0, 1, 8, 9, 10, 11, 12, 15]
    expected = sum(v << (4 * i) for i, v in enumerate(nibbles))
    assert t["qweight"].shape == (1, 8)
    assert all(w & 0xFFFFFFFF == expected for w in t["qweight"][0].tolist())
    assert t["qzeros"].shape == (1, 1)
    zero_word = t["qzeros"].item() & 0xFFFFFFFF
    assert [(zero_word >> (4 * i)) & 0xF for i in range(8)] == [7, 7, 7, 5, 7, 7, 7, 7]
    assert t["scales"].dtype == torch.float16 and t["scales"].shape == (1, 8)
    assert t["g_idx"].tolist() == [0] * 8


def test_gptq_8bit_symmetric_zero_bytes_are_127():
    q = torch.randint(-128, 128, (8, 16), dtype=torch.int8)
    t = packing.pack_gptq(q, torch.zeros(8, 1), torch.ones(8, 1), bits=8, group_size=0)
    assert t["qweight"].shape == (4, 8)
    assert torch.all(t["qzeros"].view(torch.int8) == 127)
    # How the GCU loader reads 8-bit weights: transpose, view bytes, subtract 128.
    gcu_view = t["qweight"].t().contiguous().view(torch.int8) - 128
    assert torch.equal(gcu_view.to(torch.int8), q)


def test_gptq_round_trip_asymmetric_groups():
    torch.manual_seed(0)
    for bits in (4, 8):
        lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1)
        q = torch.randint(lo, hi, (16, 128), dtype=torch.int8)
        offset = torch.randint(lo + 1, hi, (16, 2)).float()  # v1 zeros cannot hold qmin
        scale = torch.rand(16, 2) + 0.1
        t = packing.pack_gptq(q, offset, scale, bits=bits, group_size=64)
        assert t["qweight"].shape == (128 * bits // 32, 16)
        assert t["qzeros"].shape == (2, 16 * bits // 32)
        q2, offset2, scale2 = packing.unpack_gptq(t["qweight"], t["qzeros"], t["scales"], bits)
        assert torch.equal(q2, q)
        assert torch.equal(offset2, offset)
        assert torch.allclose(scale2, scale.half().float())


def test_awq_nibble_order():
    # k = 1, n = 8: column j holds unsigned value j; AWQ puts column ORDER[i] at nibble i.
    q = (torch.arange(8, dtype=torch.int8) - 8).reshape(8, 1)  # unsigned 0..7 per column
    t = packing.pack_awq(q, torch.zeros(8, 1), torch.ones(8, 1))
    word = t["qweight"].item() & 0xFFFFFFFF
    nibbles = [(word >> (4 * i)) & 0xF for i in range(8)]
    assert nibbles == [0, 2, 4, 6, 1, 3, 5, 7]
    assert t["qweight"].shape == (1, 1)


def test_awq_round_trip():
    torch.manual_seed(1)
    q = torch.randint(-8, 8, (16, 128), dtype=torch.int8)
    offset = torch.randint(-8, 8, (16, 2)).float()
    scale = torch.rand(16, 2) + 0.1
    t = packing.pack_awq(q, offset, scale)
    assert t["qweight"].shape == (128, 2) and t["qzeros"].shape == (2, 2)
    q2, offset2, _ = packing.unpack_awq(t["qweight"], t["qzeros"], t["scales"])
    assert torch.equal(q2, q) and torch.equal(offset2, offset)


def test_gptq_rejects_zero_point_it_cannot_store():
    q = torch.zeros(8, 8, dtype=torch.int8)
    import pytest

    with pytest.raises(ValueError, match="zero point"):
        packing.pack_gptq(q, torch.full((8, 1), -8.0), torch.ones(8, 1), bits=4, group_size=0)
