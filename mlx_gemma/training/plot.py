"""A loss-curve PNG with numpy and zlib only (no matplotlib): axes, ticks, two polylines, a legend.

`write_loss_curve(path, train_points, valid_points)` draws train loss (blue) and validation loss
(orange, with dots) against the step. Text uses a built-in 5x7 bitmap font.
"""

from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path

import numpy as np

from ..files import write_atomic

# 5x7 glyphs, one string of 7 rows of 5 bits per character.
_FONT = {
    "0": "01110 10001 10011 10101 11001 10001 01110", "1": "00100 01100 00100 00100 00100 00100 01110",
    "2": "01110 10001 00001 00010 00100 01000 11111", "3": "11110 00001 00001 01110 00001 00001 11110",
    "4": "00010 00110 01010 10010 11111 00010 00010", "5": "11111 10000 11110 00001 00001 10001 01110",
    "6": "00110 01000 10000 11110 10001 10001 01110", "7": "11111 00001 00010 00100 01000 01000 01000",
    "8": "01110 10001 10001 01110 10001 10001 01110", "9": "01110 10001 10001 01111 00001 00010 01100",
    ".": "00000 00000 00000 00000 00000 01100 01100", "-": "00000 00000 00000 11111 00000 00000 00000",
    "+": "00000 00100 00100 11111 00100 00100 00000", " ": "00000 00000 00000 00000 00000 00000 00000",
    "a": "00000 00000 01110 00001 01111 10001 01111", "d": "00001 00001 01101 10011 10001 10001 01111",
    "e": "00000 00000 01110 10001 11111 10000 01110", "i": "00100 00000 01100 00100 00100 00100 01110",
    "l": "01100 00100 00100 00100 00100 00100 01110", "n": "00000 00000 10110 11001 10001 10001 10001",
    "o": "00000 00000 01110 10001 10001 10001 01110", "p": "00000 00000 11110 10001 11110 10000 10000",
    "r": "00000 00000 10110 11001 10000 10000 10000", "s": "00000 00000 01110 10000 01110 00001 11110",
    "t": "01000 01000 11100 01000 01000 01001 00110", "v": "00000 00000 10001 10001 10001 01010 00100",
}
_GLYPHS = {c: np.array([[b == "1" for b in row] for row in rows.split()], dtype=bool) for c, rows in _FONT.items()}

WHITE, BLACK, GRID = (255, 255, 255), (40, 40, 40), (225, 225, 225)
BLUE, ORANGE = (31, 119, 180), (255, 127, 14)


def text(img: np.ndarray, x: int, y: int, s: str, color=BLACK, scale: int = 2) -> None:
    """Draw `s` with its top-left corner at (x, y); unknown characters are skipped as spaces."""
    for k, ch in enumerate(s):
        glyph = _GLYPHS.get(ch, _GLYPHS[" "])
        big = np.kron(glyph, np.ones((scale, scale), dtype=bool))
        x0 = x + k * 6 * scale
        h, w = big.shape
        region = img[y:y + h, x0:x0 + w]
        region[big[:region.shape[0], :region.shape[1]]] = color


def text_width(s: str, scale: int = 2) -> int:
    return len(s) * 6 * scale - scale


def line(img: np.ndarray, x0: float, y0: float, x1: float, y1: float, color, width: int = 2) -> None:
    """A straight segment, sampled densely and stamped `width` pixels thick."""
    n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
    xs = np.round(np.linspace(x0, x1, n)).astype(int)
    ys = np.round(np.linspace(y0, y1, n)).astype(int)
    H, W = img.shape[:2]
    for dx in range(width):
        for dy in range(width):
            xx, yy = xs + dx - width // 2, ys + dy - width // 2
            ok = (xx >= 0) & (xx < W) & (yy >= 0) & (yy < H)
            img[yy[ok], xx[ok]] = color


def nice_ticks(lo: float, hi: float, n: int = 5) -> list:
    """Round tick values (1, 2, 5 x 10^k steps) covering [lo, hi]."""
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step - 1e-9) * step
    ticks = []
    v = start
    while v <= hi + 1e-9 * step:
        ticks.append(round(v, 10))
        v += step
    return ticks


def _fmt(v: float) -> str:
    if v == int(v) and abs(v) < 1e6:
        return str(int(v))
    return f"{v:.3g}"


def render_loss_curve(train_points, valid_points, width: int = 800, height: int = 480) -> np.ndarray:
    """(H, W, 3) uint8 image of the two curves: points are (step, loss) pairs."""
    img = np.full((height, width, 3), WHITE, dtype=np.uint8)
    left, right, top, bottom = 90, 20, 50, 60
    pw, ph = width - left - right, height - top - bottom
    pts = [p for p in list(train_points) + list(valid_points) if math.isfinite(p[1])]
    if not pts:
        pts = [(0, 0.0), (1, 1.0)]
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x_lo, x_hi = min(xs), max(max(xs), min(xs) + 1)
    y_lo, y_hi = min(ys), max(ys)
    pad = (y_hi - y_lo) * 0.05 or 0.5
    y_lo, y_hi = y_lo - pad, y_hi + pad

    def px(x):
        return left + (x - x_lo) / (x_hi - x_lo) * pw

    def py(y):
        return top + (1 - (y - y_lo) / (y_hi - y_lo)) * ph

    for t in nice_ticks(y_lo, y_hi):
        if y_lo <= t <= y_hi:
            y = py(t)
            line(img, left, y, left + pw, y, GRID, 1)
            line(img, left - 6, y, left, y, BLACK, 1)
            label = _fmt(t)
            text(img, left - 10 - text_width(label), int(y) - 7, label)
    for t in nice_ticks(x_lo, x_hi, 6):
        if x_lo <= t <= x_hi:
            x = px(t)
            line(img, x, top, x, top + ph, GRID, 1)
            line(img, x, top + ph, x, top + ph + 6, BLACK, 1)
            label = _fmt(t)
            text(img, int(x) - text_width(label) // 2, top + ph + 12, label)
    line(img, left, top, left, top + ph, BLACK, 2)
    line(img, left, top + ph, left + pw, top + ph, BLACK, 2)
    text(img, left + pw // 2 - text_width("step") // 2, height - 22, "step")
    text(img, 10, 12, "loss")

    for points, color, dots in ((train_points, BLUE, False), (valid_points, ORANGE, True)):
        points = [p for p in points if math.isfinite(p[1])]
        for (a, b), (c, d) in zip(points, points[1:]):
            line(img, px(a), py(b), px(c), py(d), color, 2)
        if dots or len(points) == 1:
            for a, b in points:
                line(img, px(a) - 3, py(b), px(a) + 3, py(b), color, 5)
    # legend, top right
    lx = left + pw - 150
    for k, (name, color) in enumerate((("train", BLUE), ("valid", ORANGE))):
        y = 14 + k * 18
        line(img, lx, y + 7, lx + 30, y + 7, color, 3)
        text(img, lx + 40, y, name)
    return img


def encode_png(img: np.ndarray) -> bytes:
    """(H, W, 3) uint8 -> PNG bytes (8-bit RGB, no filtering, zlib-compressed)."""
    img = np.ascontiguousarray(img, dtype=np.uint8)
    h, w, _ = img.shape
    raw = np.concatenate([np.zeros((h, 1), np.uint8), img.reshape(h, w * 3)], axis=1).tobytes()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def write_loss_curve(path, train_points, valid_points=()) -> Path:
    """Render and write the PNG atomically (temp file + rename)."""
    return write_atomic(path, encode_png(render_loss_curve(train_points, valid_points)))
