"""Block-wise quantization: the maps' structure, the reference against float64 nearest-code
search, and the Triton kernels (interpreter on CPU) against the reference."""

import pytest
import torch

from bytetune.kernels.blockwise import (
    dequantize_blockwise,
    dequantize_blockwise_reference,
    dequantize_blockwise_triton,
    nearest_code_reference,
    quantize_blockwise,
    quantize_blockwise_reference,
    quantize_blockwise_triton,
)
from bytetune.kernels.quant_maps import code_midpoints, dynamic_map, linear_map
from tests.kernels.triton_rounding import cast_like_triton

# ~1e6 runs only on a GPU: the interpreter needs ~0.1 s per 256-element program (measured ~400 s).
SIZES = [1, 255, 256, 257, 4097] + ([1_000_003] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_structure(signed):
    codes = dynamic_map(signed).double()
    assert codes.numel() == 256 and torch.all(codes[1:] > codes[:-1])
    assert 0.0 in codes.tolist() and 1.0 in codes.tolist()
    smallest = codes.abs()[codes != 0].min().item()
    assert smallest == pytest.approx(5.5e-7 if signed else 3.25e-7, rel=1e-6)
    if signed:
        assert (codes < 0).sum() == 127 and (codes > 0).sum() == 128
    else:
        assert (codes < 0).sum() == 0
    # One decade holds 2**i (signed) or 2**(i+1) (unsigned) codes per sign.
    in_top_decade = ((codes > 0.1) & (codes < 1.0)).sum().item()
    assert in_top_decade == (64 if signed else 128)


@pytest.mark.parametrize("block_size", [256, 2048])
@pytest.mark.parametrize("shape", [(1,), (3, 85), (2048 * 2 + 5,), (7, 11, 13)])
def test_reference_picks_nearest_code(shape, block_size):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=gen) * torch.rand(shape, generator=gen) ** 4
    code_map = dynamic_map(True)
    codes, absmax = quantize_blockwise_reference(x, code_map, block_size)
    assert codes.shape == x.shape and codes.dtype == torch.uint8
    flat = torch.nn.functional.pad(x.reshape(-1).double(), (0, absmax.numel() * block_size - x.numel()))
    expected_absmax = flat.view(-1, block_size).abs().amax(1)
    torch.testing.assert_close(absmax.double(), expected_absmax, rtol=0, atol=0)
    normalized = (flat.view(-1, block_size) / expected_absmax[:, None]).reshape(-1)[: x.numel()]
    distance = (normalized[:, None] - code_map.double()[None, :]).abs()
    chosen = distance.gather(1, codes.reshape(-1, 1).long()).squeeze(1)
    # The chosen code is the nearest one up to float32 rounding of x / absmax.
    assert torch.all(chosen <= distance.min(1).values + 1e-7)
    roundtrip = dequantize_blockwise_reference(codes, absmax, code_map, block_size)
    assert roundtrip.shape == x.shape


@pytest.mark.parametrize("code_map", [dynamic_map(True), dynamic_map(False), linear_map(True), linear_map(False)])
def test_nearest_code_table_equals_bucketize(code_map):
    # The table lookup must give torch.bucketize's answer bit for bit: on values of every
    # magnitude, on each midpoint and its float neighbours (the ties), and on the special values
    # (NaN aside: no state is ever NaN, and bucketize and the kernel's search disagree on it).
    midpoints = code_midpoints(code_map)
    gen = torch.Generator().manual_seed(3)
    scattered = torch.randn(200_000, generator=gen) * 10.0 ** torch.randint(-12, 1, (200_000,), generator=gen)
    specials = torch.tensor([0.0, -0.0, 1.0, -1.0, 1e-45, -1e-45, float("inf"), -float("inf")])
    up, down = torch.tensor(2.0), torch.tensor(-2.0)
    values = torch.cat([scattered, midpoints, torch.nextafter(midpoints, up), torch.nextafter(midpoints, down), code_map, specials])
    expected = torch.bucketize(values, midpoints).to(torch.uint8)
    assert torch.equal(nearest_code_reference(values, midpoints), expected)
    blocks = scattered.view(-1, 250)  # any shape, as quantize_blocks_reference passes [blocks, block]
    assert torch.equal(nearest_code_reference(blocks, midpoints), torch.bucketize(blocks, midpoints).to(torch.uint8))


def test_nearest_code_falls_back_when_midpoints_crowd_a_bin():
    # 255 midpoints inside [0.5, 0.502): one 16-bit bin of floats holds several of them.
    midpoints = 0.5 + torch.arange(255, dtype=torch.float32) * 1e-5
    values = torch.rand(10_000, generator=torch.Generator().manual_seed(4)) * 0.01 + 0.495
    assert torch.equal(nearest_code_reference(values, midpoints), torch.bucketize(values, midpoints).to(torch.uint8))


def test_zero_block_and_exact_absmax():
    x = torch.zeros(600)
    x[300] = -3.0
    x[301] = 2.5
    codes, absmax = quantize_blockwise_reference(x, dynamic_map(True))
    assert absmax.tolist() == [0.0, 3.0, 0.0]
    out = dequantize_blockwise_reference(codes, absmax, dynamic_map(True))
    assert out[:256].abs().max() == 0 and out[302:].abs().max() == 0
    # The signed map has no -1.0: the block's most negative code is its closest stand-in.
    assert out[300] == 3.0 * dynamic_map(True)[0]
    assert abs(out[301].item() - 2.5) < 0.02


def _compare_codes(codes_a, codes_b):
    diff = (codes_a.int() - codes_b.int()).abs()
    assert diff.max() <= 1, "codes more than one step apart"
    assert diff.count_nonzero().item() <= max(1, int(1e-3 * codes_a.numel())), "too many off-by-one codes"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("numel", SIZES)
@pytest.mark.parametrize("signed", [True, False])
def test_triton_quantize_matches_reference(numel, dtype, signed, device):
    gen = torch.Generator().manual_seed(numel)
    x = torch.randn(numel, generator=gen) * torch.rand(numel, generator=gen) ** 3
    x = (x if signed else x.abs()).to(dtype).to(device)
    code_map = dynamic_map(signed, device)
    codes_t, absmax_t = quantize_blockwise_triton(x, code_map)
    codes_r, absmax_r = quantize_blockwise_reference(x, code_map)
    torch.testing.assert_close(absmax_t, absmax_r, rtol=0, atol=0)
    _compare_codes(codes_t, codes_r)
    out_t = dequantize_blockwise_triton(codes_r, absmax_r, code_map, dtype=dtype)
    out_r = dequantize_blockwise_reference(codes_r, absmax_r, code_map)
    torch.testing.assert_close(out_t, cast_like_triton(out_r, dtype), rtol=0, atol=0)


@pytest.mark.parametrize("block_size", [64, 2048])
def test_triton_other_block_sizes(block_size, device):
    x = torch.randn(2 * block_size + 3, generator=torch.Generator().manual_seed(3)).to(device)
    code_map = dynamic_map(True, device)
    codes_t, absmax_t = quantize_blockwise_triton(x, code_map, block_size)
    codes_r, absmax_r = quantize_blockwise_reference(x, code_map, block_size)
    assert absmax_t.numel() == 3
    torch.testing.assert_close(absmax_t, absmax_r, rtol=0, atol=0)
    _compare_codes(codes_t, codes_r)


def test_public_ops_dispatch_and_errors():
    x = torch.randn(300)
    codes, absmax = quantize_blockwise(x, dynamic_map(True))
    torch.testing.assert_close(dequantize_blockwise(codes, absmax, dynamic_map(True)), x, atol=0.03, rtol=0.05)
    with pytest.raises(ValueError, match="block_size"):
        quantize_blockwise(x, dynamic_map(True), block_size=300)
    with pytest.raises(ValueError, match="code_map"):
        quantize_blockwise(x, dynamic_map(True)[:10])
    assert linear_map(True).numel() == linear_map(False).numel() == 256
