"""Decoding training images: a decompression-bomb guard, any PIL mode to RGB, and errors that name the file.

Mode conversion: PIL's `convert("RGB")` is right for most modes (P, L, 1, CMYK, YCbCr), but not for two kinds of input
found in scraped data: 16/32-bit grey ("I;16", "I", "F"), which `convert` clips to white instead of scaling, and
images with transparency, whose hidden colour under alpha 0 is often black. Those are scaled to 8 bits and composited
over white respectively.
"""
from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485  # PIL's own bomb threshold (about 9459 x 9459)
_HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class ImageError(ValueError):
    """An image cannot be used (missing, unreadable, too large); the message names the file."""


def open_rgb(source: str | os.PathLike | bytes, *, name: str | None = None,
             max_pixels: int = DEFAULT_MAX_PIXELS):
    """Decode a file path or encoded bytes into a fully loaded RGB PIL image."""
    name = name or (str(source) if not isinstance(source, bytes) else "<bytes>")
    if not isinstance(source, bytes) and not Path(source).is_file():
        raise ImageError(f"{name}: image file not found")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit decides, below
            image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
            width, height = image.size
            if width * height > max_pixels:
                raise ImageError(f"{name}: {width}x{height} = {width * height} pixels is above max_pixels={max_pixels}"
                                 " (decompression-bomb guard); raise max_pixels if you trust this file")
            image.load()
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(f"{name}: {e} (decompression-bomb guard)") from None
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files; all mean "unusable image"
        raise ImageError(f"{name}: cannot decode image ({type(e).__name__}: {e})") from None
    return to_rgb(image)


def to_rgb(image):
    if image.mode == "RGB":
        return image
    if image.mode in _HIGH_BIT_MODES:
        return _high_bit_to_l(image).convert("RGB")
    if image.mode in _ALPHA_MODES or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _high_bit_to_l(image):
    """16/32-bit or float grey to 8 bits: 16-bit ranges scale by 1/257; others are stretched to their own maximum."""
    values = np.asarray(image).astype(np.float64)
    top = values.max(initial=0.0)
    if image.mode.startswith("I;16") or 255 < top <= 65535:
        values = values / 257.0
    elif image.mode == "F" and top <= 1.0:
        values = values * 255.0
    elif top > 65535:
        values = values * (255.0 / top)
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))  # 2-D uint8: mode L
