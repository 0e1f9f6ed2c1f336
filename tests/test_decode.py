"""maskray.pipeline.decode against Pillow as the oracle: every format and mode a bucket holds becomes
the RGB tensor a viewer would show, and every broken file an ImageDecodeError that says why."""

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from maskray.pipeline.decode import ImageDecodeError, decode_image


def _rgb(height=24, width=32, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def _as_array(tensor: torch.Tensor) -> np.ndarray:
    assert tensor.dtype == torch.uint8 and tensor.ndim == 3 and tensor.shape[0] == 3
    return tensor.permute(1, 2, 0).numpy()


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF", "WEBP"])
def test_lossless_formats_round_trip(fmt):
    pixels = _rgb()
    params = {"lossless": True} if fmt == "WEBP" else {}
    decoded = decode_image(_encode(Image.fromarray(pixels), fmt, **params))
    assert np.array_equal(_as_array(decoded), pixels)


def test_jpeg_matches_pillow():
    data = _encode(Image.fromarray(_rgb()), "JPEG", quality=90)
    assert np.array_equal(_as_array(decode_image(data)), np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))


def test_progressive_jpeg():
    data = _encode(Image.fromarray(_rgb(64, 48)), "JPEG", progressive=True)
    assert decode_image(data).shape == (3, 64, 48)


def test_gif_first_frame():
    frames = [Image.fromarray(np.full((10, 12, 3), value, np.uint8)).convert("P") for value in (30, 200)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])
    decoded = _as_array(decode_image(buffer.getvalue()))
    expected = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))  # frame 0
    assert np.array_equal(decoded, expected)
    assert decoded.shape == (10, 12, 3)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_applied(orientation):
    pixels = _rgb(20, 30)
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = orientation
    data = _encode(image, "PNG", exif=exif)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    decoded = _as_array(decode_image(data))
    assert np.array_equal(decoded, expected)
    assert decoded.shape[:2] == ((30, 20) if orientation >= 5 else (20, 30))  # 5-8 swap the axes


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK", "1", "I;16"])
def test_modes_become_rgb(mode):
    base = Image.fromarray(_rgb())
    if mode == "I;16":
        gray = np.random.default_rng(1).integers(0, 65536, (24, 32), dtype=np.uint16)
        image = Image.fromarray(gray)
        expected = np.repeat((gray.astype(np.int64) * 255 // 65535).astype(np.uint8)[:, :, None], 3, axis=2)
    else:
        image = base.convert(mode)
        expected = np.asarray(image.convert("RGB"))
    fmt = {"CMYK": "TIFF"}.get(mode, "PNG")
    decoded = _as_array(decode_image(_encode(image, fmt)))
    if mode == "I;16":
        assert Image.open(io.BytesIO(_encode(image, fmt))).mode.startswith("I")  # really a 16-bit file
    assert np.array_equal(decoded, expected)


def test_palette_with_transparency():
    image = Image.fromarray(_rgb()).convert("P")
    image.info["transparency"] = 0
    data = _encode(image, "PNG", transparency=0)
    expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGBA").convert("RGB"))
    assert np.array_equal(_as_array(decode_image(data)), expected)


def test_result_is_channels_last_view():
    decoded = decode_image(_encode(Image.fromarray(_rgb()), "PNG"))
    assert decoded.permute(1, 2, 0).is_contiguous()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels in a few dozen bytes: a decompression bomb's header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: b"", "empty file"),
        (lambda: b"<html><body>not found</body></html>", "not an image"),
        (lambda: b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj", "not an image"),
        (lambda: _encode(Image.fromarray(_rgb(64, 64)), "JPEG")[:300], "corrupt image header: Truncated"),
        (lambda: _encode(Image.fromarray(_rgb(64, 64)), "JPEG")[:2000], "cannot decode JPEG"),
        (lambda: _encode(Image.fromarray(_rgb(64, 64)), "PNG")[:200], "cannot decode PNG"),
        (lambda: _png_header_only(50_000, 50_000), r"50000x50000 = 2,500,000,000 pixels is over the limit"),
    ],
    ids=["zero_bytes", "html", "pdf", "jpeg_cut_in_header", "truncated_jpeg", "truncated_png", "bomb"],
)
def test_broken_files_raise_clear_errors(make, message):
    with pytest.raises(ImageDecodeError, match=message):
        decode_image(make())


def test_pixel_limit_is_configurable():
    data = _encode(Image.fromarray(_rgb(20, 30)), "PNG")
    assert decode_image(data, max_pixels=600).shape == (3, 20, 30)
    with pytest.raises(ImageDecodeError, match="600 pixels is over the limit of 599"):
        decode_image(data, max_pixels=599)
