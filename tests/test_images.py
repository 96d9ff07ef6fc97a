"""load_image: every source and PIL mode -> correct RGB pixels, EXIF orientation, and clear errors."""

from __future__ import annotations

import io
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmadapter.images import DEFAULT_MAX_PIXELS, ImageError, image_hash, load_image

WHITE = (255, 255, 255)


def png_bytes(image: Image.Image, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG", **params)
    return buffer.getvalue()


def tiff_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "TIFF")
    return buffer.getvalue()


def pixel(image: Image.Image, xy: tuple[int, int] = (0, 0)) -> tuple[int, ...]:
    assert image.mode == "RGB"
    return image.getpixel(xy)


# --- modes --------------------------------------------------------------------------------------


def test_rgba_transparent_areas_become_white_and_partial_alpha_blends() -> None:
    rgba = Image.new("RGBA", (2, 1))
    rgba.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent black: white, not black
    rgba.putpixel((1, 0), (255, 0, 0, 128))  # half-transparent red over white
    for source in (rgba, png_bytes(rgba)):
        image = load_image(source)
        assert pixel(image, (0, 0)) == WHITE
        red, green, blue = pixel(image, (1, 0))
        assert red == 255 and abs(green - 127) <= 1 and abs(blue - 127) <= 1


def test_la_and_palette_transparency_become_white() -> None:
    la = Image.new("LA", (2, 1))
    la.putpixel((0, 0), (0, 0))
    la.putpixel((1, 0), (60, 255))
    image = load_image(png_bytes(la))
    assert pixel(image, (0, 0)) == WHITE and pixel(image, (1, 0)) == (60, 60, 60)

    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    palette.putpixel((0, 0), 0)
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 0  # palette index 0 is transparent
    for source in (palette, png_bytes(palette, transparency=0)):
        image = load_image(source)
        assert pixel(image, (0, 0)) == WHITE and pixel(image, (1, 0)) == (0, 200, 0)

    opaque_palette = palette.copy()
    del opaque_palette.info["transparency"]
    assert pixel(load_image(opaque_palette), (0, 0)) == (0, 0, 0)


def test_grey_rgb_with_transparent_colour_key_becomes_white() -> None:
    grey = Image.new("L", (2, 1), 10)
    grey.putpixel((1, 0), 90)
    image = load_image(png_bytes(grey, transparency=10))  # PNG tRNS chunk on a greyscale image
    assert pixel(image, (0, 0)) == WHITE and pixel(image, (1, 0)) == (90, 90, 90)
    rgb = Image.new("RGB", (2, 1), (1, 2, 3))
    rgb.putpixel((1, 0), (40, 50, 60))
    image = load_image(png_bytes(rgb, transparency=(1, 2, 3)))
    assert pixel(image, (0, 0)) == WHITE and pixel(image, (1, 0)) == (40, 50, 60)


@pytest.mark.parametrize("mode", ["I;16", "I"])
def test_16_bit_grey_is_scaled_not_clipped(mode: str) -> None:
    values = np.array([[0, 32768, 65535, 257 * 100]], dtype=np.uint16)
    image16 = Image.fromarray(values) if mode == "I;16" else Image.fromarray(values.astype(np.int32), mode="I")
    assert image16.mode == mode
    encoded = png_bytes(image16) if mode == "I;16" else tiff_bytes(image16)  # as files arrive
    sources = [image16, encoded]
    for source in sources:
        image = load_image(source)
        assert [pixel(image, (x, 0))[0] for x in range(4)] == [0, 128, 255, 100]


def test_float_grey_is_read_as_unit_range() -> None:
    image = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), mode="F")
    assert [pixel(load_image(image), (x, 0)) for x in range(3)] == [(0, 0, 0), (128, 128, 128), WHITE]


def test_grey_bilevel_and_cmyk() -> None:
    assert pixel(load_image(Image.new("L", (1, 1), 77))) == (77, 77, 77)
    bilevel = Image.new("1", (2, 1), 0)
    bilevel.putpixel((1, 0), 1)
    image = load_image(png_bytes(bilevel))
    assert pixel(image, (0, 0)) == (0, 0, 0) and pixel(image, (1, 0)) == WHITE
    cmyk = Image.new("CMYK", (3, 1))
    cmyk.putpixel((0, 0), (0, 0, 0, 0))  # no ink: white
    cmyk.putpixel((1, 0), (255, 0, 0, 0))  # full cyan
    cmyk.putpixel((2, 0), (0, 0, 0, 255))  # full black
    for source in (cmyk, tiff_bytes(cmyk)):
        image = load_image(source)
        assert [pixel(image, (x, 0)) for x in range(3)] == [WHITE, (0, 255, 255), (0, 0, 0)]


# --- arrays -------------------------------------------------------------------------------------


def test_numpy_arrays() -> None:
    grey = np.array([[0, 200]], dtype=np.uint8)
    assert pixel(load_image(grey), (1, 0)) == (200, 200, 200)
    rgb_float = np.zeros((1, 2, 3), dtype=np.float64)
    rgb_float[0, 1] = (1.0, 0.5, 0.0)
    assert pixel(load_image(rgb_float), (1, 0)) == (255, 128, 0)
    rgba = np.zeros((1, 2, 4), dtype=np.uint8)
    rgba[0, 1] = (10, 20, 30, 255)  # pixel 0 fully transparent
    image = load_image(rgba)
    assert pixel(image, (0, 0)) == WHITE and pixel(image, (1, 0)) == (10, 20, 30)
    assert pixel(load_image(np.full((1, 1), 32768, dtype=np.uint16))) == (128, 128, 128)
    assert load_image(np.zeros((5, 7, 1), dtype=np.uint8)).size == (7, 5)  # (width, height)


@pytest.mark.parametrize("array, message", [
    (np.full((2, 2, 3), 255.0), r"\[0, 1\].*divide by 255"),
    (np.full((2, 2), np.nan, dtype=np.float32), "NaN"),
    (np.zeros((2, 2, 2), dtype=np.uint8), "is not HxW, HxWx3 or HxWx4"),
    (np.zeros((0, 2, 3), dtype=np.uint8), "no pixels"),
    (np.zeros((2, 2), dtype=np.int64), "dtype int64 is not supported"),
])
def test_bad_arrays(array: np.ndarray, message: str) -> None:
    with pytest.raises(ImageError, match=f"<array>.*{message}"):
        load_image(array)


# --- orientation and identity -------------------------------------------------------------------


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    # Stored landscape: left half red, right half blue; orientation 6 = "rotate 90 degrees clockwise to view".
    stored = Image.new("RGB", (64, 32), (255, 0, 0))
    stored.paste((0, 0, 255), (32, 0, 64, 32))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "photo.jpg"
    stored.save(path, "JPEG", quality=95, exif=exif.tobytes())
    for source in (path, path.read_bytes(), Image.open(path)):
        image = load_image(source)
        assert image.size == (32, 64)  # portrait once turned
        top, bottom = pixel(image, (16, 8)), pixel(image, (16, 56))
        assert top[0] > 200 and top[2] < 60, top  # the stored left (red) is now on top
        assert bottom[2] > 200 and bottom[0] < 60, bottom


def test_same_picture_from_every_source_has_one_hash(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
    picture = Image.fromarray(array)
    path = tmp_path / "p.png"
    picture.save(path)
    hashes = {image_hash(load_image(source)) for source in (path, str(path), path.read_bytes(), picture, array)}
    assert len(hashes) == 1
    assert image_hash(load_image(array[:, :, ::-1].copy())) not in hashes  # BGR is another picture
    flat = np.zeros((2, 3, 3), dtype=np.uint8)
    assert image_hash(load_image(flat)) != image_hash(load_image(flat.reshape(3, 2, 3)))  # size counts
    with pytest.raises(ValueError, match="RGB"):
        image_hash(Image.new("L", (1, 1)))


def test_pil_input_is_not_modified() -> None:
    rgba = Image.new("RGBA", (1, 1), (0, 0, 0, 0))
    load_image(rgba)
    assert rgba.mode == "RGBA" and rgba.getpixel((0, 0)) == (0, 0, 0, 0)


# --- bad files ----------------------------------------------------------------------------------


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG file whose header claims width x height (no pixel data at all)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def test_truncated_png_is_rejected_naming_the_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    data = png_bytes(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)))
    path = tmp_path / "cut.png"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match=f"{re.escape(str(path))}: truncated or corrupt"):
        load_image(path)
    with pytest.raises(ImageError, match="<bytes>: truncated or corrupt"):
        load_image(data[: len(data) // 2])


def test_decompression_bombs_are_rejected_before_decoding(tmp_path: Path) -> None:
    # Beyond PIL's own hard limit: PIL's DecompressionBombError becomes ours.
    huge = tmp_path / "huge.png"
    huge.write_bytes(png_header_only(100_000, 100_000))
    assert huge.stat().st_size < 100
    with pytest.raises(ImageError, match=f"{re.escape(str(huge))}: rejected as a possible decompression bomb"):
        load_image(huge)
    # Between PIL's warning threshold and its hard limit, with our own cap lifted: PIL's warning
    # becomes our error.
    warned = tmp_path / "warned.png"
    warned.write_bytes(png_header_only(10_000, 10_000))
    with pytest.raises(ImageError, match=f"{re.escape(str(warned))}: rejected as a possible decompression bomb"):
        load_image(warned, max_pixels=10**9)
    # Under PIL's thresholds but over our cap: refused from the header alone (the file has no
    # pixel data, so decoding first would have reported truncation instead).
    big = png_header_only(9_000, 8_000)
    assert 9_000 * 8_000 > DEFAULT_MAX_PIXELS
    with pytest.raises(ImageError, match="<bytes>: 9000x8000 = 72,000,000 pixels exceeds the limit"):
        load_image(big)
    with pytest.raises(ImageError, match="exceeds the limit of 100"):
        load_image(png_header_only(20, 20), max_pixels=100)
    with pytest.raises(ImageError, match="<array>.*exceeds the limit of 100"):
        load_image(np.zeros((20, 20), dtype=np.uint8), max_pixels=100)


def test_non_images_are_rejected_naming_the_file(tmp_path: Path) -> None:
    text = tmp_path / "notes.jpg"
    text.write_text("this is not a picture\n")
    with pytest.raises(ImageError, match=f"{re.escape(str(text))}: not an image in a supported format"):
        load_image(text)
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"  # would run Ghostscript
    with pytest.raises(ImageError, match="<bytes>: not an image"):
        load_image(eps)
    with pytest.raises(ImageError, match="no such file"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="from a int"):
        load_image(3)  # type: ignore[arg-type]
    assert issubclass(ImageError, ValueError)
