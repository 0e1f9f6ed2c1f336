"""Image bytes to the model's input: one decode path for segmentation and training.

``decode_image`` turns the bytes of a JPEG, PNG, WebP, BMP, TIFF or GIF (first frame) into a
uint8 Tensor[3, H, W] as the image is meant to be seen: EXIF orientation applied; grayscale,
RGBA, palette, CMYK and 16-bit images converted to 8-bit RGB. Anything that cannot become such
a tensor raises ``ImageDecodeError`` with a message that says what is wrong with the file, so
that the pipeline can write it as an error row and go on.

Pillow does the decoding: it reads every format above (torchvision.io lacks BMP and TIFF), it
reports the size from the header before decoding, which is where the pixel limit is checked,
and it refuses truncated files instead of padding them with grey.
"""

import io
import warnings

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# About 4x a 48-megapixel photo: a decompression bomb (a small file that claims a huge image)
# is refused before any pixel is decoded. Configurable per job.
DEFAULT_MAX_PIXELS = 200_000_000

# Our own limit, checked on the header's size, replaces Pillow's global one (which would
# refuse images over 2 x 89 MP whatever a job allows, and only warn below that).
Image.MAX_IMAGE_PIXELS = None
# A truncated file is an error, never an image padded with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False

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
        raise ImageDecodeError(f"not an image: no known image format in its first bytes {data[:8]!r}") from None
    except Exception as error:  # a header that Pillow recognised and then could not parse
        raise ImageDecodeError(f"corrupt image header: {error}") from None
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
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Pillow's warnings about odd but readable files
                image.seek(0)  # GIF, TIFF and WebP may hold several frames: the first one
                image.load()
                image = ImageOps.exif_transpose(image)
                return _to_rgb_tensor(image)
        except ImageDecodeError:
            raise
        except (OSError, SyntaxError, ValueError, EOFError, IndexError, MemoryError) as error:
            # Pillow's words for a broken file: "image file is truncated", "broken data stream", ...
            raise ImageDecodeError(f"cannot decode {image.format} image ({width}x{height}): {error}") from None


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
