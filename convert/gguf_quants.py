"""Vectorised numpy dequantisation of raw GGUF (ggml) tensor data, and a Q8_0 quantiser.

Written from the ggml block layouts (ggml-common.h); every block type is a fixed number of
bytes holding a fixed number of weights along a row (ne0). A tensor's raw bytes are
`n_blocks * block_bytes` long and dequantise to `n_blocks * block_size` float32 values in
row-major order, so the caller only reshapes the flat result.

All arithmetic is float32, in the order ggml's reference dequantisers use
(`d * scale * q - dmin * min`), so results match them to the last bit or within 1 ulp.

Why not gguf-py's `gguf.quants.dequantize` (a dependency already, and the tests' reference)?
It gives bit-identical results but is much slower on the tensors we actually read:
benchmarks/gguf_dequant.py on all 236 tensors of the embedded Gemma 3 270M Q4_K_M GGUF
(2026-11-29, x86_64 Linux 2-core shared box, numpy 2.4.6, 5 rounds, seconds min / median / max):

    type   tensors  ours                  gguf-py                median ratio
    Q4_K   27       0.063 / 0.087 / 0.094   0.456 / 0.610 / 0.644    7.0x
    Q5_0   81       0.218 / 0.255 / 0.300   5.006 / 6.313 / 6.568   24.8x
    Q6_K   9        0.022 / 0.037 / 0.047   0.167 / 0.195 / 0.248    5.2x
    Q8_0   10       0.333 / 0.350 / 0.382   5.810 / 6.322 / 6.785   18.1x
    total  236      0.708 / 0.740 / 0.760  11.914 / 13.652 / 13.912  18.5x

So loading a .gguf stays
under a second for the 270M instead of ~14 s, and these dequantizers are kept; tests/test_gguf.py
checks them bit for bit against gguf-py on every supported type.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np


class GGMLType(IntEnum):
    """ggml tensor type ids as stored in a GGUF tensor-info record (only the ones we read)."""

    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    BF16 = 30


QK = 32  # weights per block in the legacy formats (Q4_0 ... Q8_0)
QK_K = 256  # weights per super-block in the k-quants (Q4_K, Q5_K, Q6_K)

# type -> (weights per block, bytes per block)
BLOCK_LAYOUT: dict[GGMLType, tuple[int, int]] = {
    GGMLType.F32: (1, 4),
    GGMLType.F16: (1, 2),
    GGMLType.BF16: (1, 2),
    GGMLType.Q4_0: (QK, 2 + QK // 2),  # d:f16, qs:16 bytes of nibbles
    GGMLType.Q4_1: (QK, 4 + QK // 2),  # d:f16, m:f16, qs
    GGMLType.Q5_0: (QK, 2 + 4 + QK // 2),  # d:f16, qh:u32 (5th bits), qs
    GGMLType.Q5_1: (QK, 4 + 4 + QK // 2),  # d, m, qh, qs
    GGMLType.Q8_0: (QK, 2 + QK),  # d:f16, qs:i8[32]
    GGMLType.Q4_K: (QK_K, 4 + 12 + QK_K // 2),  # d, dmin, scales[12], qs[128]
    GGMLType.Q5_K: (QK_K, 4 + 12 + QK_K // 8 + QK_K // 2),  # d, dmin, scales[12], qh[32], qs[128]
    GGMLType.Q6_K: (QK_K, QK_K // 2 + QK_K // 4 + QK_K // 16 + 2),  # ql[128], qh[64], sc:i8[16], d
}


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    """The little-endian float16 at byte `start` of every block, as float32 of shape (n, 1)."""
    return blocks[:, start : start + 2].copy().view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(n, 16) packed bytes -> (n, 32) values: low nibbles are weights 0..15, high ones 16..31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _fifth_bits(blocks: np.ndarray, start: int) -> np.ndarray:
    """The u32 `qh` at byte `start` -> (n, 32) uint8 where bit j (of weight j) is 0 or 16."""
    bits = np.unpackbits(blocks[:, start : start + 4], axis=1, bitorder="little")
    return bits << 4


def _dq_q4_0(blocks: np.ndarray) -> np.ndarray:
    d = _f16(blocks, 0)
    q = _nibbles(blocks[:, 2:]).astype(np.int8) - np.int8(8)
    return d * q


def _dq_q4_1(blocks: np.ndarray) -> np.ndarray:
    d, m = _f16(blocks, 0), _f16(blocks, 2)
    return d * _nibbles(blocks[:, 4:]) + m


def _dq_q5_0(blocks: np.ndarray) -> np.ndarray:
    d = _f16(blocks, 0)
    q = (_nibbles(blocks[:, 6:]) | _fifth_bits(blocks, 2)).astype(np.int8) - np.int8(16)
    return d * q


def _dq_q5_1(blocks: np.ndarray) -> np.ndarray:
    d, m = _f16(blocks, 0), _f16(blocks, 2)
    return d * (_nibbles(blocks[:, 8:]) | _fifth_bits(blocks, 4)) + m


def _dq_q8_0(blocks: np.ndarray) -> np.ndarray:
    return _f16(blocks, 0) * blocks[:, 2:].view(np.int8)


def _k_scales_mins(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unpack the 12-byte k-quant scale field (n, 12) into 8 six-bit scales and mins, each (n, 8).

    Bytes 0-3 hold scales 0-3 (low 6 bits), bytes 4-7 mins 0-3; scales/mins 4-7 keep their
    low 4 bits in bytes 8-11 (scale low nibble, min high nibble) and their top 2 bits in the
    spare top bits of bytes 0-3 (scales) and 4-7 (mins).
    """
    sc = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)], axis=1)
    mn = np.concatenate([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], axis=1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _k_nibbles(qs: np.ndarray) -> np.ndarray:
    """(n, 128) -> (n, 8, 32): each 32-byte chunk c gives sub-block 2c (low) and 2c+1 (high)."""
    qs = qs.reshape(-1, 4, 1, 32)
    return np.concatenate([qs & 0x0F, qs >> 4], axis=2).reshape(-1, 8, 32)


def _dq_q4_k(blocks: np.ndarray) -> np.ndarray:
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)  # (n, 1)
    sc, mn = _k_scales_mins(blocks[:, 4:16])  # (n, 8)
    q = _k_nibbles(blocks[:, 16:])  # (n, 8, 32)
    y = (d * sc)[:, :, None] * q - (dmin * mn)[:, :, None]
    return y.reshape(-1, QK_K)


def _dq_q5_k(blocks: np.ndarray) -> np.ndarray:
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)
    sc, mn = _k_scales_mins(blocks[:, 4:16])
    qh = blocks[:, 16:48]  # (n, 32): bit j of byte l is the 5th bit of weight l in sub-block j
    high = ((qh[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1) << 4  # (n, 8, 32)
    q = _k_nibbles(blocks[:, 48:]) | high
    y = (d * sc)[:, :, None] * q - (dmin * mn)[:, :, None]
    return y.reshape(-1, QK_K)


def _dq_q6_k(blocks: np.ndarray) -> np.ndarray:
    # Two halves h of 128 weights; in half h, weight 32k + l (k = 0..3, l = 0..31) takes
    # its low 4 bits from ql[64h + l + 32(k & 1)] (low nibble for k < 2, high for k >= 2)
    # and its top 2 bits from bits 2k..2k+1 of qh[32h + l]; scale sc[8h + 2k + l // 16].
    ql = blocks[:, :128].reshape(-1, 2, 2, 32)  # (n, h, k & 1, l)
    low = np.concatenate([ql & 0x0F, ql >> 4], axis=2)  # (n, h, k, l)
    qh = blocks[:, 128:192].reshape(-1, 2, 1, 32)
    high = (qh >> (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]) & 3  # (n, h, k, l)
    q = (low | (high << 4)).astype(np.int8) - np.int8(32)
    sc = blocks[:, 192:208].view(np.int8).astype(np.float32).reshape(-1, 2, 4, 2, 1)
    d = _f16(blocks, 208).reshape(-1, 1, 1, 1, 1)
    y = (d * sc) * q.reshape(-1, 2, 4, 2, 16)
    return y.reshape(-1, QK_K)


_DEQUANTIZERS = {
    GGMLType.Q4_0: _dq_q4_0,
    GGMLType.Q4_1: _dq_q4_1,
    GGMLType.Q5_0: _dq_q5_0,
    GGMLType.Q5_1: _dq_q5_1,
    GGMLType.Q8_0: _dq_q8_0,
    GGMLType.Q4_K: _dq_q4_k,
    GGMLType.Q5_K: _dq_q5_k,
    GGMLType.Q6_K: _dq_q6_k,
}

# Blocks per chunk: bounds the temporaries (a few times 64K blocks x 256 weights x 4 bytes).
_CHUNK_WEIGHTS = 1 << 22


def nbytes_for(qtype: GGMLType, n_elements: int) -> int:
    """Bytes that `n_elements` weights of `qtype` occupy (n_elements must fill whole blocks)."""
    block_size, block_bytes = BLOCK_LAYOUT[qtype]
    if n_elements % block_size:
        raise ValueError(f"{n_elements} weights do not fill whole {qtype.name} blocks of {block_size}")
    return n_elements // block_size * block_bytes


def dequantize(raw: np.ndarray, qtype: GGMLType | int, n_elements: int) -> np.ndarray:
    """Dequantise raw ggml data to a flat float32 array.

    raw: uint8 array (any shape, C-contiguous) holding exactly `nbytes_for(qtype, n_elements)`
    bytes. Returns a new float32 array of shape (n_elements,). Raises KeyError for a type not
    in BLOCK_LAYOUT and ValueError when the byte count does not match.
    """
    qtype = GGMLType(qtype)
    raw = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    if raw.size != nbytes_for(qtype, n_elements):
        raise ValueError(f"{qtype.name}: expected {nbytes_for(qtype, n_elements)} bytes, got {raw.size}")
    if qtype == GGMLType.F32:
        return raw.view("<f4").astype(np.float32)  # copy: never hand out a view of an mmap
    if qtype == GGMLType.F16:
        return raw.view("<f2").astype(np.float32)
    if qtype == GGMLType.BF16:
        # bf16 is the top half of an f32: shift the 16 bits up.
        return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)

    block_size, block_bytes = BLOCK_LAYOUT[qtype]
    blocks = raw.reshape(-1, block_bytes)
    out = np.empty((blocks.shape[0], block_size), dtype=np.float32)
    step = max(1, _CHUNK_WEIGHTS // block_size)
    fn = _DEQUANTIZERS[qtype]
    for i in range(0, blocks.shape[0], step):
        out[i : i + step] = fn(blocks[i : i + step])
    return out.reshape(-1)


def quantize_q8_0(x: np.ndarray) -> np.ndarray:
    """Quantise float values to Q8_0 blocks, as ggml's reference quantiser does.

    x: float array whose last dimension is a multiple of 32, shape (..., n).
    Returns uint8 of shape (..., n // 32 * 34): per block of 32, d = max|x| / 127 as float16,
    then q = round-half-away-from-zero(x / d) as int8.
    """
    x = np.asarray(x, dtype=np.float32)
    if x.shape[-1] % QK:
        raise ValueError(f"Q8_0 needs rows that are a multiple of {QK}, got {x.shape[-1]}")
    blocks = x.reshape(-1, QK)
    d = np.abs(blocks).max(axis=1, keepdims=True) / np.float32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
    scaled = blocks * inv
    # ggml uses roundf (half away from zero); np.round rounds half to even.
    q = (np.sign(scaled) * np.floor(np.abs(scaled) + np.float32(0.5))).astype(np.int8)
    packed = np.concatenate([d.astype(np.float16).view(np.uint8), q.view(np.uint8)], axis=1)
    return packed.reshape(*x.shape[:-1], x.shape[-1] // QK * BLOCK_LAYOUT[GGMLType.Q8_0][1])
