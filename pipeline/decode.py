"""Image bytes to the model's input: one decode path for segmentation and training.

``decode_image`` turns the bytes of a JPEG, PNG, WebP, BMP, TIFF or GIF (first frame) into a
uint8 Tensor[3, H, W] as the image is meant to be seen: EXIF orientation applied; grayscale,
RGBA, palette, CMYK and 16-bit images converted to 8-bit RGB. Anything that cannot become such
a tensor raises ``ImageDecodeError`` with a message that says what is wrong with the file (cut
short, damaged, over the pixel limit, or no image at all: an HTML error page, a PDF, text, a
HEIC photo), so that the pipeline can write it as an error row and go on; whatever Pillow
raises on a damaged file becomes that error, never an exception that would fail a shard.

Pillow does the decoding: it reads every format above (torchvision.io lacks BMP and TIFF), it
reports the size from the header before decoding, which is where the pixel limit is checked,
and it refuses truncated files instead of padding them with grey.
"""

import io
import warnings

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from maskray.pipeline.limits import DEFAULT_MAX_PIXELS

# Our own limit, checked on the header's size, replaces Pillow's global one (which would
# refuse images over 2 x 89 MP whatever a job allows, and only warn below that).
Image.MAX_IMAGE_PIXELS = None
# A truncated file is an error, never an image padded with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False
# Pillow's warnings about odd but readable files ("Corrupt EXIF data", ...) would flood a job's
# logs. Filtered once here, for Pillow's modules only: warnings.catch_warnings around each
# decode is not thread-safe (the worker decodes in a thread pool), and interleaved exits can
# leave every warning of the process switched off.
warnings.filterwarnings("ignore", module=r"PIL(\.|$)")

EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")


class ImageDecodeError(ValueError):
    """The bytes are not an image that can be decoded; the message says why."""


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """The image in ``data`` as a uint8 Tensor[3, H, W] (RGB, EXIF orientation applied).

    The tensor is a channels-last view (H, W, 3 in memory), which is the layout the model's
    convolutions use. Raises ImageDecodeError for an empty, unrecognised, truncated or corrupt
    file, and for an image of more than ``max_pixels`` pixels.
    """
    if len(data) == 0:
        raise ImageDecodeError("empty file (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageDecodeError(describe_unreadable(data)) from None
    except Exception as error:  # a header that Pillow recognised and then could not parse
        kind = image_format_of(data)
        claimed = f" (a {kind} file, by its first bytes)" if kind else ""
        raise ImageDecodeError(f"corrupt image header: {error}{claimed}") from None
    with image:
        width, height = image.size
        if width < 1 or height < 1:
            raise ImageDecodeError(f"{image.format} image of size {width}x{height} has no pixels")
        if width * height > max_pixels:
            raise ImageDecodeError(
                f"{image.format} image of {width}x{height} = {width * height:,} pixels is over the limit of "
                f"{max_pixels:,} (a decompression bomb, or raise --max-pixels)"
            )
        try:
            image.seek(0)  # GIF, TIFF and WebP may hold several frames: the first one
            image.load()
            image = ImageOps.exif_transpose(image)
            return _to_rgb_tensor(image)
        except ImageDecodeError:
            raise
        except (OSError, SyntaxError, ValueError, EOFError, IndexError, MemoryError) as error:
            # Pillow's words for a broken file: "image file is truncated", "broken data stream", ...
            raise ImageDecodeError(f"cannot decode {image.format} image ({width}x{height}): {error}") from None
        except Exception as error:  # noqa: BLE001 - a damaged file can make Pillow's loaders fail in any way
            # (a TIFF whose strip offsets are floats raises TypeError): still this file's fault, so
            # an error row, never an exception that fails the whole shard.
            raise ImageDecodeError(f"cannot decode {image.format} image ({width}x{height}), a damaged file: "
                                   f"{type(error).__name__}: {error}") from None


def _to_rgb_tensor(image: Image.Image) -> torch.Tensor:
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit grayscale (Pillow opens some as 32-bit "I"): keep the top 8 bits, as a viewer does.
        pixels = np.asarray(image).astype(np.int64)
        top = 65535 if image.mode.startswith("I;16") or pixels.max(initial=0) > 255 else 255
        gray = (np.clip(pixels, 0, top) * 255 // top).astype(np.uint8)
        rgb = np.repeat(gray[:, :, None], 3, axis=2)
    elif image.mode == "F":  # float grayscale (TIFF): values taken as 0..255, clipped
        gray = np.clip(np.nan_to_num(np.asarray(image)), 0, 255).astype(np.uint8)
        rgb = np.repeat(gray[:, :, None], 3, axis=2)
    else:
        if image.mode == "P" and "transparency" in image.info:
            image = image.convert("RGBA")  # Pillow asks for this route for palettes with transparency
        # RGBA and LA lose their alpha (the colours as stored, like torchvision's decode_image);
        # CMYK, YCbCr, L, 1 and palettes are converted by Pillow.
        rgb = np.array(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)


# What a file that Pillow cannot open is, by its first bytes, so that its error row says so.
_IMAGE_SIGNATURES = (
    (b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"8BPS", "PSD"), (b"BM", "BMP"),
)
_OTHER_SIGNATURES = (
    (b"%PDF", "not an image: a PDF document"),
    (b"PK\x03\x04", "not an image: a ZIP archive (an Office document, an EPUB, ...)"),
    (b"\x1f\x8b", "not an image: a gzip archive"),
)
# ISO base media files (``....ftyp<brand>``): HEIF photos (iPhones) and videos.
_HEIF_BRANDS = {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs", b"mif1", b"msf1"}


def image_format_of(data: bytes) -> str | None:
    """The image format ``data`` claims by its first bytes (Pillow's name: JPEG, PNG, GIF, TIFF, PSD, BMP, WEBP), or None."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((kind for signature, kind in _IMAGE_SIGNATURES if data.startswith(signature)), None)


def describe_unreadable(data: bytes) -> str:
    """Why Pillow found no image in ``data``: a damaged header of a known image format, a
    format this decoder lacks, or a file of another kind (an HTML error page saved in place of
    the image, a PDF, text), named as such."""
    for signature, message in _OTHER_SIGNATURES:
        if data.startswith(signature):
            return message
    if data[4:8] == b"ftyp":
        brand = data[8:12]
        if brand in _HEIF_BRANDS:
            return "unsupported image format: HEIC/HEIF (this Pillow has no HEIF decoder: convert it to JPEG or PNG)"
        if brand in (b"avif", b"avis"):
            return "corrupt image header: an AVIF file that Pillow cannot read"
        return f"not an image: an ISO media file of brand '{brand.decode('latin-1')}' (a video?)"
    kind = image_format_of(data)
    text = _as_text(data[:1024])
    if kind is not None and not (kind == "BMP" and text is not None):  # "BM" also starts words
        reason = _reader_reason(kind, data)
        return f"corrupt image header: a {kind} file (by its first bytes) that Pillow's {kind} reader refuses{reason}"
    if text is not None:
        start = text.lstrip("\ufeff \t\r\n")
        lowered = start[:200].lower()
        if lowered.startswith(("<!doctype html", "<html")) or "<html" in lowered:
            what = "an HTML page (an error page saved in place of the image?)"
        elif lowered.startswith("<svg") or ("<?xml" in lowered and "<svg" in text.lower()):
            return "unsupported image format: SVG, a vector drawing (render it to PNG first)"
        elif lowered.startswith("<?xml") or lowered.startswith("<"):
            what = "an XML document"
        elif lowered.startswith(("{", "[")):
            what = "JSON or other text"
        else:
            what = "text"
        return f"not an image: {what}, starting {start[:40]!r}"
    return f"not an image: no known image format in its first bytes {data[:8]!r}"


def _reader_reason(kind: str, data: bytes) -> str:
    """Pillow's own reason for refusing ``data`` as ``kind`` ("no more images in GIF file"), which
    Image.open does not pass on; empty when it gives none worth reading."""
    try:
        Image.init()
        factory, _ = Image.OPEN[kind]
        factory(io.BytesIO(data), "").close()
    except Exception as error:  # noqa: BLE001 - the reason is all we want from it
        reason = str(error)
        unhelpful = reason == "not identified by this driver" or not any(c.isalpha() for c in reason)
        return "" if unhelpful else f": {reason}"
    return ""


def _as_text(head: bytes) -> str | None:
    """``head`` as text when it reads as UTF-8 text (a multi-byte character cut at the end allowed)."""
    if b"\x00" in head:
        return None
    text = head.decode("utf-8", errors="replace")
    body = text[:-3] if len(head) == 1024 else text  # a character cut by the 1 KB slice
    if "\ufffd" in body:
        return None
    printable = sum(c.isprintable() or c in "\t\r\n" for c in body)
    return text if body and printable >= 0.95 * len(body) else None
