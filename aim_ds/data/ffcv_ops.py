"""Bicubic decoders for FFCV's own ``Loader`` pipelines (drop-in for FFCV's INTER_AREA crop decoders).

``aim_ds.data.build_train_loader`` does not need these (it drives the same kernels over many shards
itself); they are here for anyone using ``ffcv.loader.Loader`` directly on one beton:

    Loader(path, ..., pipelines={"image": [BicubicRandomResizedCropDecoder(224), ToTensor()], ...})

Both run inside FFCV's compiled pipeline: libjpeg-turbo decode with the accurate IDCT (as Pillow), then
:func:`aim_ds.data.bicubic.resize_crop_bicubic` (Pillow-compatible antialiased bicubic).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

import numba as nb
import numpy as np
from ffcv.fields.rgb_image import IMAGE_MODES, SimpleRGBImageDecoder
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.state import State

from .bicubic import resize_crop_bicubic
from .kernels import decode_jpeg


@nb.njit(nogil=True)
def random_resized_box(
    height: int, width: int, scale_low: float, scale_high: float, log_ratio_low: float, log_ratio_high: float
) -> tuple[float, float, float, float]:
    """torchvision's RandomResizedCrop box (x0, y0, x1, y1) drawn with numba's per-thread np.random."""
    area = height * width
    for _ in range(10):
        target = area * np.random.uniform(scale_low, scale_high)
        aspect = math.exp(np.random.uniform(log_ratio_low, log_ratio_high))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(np.random.uniform(0.0, 1.0) * (height - h + 1))
            left = int(np.random.uniform(0.0, 1.0) * (width - w + 1))
            return float(left), float(top), float(left + w), float(top + h)
    in_ratio = width / height
    if in_ratio < math.exp(log_ratio_low):
        w, h = width, round(width / math.exp(log_ratio_low))
    elif in_ratio > math.exp(log_ratio_high):
        w, h = round(height * math.exp(log_ratio_high)), height
    else:
        w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return float(left), float(top), float(left + w), float(top + h)


@nb.njit(nogil=True)
def center_box(height: int, width: int, image_size: int, resize_size: int) -> tuple[float, float, float, float]:
    """Box equal to "shorter side -> resize_size, centre crop image_size" (see loader.center_crop_boxes)."""
    if width <= height:
        new_w = float(resize_size)
        new_h = math.floor(resize_size * height / width)
    else:
        new_w = math.floor(resize_size * width / height)
        new_h = float(resize_size)
    left = math.floor((new_w - image_size) / 2.0)
    top = math.floor((new_h - image_size) / 2.0)
    sx, sy = width / new_w, height / new_h
    return left * sx, top * sy, (left + image_size) * sx, (top + image_size) * sy


class _BicubicCropDecoder(SimpleRGBImageDecoder):
    """Shared FFCV plumbing: output uint8 [S, S, 3] per image, a scratch buffer for the decoded image.

    A SimpleRGBImageDecoder subclass because that is how FFCV recognises the first operation of an
    RGBImageField pipeline as its decoder (otherwise it inserts its own in front).
    """

    def __init__(self, output_size: int) -> None:
        super().__init__()
        self.output_size = int(output_size)

    def declare_state_and_memory(self, previous_state: State) -> tuple[State, tuple[AllocationQuery, ...]]:
        max_pixels = int(self.metadata["width"].astype(np.int64).max() * self.metadata["height"].astype(np.int64).max())
        shape = (self.output_size, self.output_size, 3)
        return (
            replace(previous_state, jit_mode=True, shape=shape, dtype=np.dtype("<u1")),
            (AllocationQuery(shape, np.dtype("<u1")), AllocationQuery((max_pixels * 3,), np.dtype("<u1"))),
        )

    def box_function(self) -> Callable:
        raise NotImplementedError

    def generate_code(self) -> Callable:
        jpg = IMAGE_MODES["jpg"]
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        # Fresh dispatchers for FFCV's pipeline: sharing the ones aim_ds's own loader already compiled made
        # numba's dispatcher raise KeyError when FFCV's thread compiled its stage in the same process.
        resize_c = Compiler.compile(resize_crop_bicubic.py_func)
        decode_c = Compiler.compile(decode_jpeg.py_func)
        box_c = self.box_function()
        flip = getattr(self, "flip", False)

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, scratch = my_storage
            for dst_ix in my_range(len(batch_indices)):
                field = metadata[batch_indices[dst_ix]]
                data = mem_read(field["data_ptr"], storage_state)
                height, width = np.uint32(field["height"]), np.uint32(field["width"])
                if field["mode"] == jpg:
                    buffer = scratch[dst_ix][: 3 * height * width]
                    # The JPEG's own header is checked against the metadata before anything is written.
                    if decode_c(data, np.int64(width), np.int64(height), 1, buffer) != 0:
                        raise ValueError(
                            "a stored JPEG does not decode or disagrees with the beton's metadata on its size "
                            "(python -m data_prep inspect names the row)"
                        )
                    image = buffer.reshape(height, width, 3)
                else:
                    if data.size < 3 * height * width:
                        raise ValueError("a stored raw image has fewer bytes than the beton's metadata says")
                    image = data[: 3 * height * width].reshape(height, width, 3)
                x0, y0, x1, y1 = box_c(height, width)
                mirror = flip and np.random.uniform(0.0, 1.0) < 0.5
                resize_c(image, x0, y0, x1, y1, destination[dst_ix], mirror)
            return destination[: len(batch_indices)]

        decode.is_parallel = True
        return decode


class BicubicRandomResizedCropDecoder(_BicubicCropDecoder):
    """FFCV decoder: random-resized crop (torchvision parameters) + Pillow bicubic resize + optional flip.

    output_size: side in px; scale: area fraction range; ratio: w/h range; flip: mirror with p = 0.5.
    Randomness comes from numba's np.random, as in FFCV's own RandomResizedCropRGBImageDecoder.
    """

    def __init__(
        self,
        output_size: int = 224,
        scale: tuple[float, float] = (0.4, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip: bool = True,
    ) -> None:
        super().__init__(output_size)
        self.scale, self.ratio, self.flip = tuple(scale), tuple(ratio), flip

    def box_function(self) -> Callable:
        lo, hi = float(self.scale[0]), float(self.scale[1])
        rlo, rhi = math.log(self.ratio[0]), math.log(self.ratio[1])

        def box(height, width):
            return random_resized_box(height, width, lo, hi, rlo, rhi)

        return Compiler.compile(box)


class BicubicCenterCropDecoder(_BicubicCropDecoder):
    """FFCV decoder: shorter side -> resize_size, centre crop output_size, Pillow bicubic, no flip."""

    def __init__(self, output_size: int = 224, resize_size: int = 256) -> None:
        super().__init__(output_size)
        self.resize_size = int(resize_size)

    def box_function(self) -> Callable:
        size, resize = self.output_size, self.resize_size

        def box(height, width):
            return center_box(height, width, size, resize)

        return Compiler.compile(box)
