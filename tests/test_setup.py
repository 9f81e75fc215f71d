"""The environment that scripts/setup.sh builds."""

from __future__ import annotations

import importlib.metadata as md
from pathlib import Path

import PIL
from PIL import Image


def test_pil_is_pillow_simd() -> None:
    owned = {str(Path(f)) for f in md.files("pillow-simd") or ()}
    assert "PIL/__init__.py" in owned, "Pillow-SIMD does not provide the PIL package"
    names = {(d.metadata["Name"] or "").lower() for d in md.distributions()}
    assert "pillow" not in names, "plain Pillow is installed beside Pillow-SIMD and may shadow it"
    assert PIL.__version__ == md.version("pillow-simd").split("+")[0]
    # The imported module really is the installed Pillow-SIMD file, and it works.
    dist_root = Path(md.distribution("pillow-simd").locate_file(""))
    assert Path(PIL.__file__).resolve() == (dist_root / "PIL" / "__init__.py").resolve()
    image = Image.new("RGB", (40, 30), (10, 20, 30)).resize((20, 15), Image.BICUBIC)
    assert image.size == (20, 15) and image.getpixel((3, 3)) == (10, 20, 30)
