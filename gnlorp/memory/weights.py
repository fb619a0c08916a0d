"""Bytes of a frozen bitsandbytes base, per weight matrix, as bitsandbytes stores it (checked against real layers in
tests/test_quantized.py).

NF4 (4 bits): two weights per byte; one absmax per block of 64 weights, itself quantized to 8 bits (double
quantization) with an fp32 scale per 256 absmax values; a 16-entry fp32 code book per matrix; the 256-entry fp32
code book of the nested quantization is one table the process shares, too small to count.
int8: one byte per weight and an fp32 scale per output row.
While a layer computes, its weight exists dequantized in the compute dtype: one matrix at a time (the transient).
Int8 *trained* weights (full, galore, gradnormlorp at weight_bits 8) have their own group format, whose single
source is optim/rounding.py (`int8_bytes`); they dequantize the same way, one matrix at a time.
"""

from __future__ import annotations

from ..config import ADAPTER_METHODS

NF4_BLOCK = 64
NESTED_BLOCK = 256
NF4_CODE_BYTES = 16 * 4
NESTED_OFFSET_BYTES = 4  # the fp32 mean the double quantization subtracts from the absmax values
COMPUTE_BYTES = 2  # bfloat16 for NF4; int8 on the CPU casts its inputs to float16


def quantized_bytes(rows: int, cols: int, bits: int) -> int:
    """What one rows × cols weight holds at `bits` (8 or 4), its quantization state included."""
    numel = rows * cols
    if bits == 8:
        return numel + 4 * rows
    if bits == 4:
        blocks = -(-numel // NF4_BLOCK)
        return -(-numel // 2) + blocks + 4 * -(-blocks // NESTED_BLOCK) + NF4_CODE_BYTES + NESTED_OFFSET_BYTES
    raise ValueError(f"quantized weights are 8 or 4 bits, got {bits}")


def dequantized_transient(largest: int, compute_bytes: int = COMPUTE_BYTES) -> int:
    """The one matrix that exists dequantized at a time: the largest quantized weight, in the compute dtype."""
    return largest * compute_bytes


def describe_weights(method: str, weight_bits: int, dtype: str) -> str:
    """How a run holds its weights, in a few words for plan and the studio's budget."""
    if weight_bits == 16:
        return f"{dtype} weights"
    if method in ADAPTER_METHODS:
        return f"{'NF4' if weight_bits == 4 else 'int8'} frozen base"
    return "int8 trained weights"
