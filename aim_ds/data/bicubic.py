"""Pillow-compatible antialiased bicubic crop-and-resize, compiled with numba.

Pillow's ``Image.resize(size, BICUBIC, box=...)`` (the interpolation AIM trained with) is a separable filter:
for each output coordinate, the centre ``in0 + (x + 0.5) * scale`` in source pixels, the cubic kernel
(a = -0.5) stretched by ``max(scale, 1)`` so that a downscale also low-passes (support 2 * max(scale, 1)
source pixels on each side), weights normalised to sum 1. Pillow runs the horizontal pass over the source
rows that the vertical pass needs and rounds the intermediate to uint8; we do the same so that the two agree
to a fraction of a grey level.

Speed: the weights are computed once per output coordinate per image (tables of [out, taps]), the horizontal
pass touches only the crop's rows and columns, and the hot loops are plain float32 loops that LLVM vectorises.
No numba parallelism in here: the batch loop that calls this is the parallel one.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np

BICUBIC_A = -0.5
BICUBIC_SUPPORT = 2.0


@nb.njit(cache=True, nogil=True, inline="always")
def _cubic(x: float) -> float:
    x = abs(x)
    if x < 1.0:
        return ((BICUBIC_A + 2.0) * x - (BICUBIC_A + 3.0)) * x * x + 1.0
    if x < 2.0:
        return (((x - 5.0) * x + 8.0) * x - 4.0) * BICUBIC_A
    return 0.0


@nb.njit(cache=True, nogil=True)
def resample_weights(in_size: int, in0: float, in1: float, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-output-coordinate filter taps along one axis, as Pillow computes them.

    in_size: source length (px); [in0, in1): the crop along this axis in source px (may be fractional);
    out_size: output length (px).
    Returns first [out] int32 (first source index), count [out] int32 (taps used), weights [out, taps] float32
    (zero past count, rows sum to 1).
    """
    scale = (in1 - in0) / out_size
    filter_scale = max(scale, 1.0)
    support = BICUBIC_SUPPORT * filter_scale
    taps = int(math.ceil(support)) * 2 + 1
    first = np.empty(out_size, dtype=np.int32)
    count = np.empty(out_size, dtype=np.int32)
    weights = np.zeros((out_size, taps), dtype=np.float32)
    inv = 1.0 / filter_scale
    row = np.zeros(taps, dtype=np.float64)
    for xx in range(out_size):
        center = in0 + (xx + 0.5) * scale
        # C's (int) truncates toward zero, which is what Pillow relies on here.
        xmin = int(center - support + 0.5)
        if xmin < 0:
            xmin = 0
        xmax = int(center + support + 0.5)
        if xmax > in_size:
            xmax = in_size
        n = xmax - xmin
        if n > taps:
            n = taps
        total = 0.0
        for j in range(n):
            w = _cubic((j + xmin - center + 0.5) * inv)
            row[j] = w
            total += w
        if total == 0.0:
            total = 1.0
        for j in range(n):
            weights[xx, j] = row[j] / total
        first[xx] = xmin
        count[xx] = n
    return first, count, weights


@nb.njit(cache=True, nogil=True, inline="always")
def _round_u8(value: float) -> np.uint8:
    if value <= 0.0:
        return np.uint8(0)
    if value >= 255.0:
        return np.uint8(255)
    return np.uint8(int(value + 0.5))


@nb.njit(cache=True, nogil=True, fastmath=True, error_model="numpy", inline="always")
def _weighted_row_sum(rows: np.ndarray, base: int, count: int, weights: np.ndarray, col0: int, acc: np.ndarray) -> None:
    """acc[:] = sum_j weights[j] * rows[base + j, col0 : col0 + len(acc)].

    rows: [R, C] uint8 or float32; acc: float32 [L]. Taps go two at a time, which halves the loads and
    stores of the accumulator; the inner loop is contiguous, so LLVM emits SIMD for it.
    """
    length = acc.shape[0]
    acc[:] = 0.0
    j = 0
    while j + 1 < count:
        w0 = weights[j]
        w1 = weights[j + 1]
        line0 = rows[base + j, col0 : col0 + length]
        line1 = rows[base + j + 1, col0 : col0 + length]
        for k in range(length):
            acc[k] += w0 * np.float32(line0[k]) + w1 * np.float32(line1[k])
        j += 2
    if j < count:
        w0 = weights[j]
        line0 = rows[base + j, col0 : col0 + length]
        for k in range(length):
            acc[k] += w0 * np.float32(line0[k])


@nb.njit(cache=True, nogil=True, fastmath=True, error_model="numpy")
def resize_crop_bicubic(
    src: np.ndarray, x0: float, y0: float, x1: float, y1: float, dst: np.ndarray, flip: bool = False
) -> None:
    """dst <- Pillow-style bicubic resize of the box [x0, x1) x [y0, y1) of src, optionally mirrored.

    src: uint8 [H, W, 3] (C-contiguous); dst: uint8 [out_h, out_w, 3], written in place.
    Box coordinates in source pixels, as Pillow's ``box=(x0, y0, x1, y1)``.

    Both passes are "weighted sums of whole contiguous rows", the loop shape LLVM turns into SIMD: first the
    vertical pass over the crop's columns only, written transposed ([cols, out_h * 3]) so that the
    horizontal pass is a row pass too; its result, one output column at a time, goes straight into dst.
    (Pillow runs horizontal first and rounds the intermediate to uint8; keeping it in float32 changes
    results by far less than one grey level: MAE ~0.2 on photos.)
    """
    in_h = src.shape[0]
    in_w = src.shape[1]
    out_h = dst.shape[0]
    out_w = dst.shape[1]
    fx, cx, wx = resample_weights(in_w, x0, x1, out_w)
    fy, cy, wy = resample_weights(in_h, y0, y1, out_h)
    col_first = fx[0]
    col_last = fx[0] + cx[0]
    for xx in range(out_w):
        col_first = min(col_first, fx[xx])
        col_last = max(col_last, fx[xx] + cx[xx])
    cols = col_last - col_first
    flat = src.reshape(in_h, in_w * 3)

    # Vertical pass over the crop's columns, stored transposed: transposed[c, 3 * yy + channel].
    transposed = np.empty((cols, out_h * 3), dtype=np.float32)
    row_acc = np.empty(cols * 3, dtype=np.float32)
    for yy in range(out_h):
        _weighted_row_sum(flat, fy[yy], cy[yy], wy[yy], 3 * col_first, row_acc)
        for c in range(cols):
            transposed[c, 3 * yy] = row_acc[3 * c]
            transposed[c, 3 * yy + 1] = row_acc[3 * c + 1]
            transposed[c, 3 * yy + 2] = row_acc[3 * c + 2]

    # Horizontal pass: one output column per weighted row sum, rounded into dst.
    col_acc = np.empty(out_h * 3, dtype=np.float32)
    for xx in range(out_w):
        _weighted_row_sum(transposed, fx[xx] - col_first, cx[xx], wx[xx], 0, col_acc)
        target = out_w - 1 - xx if flip else xx
        for yy in range(out_h):
            dst[yy, target, 0] = _round_u8(col_acc[3 * yy])
            dst[yy, target, 1] = _round_u8(col_acc[3 * yy + 1])
            dst[yy, target, 2] = _round_u8(col_acc[3 * yy + 2])
