"""Batch kernels: decode FFCV-stored images and crop-resize them bicubically, in parallel over the batch.

JPEG decoding calls libjpeg-turbo's TurboJPEG API (the library FFCV itself links) directly from compiled
code rather than FFCV's ``imdecode``: FFCV hard-codes TJFLAG_FASTDCT, whose integer IDCT differs from what
Pillow decodes by up to a few grey levels (end-to-end MAE ~0.9 against Pillow at 64 px), while the
accurate IDCT is bit-identical to Pillow's decode at the same speed. It also lets us ask for libjpeg's
scaled decode (1/2, 1/4, 1/8) when a crop shrinks a lot (see ``decode_crop_batch``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading

import numba as nb
import numpy as np

from .bicubic import resize_crop_bicubic

JPEG_MODE = 0  # ffcv.fields.rgb_image.IMAGE_MODES
RAW_MODE = 1
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TJPF_RGB = 0
TJ_ACCURATE = 0  # flags: accurate (islow) IDCT, fancy upsampling: what Pillow's libjpeg-turbo does

# Per-image status of the kernels (0: decoded). Anything else leaves the image black and is raised by the
# caller as an error naming the beton and the row (numba code cannot build that message itself).
STATUS_OK = 0
STATUS_DECODE_FAILED = -1  # TurboJPEG could not decode the bytes (corrupt JPEG, or unsupported colour space)
STATUS_BAD_SIZE = -2  # a side < 1 in the metadata
STATUS_NO_JPEG_HEADER = -3  # the bytes have no readable JPEG header
STATUS_SIZE_MISMATCH = -4  # the JPEG's own header gives other sides than the beton's metadata
STATUS_BUFFER_TOO_SMALL = -5  # the output buffer cannot hold the decoded image
STATUS_RAW_TOO_SHORT = -6  # a raw image has fewer bytes than its sides need
STATUS_MESSAGES = {
    STATUS_DECODE_FAILED: "TurboJPEG could not decode the stored JPEG (corrupt data?)",
    STATUS_BAD_SIZE: "the metadata gives a side < 1",
    STATUS_NO_JPEG_HEADER: "the stored bytes have no readable JPEG header",
    STATUS_SIZE_MISMATCH: "the JPEG's own header gives other sides than the beton's metadata",
    STATUS_BUFFER_TOO_SMALL: "the decode buffer is smaller than the image",
    STATUS_RAW_TOO_SHORT: "the stored raw image has fewer bytes than its sides need",
}

# Every launch of a parallel kernel of this module holds this lock. numba's workqueue threading layer
# (the drivers', see use_workqueue_threading) must never run two parallel regions at once, and two
# loaders in one process (train and val, or tests' rank 0 and rank 1 side by side) would, from their
# prefetch threads.
KERNEL_LOCK = threading.Lock()


def use_workqueue_threading() -> str:
    """Run this process's parallel numba kernels on numba's workqueue layer (plain C pthreads) rather than
    the TBB layer numba picks wherever libtbb is installed (FFCV's OpenCV pulls it in). Returns the layer
    asked for: ``NUMBA_THREADING_LAYER`` in the environment still wins. Call it before the first launch
    (the layer is chosen then); a no-op after one.

    For the drivers, whose every parallel launch is one of this module's kernels under KERNEL_LOCK. Our
    kernels are launched from the loaders' prefetch threads, so numba's TBB pool would belong to a thread
    that is gone when the interpreter unloads it at exit, and oneTBB's C++ workers are torn down at exit
    racily; a probe rank that had finished its work once died at exit with "terminate called without an
    active exception" (SIGABRT, exit -6), and TBB's pool is the C++ thread pool of ours that fits. Not at
    import: FFCV's own Loader runs its compiled pipelines (ours too, :mod:`aim_ds.data.ffcv_ops`) outside
    this lock, and two of those at once need a thread-safe layer.
    """
    if "NUMBA_THREADING_LAYER" in os.environ:
        return os.environ["NUMBA_THREADING_LAYER"]
    nb.config.THREADING_LAYER = "workqueue"
    return "workqueue"


def _load_turbojpeg() -> str:
    """Load libjpeg-turbo's TurboJPEG library into the process's global symbol table; returns its name."""
    from llvmlite import binding

    for name in ("libturbojpeg.so.0", ctypes.util.find_library("turbojpeg") or "", "libturbojpeg.so"):
        if name:
            try:
                binding.load_library_permanently(name)
                return name
            except RuntimeError:
                continue
    raise OSError("libturbojpeg not found (apt-get install libturbojpeg0); FFCV needs it too")


TURBOJPEG = _load_turbojpeg()
# The TurboJPEG calls are declared as external symbols, resolved by name when the compiled code is loaded,
# rather than as ctypes function pointers: numba cannot cache code that holds a ctypes pointer (an address
# valid only in this process), so every process used to recompile decode_crop_batch (~11 s on 2 cores).
# With symbols, cache=True works and a later launch loads the machine code from __pycache__ (NUMBA_CACHE_DIR).
# Pointers and handles travel as uintp (same width and ABI as void* on the 64-bit platforms FFCV supports).
_tj_init = nb.types.ExternalFunction("tjInitDecompress", nb.types.uintp())
_tj_destroy = nb.types.ExternalFunction("tjDestroy", nb.types.intc(nb.types.uintp))
_tj_header = nb.types.ExternalFunction(
    "tjDecompressHeader3",
    nb.types.intc(nb.types.uintp, nb.types.uintp, nb.types.ulong, nb.types.uintp, nb.types.uintp, nb.types.uintp,
                  nb.types.uintp),
)  # fmt: skip
_tj_decompress = nb.types.ExternalFunction(
    "tjDecompress2",
    nb.types.intc(
        nb.types.uintp, nb.types.uintp, nb.types.ulong, nb.types.uintp,
        nb.types.intc, nb.types.intc, nb.types.intc, nb.types.intc, nb.types.intc,
    ),
)  # fmt: skip


@nb.njit(nogil=True, cache=True)
def decode_jpeg(payload: np.ndarray, width: int, height: int, denominator: int, out: np.ndarray) -> int:
    """Decode JPEG bytes into out[: h' * w' * 3] at scale 1/denominator (1, 2, 4 or 8).

    The output is ceil(width / d) x ceil(height / d) RGB, as libjpeg's scaled IDCT produces it. width and
    height are what the beton's metadata says; the JPEG's own header (``tjDecompressHeader3``) must say the
    same, and ``out`` must hold the result, or nothing is decoded: TurboJPEG writes as many pixels as the
    JPEG has, whatever buffer it is handed, so a wrong size in the metadata would be a heap overwrite.
    Returns STATUS_OK (0) or one of the STATUS_* codes. A handle per call costs ~0.4 us and keeps the
    function thread-safe.
    """
    if width < 1 or height < 1 or denominator < 1:
        return STATUS_BAD_SIZE
    scaled_w = (width + denominator - 1) // denominator
    scaled_h = (height + denominator - 1) // denominator
    if out.size < scaled_w * scaled_h * 3:
        return STATUS_BUFFER_TOO_SMALL
    handle = _tj_init()
    if handle == 0:
        return STATUS_DECODE_FAILED
    info = np.zeros(4, dtype=np.int32)  # width, height, subsampling, colour space
    address = info.ctypes.data
    result = _tj_header(handle, payload.ctypes.data, payload.size, address, address + 4, address + 8, address + 12)
    if result != 0:
        result = STATUS_NO_JPEG_HEADER
    elif info[0] != width or info[1] != height:
        result = STATUS_SIZE_MISMATCH
    else:
        result = _tj_decompress(
            handle, payload.ctypes.data, payload.size, out.ctypes.data, scaled_w, 0, scaled_h, TJPF_RGB, TJ_ACCURATE
        )
        if result != 0:
            result = STATUS_DECODE_FAILED
    _tj_destroy(handle)
    return result


@nb.njit(nogil=True, cache=True)
def jpeg_header_sizes(payload: np.ndarray, offsets: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """(width, height) from the JPEG header of each blob payload[offsets[i] : offsets[i] + sizes[i]], int64
    [B, 2]; (-1, -1) where TurboJPEG finds no readable header. Parses headers only (no decoding)."""
    count = offsets.shape[0]
    result = np.full((count, 2), -1, dtype=np.int64)
    info = np.zeros(4, dtype=np.int32)
    address = info.ctypes.data
    handle = _tj_init()
    if handle == 0:
        return result
    for i in range(count):
        data = payload[offsets[i] : offsets[i] + sizes[i]]
        if _tj_header(handle, data.ctypes.data, data.size, address, address + 4, address + 8, address + 12) == 0:
            result[i, 0] = info[0]
            result[i, 1] = info[1]
    _tj_destroy(handle)
    return result


@nb.njit(nogil=True, parallel=True, cache=True)
def decode_crop_batch(
    payload: np.ndarray,
    offsets: np.ndarray,
    sizes: np.ndarray,
    heights: np.ndarray,
    widths: np.ndarray,
    modes: np.ndarray,
    boxes: np.ndarray,
    flips: np.ndarray,
    out: np.ndarray,
    dct_min_shrink: float,
) -> np.ndarray:
    """Decode, crop and bicubic-resize a batch.

    payload: uint8, the stored bytes of all images back to back; offsets/sizes: int64 [B] into payload;
    heights/widths/modes: [B] as stored; boxes: float64 [B, 4] (x0, y0, x1, y1) in stored pixels;
    flips: bool [B]; out: uint8 [B, S_h, S_w, 3], written.
    dct_min_shrink: 0 disables scaled decoding; else a JPEG is decoded at 1/2, 1/4 or 1/8 scale (the
    largest that leaves the bicubic step a shrink of at least this factor on both axes).
    Returns int32 [B] status (STATUS_OK, else a STATUS_* code: the image is left black and the caller
    raises).
    """
    count = offsets.shape[0]
    out_h = out.shape[1]
    out_w = out.shape[2]
    status = np.zeros(count, dtype=np.int32)
    for i in nb.prange(count):
        height = heights[i]
        width = widths[i]
        data = payload[offsets[i] : offsets[i] + sizes[i]]
        x0, y0, x1, y1 = boxes[i, 0], boxes[i, 1], boxes[i, 2], boxes[i, 3]
        if height < 1 or width < 1:
            status[i] = STATUS_BAD_SIZE
            out[i] = 0
            continue
        if modes[i] == JPEG_MODE:
            denominator = 1
            if dct_min_shrink > 0.0:
                while (
                    denominator < 8
                    and (x1 - x0) / (2 * denominator * out_w) >= dct_min_shrink
                    and (y1 - y0) / (2 * denominator * out_h) >= dct_min_shrink
                ):
                    denominator *= 2
            scaled_w = (width + denominator - 1) // denominator
            scaled_h = (height + denominator - 1) // denominator
            scratch = np.empty(scaled_h * scaled_w * 3, dtype=np.uint8)
            result = decode_jpeg(data, width, height, denominator, scratch)
            if result != 0:
                status[i] = result
                out[i] = 0
                continue
            image = scratch.reshape(scaled_h, scaled_w, 3)
            # Scaled pixel k covers stored pixels [k * d, (k + 1) * d): the box scales exactly.
            x0, y0, x1, y1 = x0 / denominator, y0 / denominator, x1 / denominator, y1 / denominator
        else:
            if data.size < height * width * 3:
                status[i] = STATUS_RAW_TOO_SHORT
                out[i] = 0
                continue
            image = data[: height * width * 3].reshape(height, width, 3)
        resize_crop_bicubic(image, x0, y0, x1, y1, out[i], flips[i])
    return status


@nb.njit(nogil=True, parallel=True, cache=True)
def normalize_batch(images: np.ndarray, mean: np.ndarray, std: np.ndarray, out: np.ndarray) -> None:
    """uint8 [B, H, W, 3] -> float32 [B, 3, H, W], (x / 255 - mean) / std per channel, written into out."""
    count, height, width = images.shape[0], images.shape[1], images.shape[2]
    scale = np.empty(3, dtype=np.float32)
    shift = np.empty(3, dtype=np.float32)
    for c in range(3):
        scale[c] = 1.0 / (255.0 * std[c])
        shift[c] = -mean[c] / std[c]
    for i in nb.prange(count):
        for c in range(3):
            for y in range(height):
                for x in range(width):
                    out[i, c, y, x] = np.float32(images[i, y, x, c]) * scale[c] + shift[c]
