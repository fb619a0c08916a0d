"""The 8-bit moment codec against the formula it implements, and against bitsandbytes, whose format it keeps.

The formula: a block's scale is its largest |value|, and each value takes the code whose map value is nearest to
value/scale (an argmin over the 256 map values, computed here without the codec's tables); a positive second
moment never takes the zero code. bitsandbytes must decode our bytes to the same numbers, and where its own
encoder picks the nearest code, ours must pick the same one.
"""

from __future__ import annotations

import bitsandbytes.functional as bnbf
import pytest
import torch

from gnlorp.optim.codec import code_map, decode, encode

BLOCKS = 512
BLOCKSIZE = 256


def spread_values(signed: bool, seed: int = 0) -> torch.Tensor:
    """Blocks whose values span ten decades below their maximum, the range Adam's moments cover."""
    gen = torch.Generator().manual_seed(seed)
    magnitude = 10 ** (-10 * torch.rand(BLOCKS, BLOCKSIZE, generator=gen))
    sign = torch.where(torch.rand(BLOCKS, BLOCKSIZE, generator=gen) < 0.5, -1.0, 1.0) if signed else 1.0
    scale = 10 ** (8 * torch.rand(BLOCKS, 1, generator=gen) - 4)
    values = magnitude * sign * scale
    values[::7] = 0.0  # all-zero blocks
    values[1::7, ::9] = 0.0  # zeros inside blocks
    return values


def nearest_codes(values: torch.Tensor, map_values: torch.Tensor) -> torch.Tensor:
    absmax = values.abs().amax(dim=1, keepdim=True)
    normalized = values / torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    return (normalized[..., None] - map_values).abs().argmin(dim=-1)


@pytest.mark.parametrize("signed", [True, False])
def test_encode_takes_the_nearest_code_and_the_largest_value_as_scale(signed: bool) -> None:
    cmap = code_map(signed)
    values = spread_values(signed)
    codes, absmax = encode(values, cmap.tables)
    assert codes.dtype == torch.uint8 and codes.shape == values.shape
    assert torch.equal(absmax, values.abs().amax(dim=1))
    expected = nearest_codes(values, cmap.values)
    if not signed:
        expected = torch.where((values > 0) & (expected == 0), 1, expected)
    assert torch.equal(codes.long(), expected)


def test_a_positive_second_moment_never_decodes_to_zero() -> None:
    """Adam divides by √S: a tiny positive S stored as zero would turn M into M/eps."""
    cmap = code_map(False)
    values = torch.full((1, BLOCKSIZE), 1e-12)
    values[0, 0] = 1.0
    codes, absmax = encode(values, cmap.tables)
    decoded = decode(codes, absmax, cmap.tables)
    assert (decoded > 0).all()
    assert decoded[0, 1] == cmap.values[1]  # the smallest non-zero code, 3.25e-7 of the block's scale


@pytest.mark.parametrize("signed", [True, False])
def test_bitsandbytes_decodes_our_codes_to_the_same_values(signed: bool) -> None:
    cmap = code_map(signed)
    codes, absmax = encode(spread_values(signed, seed=1), cmap.tables)
    theirs = bnbf.dequantize_blockwise(codes.flatten(), absmax=absmax, code=cmap.values.clone(), blocksize=BLOCKSIZE)
    assert torch.equal(decode(codes, absmax, cmap.tables).flatten(), theirs)


@pytest.mark.parametrize("signed", [True, False])
def test_our_codes_equal_bitsandbytes_where_it_picks_the_nearest_and_are_nearer_elsewhere(signed: bool) -> None:
    cmap = code_map(signed)
    values = spread_values(signed, seed=2)
    ours, absmax = encode(values, cmap.tables)
    map_values = cmap.values.clone()  # bitsandbytes' CPU encoder writes -1 into the map's first value
    theirs, state = bnbf.quantize_blockwise(values.flatten(), code=map_values, blocksize=BLOCKSIZE)
    theirs = theirs.view_as(values)
    assert torch.equal(state.absmax, absmax)
    nearest = nearest_codes(values, cmap.values)
    zero_rule = (values > 0) & (nearest == 0)
    agree = (theirs.long() == nearest) & ~zero_rule
    normalized = values / torch.where(absmax > 0, absmax, 1.0)[:, None]
    # bitsandbytes' table search strays from the nearest code mostly on values below 1e-3 of their block's maximum
    assert agree[normalized.abs() >= 1e-3].float().mean() > 0.98
    assert torch.equal(ours[agree], theirs[agree])
    our_error = (cmap.values[ours.long()] - normalized).abs()
    their_error = (cmap.values[theirs.long()] - normalized).abs()
    assert (our_error[~zero_rule] <= their_error[~zero_rule]).all()


def test_every_bfloat16_bucket_holds_at_most_one_midpoint() -> None:
    """The encoder's one comparison is enough only if no bucket of its table holds two midpoints between codes.

    A bucket is the set of floats sharing their top 16 bits: one sign, one binade [2^(e-1), 2^e), and one of the
    binade's 128 equal slices. Computed here from frexp, not from bit patterns as the codec does.
    """
    for signed in (True, False):
        map_values = code_map(signed).values.double()
        midpoints = (map_values[1:] + map_values[:-1]) / 2
        mantissa, exponent = torch.frexp(midpoints.abs())  # |m| = mantissa · 2^exponent, mantissa in [0.5, 1)
        slice_index = torch.floor((mantissa - 0.5) * 256)
        buckets = list(zip(torch.sign(midpoints).tolist(), exponent.tolist(), slice_index.tolist(), strict=True))
        assert len(set(buckets)) == len(buckets)


def test_4bit_maps_are_the_papers() -> None:
    """16 sorted dynamic-exponent values each: the first moment's with an exact zero and +1; the second moment's
    with no zero (DE-0), its smallest half the next one."""
    for signed in (True, False):
        values = code_map(signed, bits=4).values
        assert values.numel() == 16 and bool((values[1:] > values[:-1]).all()) and values[-1] == 1.0
    assert 0.0 in code_map(True, bits=4).values.tolist()
    unsigned = code_map(False, bits=4).values
    assert unsigned[0] > 0 and unsigned[0] == unsigned[1] / 2


@pytest.mark.parametrize("signed", [True, False])
def test_4bit_codes_are_the_nearest_packed_two_a_byte_high_half_first(signed: bool) -> None:
    cmap = code_map(signed, bits=4)
    values = spread_values(signed, seed=3).view(-1, 128)  # 4-bit blocks hold 128 values
    packed, absmax = encode(values, cmap.tables)
    assert packed.shape == (values.shape[0], 64) and packed.dtype == torch.uint8
    nearest = nearest_codes(values, cmap.values)
    assert torch.equal(packed.long(), nearest[:, 0::2] * 16 + nearest[:, 1::2])
    decoded = decode(packed, absmax, cmap.tables)
    assert torch.equal(decoded, cmap.values[nearest] * absmax[:, None])
