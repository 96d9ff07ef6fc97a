"""Robust image loading: any user-supplied picture -> an RGB PIL image, or a clear `ImageError`.

Images arrive from uploads, datasets and Python callers as paths, raw bytes, PIL images or numpy
arrays, in every PIL mode. Everything downstream (CLIP preprocessing, the feature cache key) wants
one canonical form, so this module produces exactly that:

- EXIF orientation applied (phone photos are stored sideways with an orientation tag);
- RGB, with transparent areas composited on white (not on black, which is what a bare
  `convert("RGB")` does with RGBA) and 16-bit data scaled to 8 bits (not clipped to white);
- a pixel-count cap checked from the header before any pixels are decoded (decompression bombs);
- truncated, corrupt and non-image input rejected with an error naming the source.

`fit_for_tower` is the size policy for what reaches a tower's preprocessing (see its docstring).

`image_hash` keys the canonical pixels, so the same picture reached by path, bytes or PIL gets
the same key.
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
import warnings
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray]

# 64 megapixels: larger than any camera photo people upload, and 192 MB as RGB. PIL's own
# warning threshold (~89 Mpx) sits above it, so every image PIL would warn about fails here first.
DEFAULT_MAX_PIXELS = 64_000_000

# The longest side a picture keeps before the tower's "resize the short side, crop the centre"
# preprocessing, as a multiple of its short side. Real photos (up to 4:1 panoramas) pass untouched.
MAX_ASPECT_RATIO = 4

# Modes whose samples do not fit in 8 bits; PIL's convert("L"/"RGB") clips them instead of scaling.
_WIDE_INT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")

# Formats people actually upload. An allowlist keeps exotic decoders off untrusted input (EPS, for
# one, runs Ghostscript). HEIF appears when the pillow-heif plugin is registered.
SUPPORTED_FORMATS = (
    "JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF", "PPM", "TGA", "ICO", "MPO", "JPEG2000", "AVIF", "HEIF",
)

# warnings.catch_warnings mutates process-global state; serialise our use of it.
_open_lock = threading.Lock()


class ImageError(ValueError):
    """The input could not be turned into an RGB image; the message names the source and why."""


def load_image(src: ImageSource, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Load `src` as an RGB image with EXIF orientation applied (see the module docstring)."""
    if isinstance(src, Image.Image):
        name, image = "<PIL image>", src
        _check_pixels(image.size, max_pixels, name)
    elif isinstance(src, np.ndarray):
        name = "<array>"
        image = _from_array(src, max_pixels)
    elif isinstance(src, (bytes, bytearray, memoryview)):
        name = "<bytes>"
        image = _decode(io.BytesIO(bytes(src)), name, max_pixels)
    elif isinstance(src, (str, os.PathLike)):
        path = Path(src)
        name = str(path)
        if not path.is_file():
            raise ImageError(f"{name}: no such file")
        with open(path, "rb") as f:
            image = _decode(f, name, max_pixels)
    else:
        raise ImageError(
            f"cannot load an image from a {type(src).__name__}; pass a path, bytes, a PIL image or a numpy array"
        )
    try:
        image = ImageOps.exif_transpose(image)
        return _to_rgb(image)
    except ImageError:
        raise
    except Exception as e:  # corrupt EXIF or palette data surfaces here, after decoding
        raise ImageError(f"{name}: could not convert the image to RGB ({e})") from e


def fit_for_tower(image: Image.Image, resize_mode: str = "shortest") -> Image.Image:
    """Cut an extremely long picture down to MAX_ASPECT_RATIO around its centre before preprocessing.

    open_clip's default ("shortest") preprocessing scales the short side to the input size and then
    keeps the centre square, so a 30000x1 picture (169 bytes as PNG) first becomes 224 x 6.7M pixels,
    about 7 GB. The crop keeps that centre square and a margin of more than its own width on each
    side, so the tower sees the same pixels, while the resize is bounded to MAX_ASPECT_RATIO x input
    size squared. Huge pictures are bounded by `load_image`'s pixel cap instead. The "longest" and
    "squash" modes scale the long side down, so they never allocate more than the input size.
    """
    if resize_mode != "shortest":
        return image
    width, height = image.size
    short = min(width, height)
    keep = MAX_ASPECT_RATIO * short
    if max(width, height) <= keep:
        return image
    if width > height:
        left = (width - keep) // 2
        return image.crop((left, 0, left + keep, height))
    top = (height - keep) // 2
    return image.crop((0, top, width, top + keep))


def image_hash(image: Image.Image) -> str:
    """sha256 of an RGB image's size and pixels: the same picture gives the same key whatever its source."""
    if image.mode != "RGB":
        raise ValueError(f"image_hash expects an RGB image from load_image, got mode {image.mode!r}")
    digest = hashlib.sha256(f"{image.width}x{image.height}:".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def _check_pixels(size: tuple[int, int], max_pixels: int, name: str) -> None:
    width, height = size
    if width * height > max_pixels:
        raise ImageError(
            f"{name}: {width}x{height} = {width * height:,} pixels exceeds the limit of {max_pixels:,} "
            "(possible decompression bomb); downscale the image or raise max_pixels"
        )


def _decode(fp: io.IOBase, name: str, max_pixels: int) -> Image.Image:
    """Open (header only), check the size, then decode the first frame."""
    try:
        with _open_lock, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            Image.init()  # registers the plugins, so that Image.OPEN lists every format available
            image = Image.open(fp, formats=[f for f in SUPPORTED_FORMATS if f in Image.OPEN])
        _check_pixels(image.size, max_pixels, name)
        image.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"{name}: rejected as a possible decompression bomb ({e})") from e
    except Image.UnidentifiedImageError as e:
        raise ImageError(
            f"{name}: not an image in a supported format ({', '.join(SUPPORTED_FORMATS)})"
        ) from e
    except MemoryError:
        raise
    except Exception as e:  # truncated or corrupt data: OSError, SyntaxError, EOFError, struct.error, ...
        raise ImageError(f"{name}: truncated or corrupt image data ({type(e).__name__}: {e})") from e
    _check_pixels(image.size, max_pixels, name)  # some formats only know their true size after decoding
    return image


def _from_array(array: np.ndarray, max_pixels: int) -> Image.Image:
    """HxW, HxWx1, HxWx3 or HxWx4 arrays of uint8, uint16 or float in [0, 1]."""
    name = "<array>"
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise ImageError(f"{name}: shape {tuple(array.shape)} is not HxW, HxWx3 or HxWx4")
    height, width = array.shape[:2]
    if height == 0 or width == 0:
        raise ImageError(f"{name}: shape {tuple(array.shape)} has no pixels")
    _check_pixels((width, height), max_pixels, name)
    if array.dtype == np.uint8:
        pixels = array
    elif array.dtype == np.uint16:
        pixels = _scale_to_uint8(array.astype(np.float32) / 65535.0)
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ImageError(f"{name}: float array contains NaN or infinity")
        low, high = float(array.min()), float(array.max())
        if low < 0.0 or high > 1.0:
            raise ImageError(
                f"{name}: float arrays must hold values in [0, 1], got [{low:g}, {high:g}]; "
                "divide by 255 for 0-255 data"
            )
        pixels = _scale_to_uint8(array)
    else:
        raise ImageError(f"{name}: dtype {array.dtype} is not supported; use uint8, uint16 or float in [0, 1]")
    mode = {2: "L", 3: "RGB", 4: "RGBA"}[pixels.shape[2] if pixels.ndim == 3 else 2]
    return Image.fromarray(np.ascontiguousarray(pixels), mode=mode)


def _scale_to_uint8(unit: np.ndarray) -> np.ndarray:
    """[0, 1] floats -> uint8 with rounding (0.5 -> 128)."""
    return np.clip(np.rint(unit * 255.0), 0, 255).astype(np.uint8)


def _has_transparency(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in _WIDE_INT_MODES:
        # 16-bit grey (PNG/TIFF). Mode "I" is 32-bit but in practice holds 16-bit data from the same
        # sources, so it is scaled the same way; values outside 0..65535 are clipped.
        grey = np.asarray(image).astype(np.float32)
        return Image.fromarray(_scale_to_uint8(grey / 65535.0), mode="L").convert("RGB")
    if image.mode == "F":
        # 32-bit float grey: taken to be in [0, 1] (the usual convention for float images).
        grey = np.nan_to_num(np.asarray(image, dtype=np.float32), nan=0.0)
        return Image.fromarray(_scale_to_uint8(grey), mode="L").convert("RGB")
    if _has_transparency(image):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if image.mode == "RGB":
        return image
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV, RGBX
