"""Reading and decoding the images a beton is written from: where their bytes live, and Pillow decoding.

Both the validation pass and the FFCV write of :mod:`aim_ds.data.writers` decode through here, so an image
that validates is an image the writer can store.
"""

from __future__ import annotations

import dataclasses
import io
import math
import re
import warnings
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageFile, ImageOps

from .beton import open_regular

# A truncated image must be an error we can count, never silently padded with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False
# Pillow's default cap (89.5 M pixels, ~9500 x 9500) stays: above it Pillow warns, and we treat the warning as
# a skip (see _open), so the hard error at twice the cap is never reached. A 762 KB 14000 x 14000 PNG used to
# take 4.1 GB in one worker with the cap raised to 400 M; no real training image needs that many pixels.
MAX_IMAGE_PIXELS = 89_478_485
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS

IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")


@dataclasses.dataclass(frozen=True)
class ImageRef:
    """Where the encoded bytes of one image live: a whole file (size < 0) or a byte range of a tar."""

    path: str
    offset: int = 0
    size: int = -1
    name: str = ""  # what the sidecar calls it: the file path, or "shard.tar:key.jpg"

    def read(self) -> bytes:
        """The encoded bytes; raises OSError when a tar member is cut short, and BetonError naming the path
        when it is not a regular file (a FIFO or socket in an image folder would block the read forever)."""
        with open_regular(self.path) as f:
            if self.size < 0:
                return f.read()
            f.seek(self.offset)
            data = f.read(self.size)
        if len(data) != self.size:
            raise OSError(f"short read: {len(data)} of {self.size} bytes")
        return data

    @property
    def display(self) -> str:
        return self.name or self.path


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB. Transparent pixels are composited onto white, not left as whatever colour
    the encoder stored under alpha 0 (often black)."""
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale to 8 bits instead of clipping everything above 255 to white.
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array * (255.0 / peak) + 0.5, 0, 255).astype(np.uint8), "L")
    return image.convert("RGB")


_BYTESIO_REPR = re.compile(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>")
# Modes Image.reduce handles; others (P, 1, CMYK, I;16) are small or rare enough to convert first.
_REDUCIBLE_MODES = frozenset({"L", "LA", "RGB", "RGBA", "RGBa", "La", "I", "F"})


def failure_reason(error: BaseException, name: str) -> str:
    """A one-line skip reason for the sidecar: Pillow names in-memory files ``<_io.BytesIO object at 0x..>``,
    which says nothing, so the image's own name (file path or ``shard.tar:key.jpg``) goes in its place."""
    text = _BYTESIO_REPR.sub(name, f"{type(error).__name__}: {error}")
    return " ".join(text.split())[:300]


def _open(data: bytes) -> Image.Image:
    """Open encoded bytes lazily (header only). Pillow's DecompressionBombWarning (more than
    :data:`MAX_IMAGE_PIXELS` pixels) is raised as an exception, so that the image is skipped with that reason
    before its pixels are allocated."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        return Image.open(io.BytesIO(data))


def decode_image(data: bytes, max_resolution: int = 0) -> np.ndarray:
    """Decode encoded image bytes to an upright RGB array.

    Returns uint8 [H, W, 3], EXIF orientation applied, the longer side resized (Pillow bicubic, antialiased)
    to at most ``max_resolution`` px (0 keeps the size). Raises on anything that does not decode fully, and on
    images above Pillow's pixel cap (DecompressionBombWarning).
    """
    image = _open(data)
    if max_resolution and image.format == "JPEG":
        scale = max_resolution / max(image.size)
        if scale < 1.0:
            # libjpeg decodes at 1/2, 1/4 or 1/8 scale while keeping both sides >= the request: a large
            # source costs a fraction of a full decode, and the bicubic pass below still sets the final size.
            image.draft("RGB", (math.ceil(image.size[0] * scale), math.ceil(image.size[1] * scale)))
    image.load()
    # Shrink by an integer box factor before any mode conversion (a greyscale or palette image grows 3-4x when
    # converted to RGB/RGBA), leaving at least 2x for the bicubic pass: Pillow's own reducing_gap=2.0.
    factor = max(image.size) // (2 * max_resolution) if max_resolution else 0
    if factor >= 2 and image.mode in _REDUCIBLE_MODES:
        image = image.reduce(factor)
    image = ImageOps.exif_transpose(image)
    image = _to_rgb(image)
    width, height = image.size
    if max_resolution and max(width, height) > max_resolution:
        scale = max_resolution / max(width, height)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        image = image.resize(size, Image.BICUBIC)
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"decoded to shape {array.shape}, expected [H, W, 3]")
    return np.ascontiguousarray(array)


class Validation(NamedTuple):
    """What the validation pass learns about one image: why it is skipped (None: it decodes), and its stored
    size (width, height in px, before any resize; 0 when skipped) and encoded bytes, for the free-space check."""

    reason: str | None
    width: int = 0
    height: int = 0
    num_bytes: int = 0


def validate_image(ref: ImageRef) -> Validation:
    """Cheap full-bitstream check of one image (see :class:`Validation`)."""
    try:
        data = ref.read()
        if not data:
            return Validation("empty file")
        image = _open(data)
        width, height = image.size
        if image.format == "JPEG":
            # Entropy decoding of every scan still happens at 1/8 scale, so truncation/corruption shows up.
            image.draft(image.mode, (max(1, width // 8), max(1, height // 8)))
        image.load()
        if width < 1 or height < 1:
            return Validation(f"degenerate size {image.size}")
        return Validation(None, width, height, len(data))
    except Exception as error:  # noqa: BLE001 - any decoder failure is a skip reason, not a crash
        return Validation(failure_reason(error, ref.display))
