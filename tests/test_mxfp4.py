"""MXFP4 unpacking is bit-exact against transformers' own dequantization."""

import pytest
import torch

from swallow_stream.ops import FP4_VALUES, dequantize_mxfp4

mxfp4 = pytest.importorskip("transformers.integrations.mxfp4")


@pytest.mark.parametrize("shape", [(2, 8, 3), (5, 64, 2), (1, 1, 1)])
def test_dequantize_bit_exact_vs_transformers(shape):
    e, out, groups = shape
    g = torch.Generator().manual_seed(sum(shape))
    blocks = torch.randint(0, 256, (e, out, groups, 16), generator=g, dtype=torch.int32).to(torch.uint8)
    scales = torch.randint(100, 140, (e, out, groups), generator=g, dtype=torch.int32).to(torch.uint8)
    ours = dequantize_mxfp4(blocks, scales, torch.float32)  # [E, out, in]
    ref = mxfp4.convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # [E, in, out]
    assert ours.shape == (e, out, groups * 32)
    assert torch.equal(ours.view(torch.int32), ref.transpose(1, 2).contiguous().view(torch.int32))


def test_nibble_order_and_scale():
    # byte 0x21: low nibble 1 (0.5) is the even element, high nibble 2 (1.0) the odd one
    blocks = torch.zeros(1, 1, 16, dtype=torch.uint8)
    blocks[0, 0, 0] = 0x21
    blocks[0, 0, 1] = 0xF8  # low 8 -> -0.0, high 15 -> -6
    scales = torch.tensor([[128]], dtype=torch.uint8)  # 2**1
    w = dequantize_mxfp4(blocks, scales)[0]
    assert w[:4].tolist() == [1.0, 2.0, -0.0, -12.0]
    assert torch.signbit(w[2])
    assert len(FP4_VALUES) == 16 and FP4_VALUES[7] == 6.0 and FP4_VALUES[15] == -6.0


def test_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="do not match"):
        dequantize_mxfp4(torch.zeros(1, 2, 16, dtype=torch.uint8), torch.zeros(1, 3, dtype=torch.uint8))
    with pytest.raises(TypeError, match="uint8"):
        dequantize_mxfp4(torch.zeros(1, 2, 16), torch.zeros(1, 2, dtype=torch.uint8))
