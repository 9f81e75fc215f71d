"""Reading and decoding the images a beton is written from: where their bytes live, and Pillow decoding.

Both the validation pass and the FFCV write of :mod:`aim_ds.data.writers` decode through here, so an image
that validates is an image the writer can store.
"""

from __future__ import annotations

import dataclasses
import io
import math

import numpy as np
from PIL import Image, ImageFile, ImageOps

# A truncated image must be an error we can count, never silently padded with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False
# Some DFN images are large; the cap only guards against decompression bombs.
Image.MAX_IMAGE_PIXELS = 20_000 * 20_000

IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")


@dataclasses.dataclass(frozen=True)
class ImageRef:
    """Where the encoded bytes of one image live: a whole file (size < 0) or a byte range of a tar."""

    path: str
    offset: int = 0
    size: int = -1
    name: str = ""  # what the sidecar calls it: the file path, or "shard.tar:key.jpg"

    def read(self) -> bytes:
        """The encoded bytes; raises OSError when a tar member is cut short."""
        with open(self.path, "rb") as f:
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


def decode_image(data: bytes, max_resolution: int = 0) -> np.ndarray:
    """Decode encoded image bytes to an upright RGB array.

    Returns uint8 [H, W, 3], EXIF orientation applied, the longer side resized (Pillow bicubic, antialiased)
    to at most ``max_resolution`` px (0 keeps the size). Raises on anything that does not decode fully.
    """
    image = Image.open(io.BytesIO(data))
    if max_resolution and image.format == "JPEG":
        scale = max_resolution / max(image.size)
        if scale < 1.0:
            # libjpeg decodes at 1/2, 1/4 or 1/8 scale while keeping both sides >= the request: a large
            # source costs a fraction of a full decode, and the bicubic pass below still sets the final size.
            image.draft("RGB", (math.ceil(image.size[0] * scale), math.ceil(image.size[1] * scale)))
    image.load()
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


def validate_image(ref: ImageRef) -> str | None:
    """Cheap full-bitstream check. Returns None if the image decodes, else a one-line reason."""
    try:
        data = ref.read()
        if not data:
            return "empty file"
        image = Image.open(io.BytesIO(data))
        if image.format == "JPEG":
            # Entropy decoding of every scan still happens at 1/8 scale, so truncation/corruption shows up.
            image.draft(image.mode, (max(1, image.size[0] // 8), max(1, image.size[1] // 8)))
        image.load()
        if image.size[0] < 1 or image.size[1] < 1:
            return f"degenerate size {image.size}"
        return None
    except Exception as error:  # noqa: BLE001 - any decoder failure is a skip reason, not a crash
        return f"{type(error).__name__}: {error}".strip()[:300]
