"""JPEG bytes to image tensors on the model's device, a batch at a time, with Pillow behind it.

On a GPU, ``decode_batch`` decodes a batch's JPEGs with nvJPEG (``torchvision.io.decode_jpeg``
with ``device="cuda"``, one call for the batch), so that the pixels are made where the model
reads them and the CPU only reads bytes. ``device`` is an argument: with ``"cpu"`` the same
code runs libjpeg through the same torchvision call, which is how the tests cover it without
a GPU.

Which file goes where is decided from its bytes before any decoding (``device_decodable``, a
walk over the JPEG markers up to the first scan, a few microseconds): a baseline or progressive
8-bit JPEG of 1 or 3 components, within the pixel limit, ending with its end-of-image marker,
without an EXIF (or XMP) orientation to apply, and not an Adobe RGB-coded file. Everything
else stays with ``maskray.pipeline.decode.decode_image`` (Pillow): the other formats, EXIF
rotation, CMYK, 12-bit and arithmetic-coded JPEGs, and every file that is cut short or over the
limit, so that a broken file gets exactly the error row it gets on the CPU path. A file that
nvJPEG refuses after all (a damaged stream) is decoded by Pillow too, which then gives the
image, or the error that the Pillow path gives.

On the CPU the job decodes the same JPEGs with the same call, one at a time in its read threads:
torchvision's libjpeg-turbo gives Pillow's pixels exactly (same IDCT, same upsampling; the tests
check it) in about 0.6 of Pillow's time, which has no image object and no conversion copies to
make. nvJPEG may round some pixel values differently (its IDCT and chroma upsampling are its own),
so GPU results can differ slightly from CPU results, as the model's float16 arithmetic does anyway.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from maskray.pipeline.decode import ImageDecodeError, decode_image
from maskray.pipeline.limits import DEFAULT_MAX_PIXELS

# torchvision 0.29 marks its image decoders deprecated (for TorchCodec) with a warning on every
# call; filtered here for torchvision.io only, once, as decode.py does for Pillow's warnings.
warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torchvision\.io")

_SOF_DEVICE = (0xC0, 0xC1, 0xC2)  # Huffman-coded: baseline, extended sequential, progressive
_NOT_SOF = (0xC4, 0xC8, 0xCC)  # DHT, JPG, DAC share the 0xC0-0xCF range
_EXIF = b"Exif\x00\x00"
_XMP = b"http://ns.adobe.com/xap/1.0/\x00"
_ORIENTATION = 0x0112


@dataclass(frozen=True)
class JpegHeader:
    """What a JPEG's markers before its first scan say."""

    sof: int  # the start-of-frame marker: 0xC0 baseline, 0xC2 progressive, ...
    bits: int  # sample precision
    height: int
    width: int
    components: int
    orientation: int | None  # the EXIF (or XMP) orientation, 1 when none; None: one that cannot be read
    adobe_transform: int | None  # the Adobe APP14 colour transform (0: RGB or CMYK as stored), None without one


def read_jpeg_header(data: bytes) -> JpegHeader | None:
    """The header of the JPEG in ``data``, or None when it is no JPEG or its markers do not parse."""
    if not data.startswith(b"\xff\xd8"):
        return None
    view = memoryview(data)
    pos, end = 2, len(data)
    frame, orientation, adobe = None, 1, None
    while True:
        if pos + 4 > end or data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # standalone markers
            pos += 2
            continue
        if marker == 0xD9:  # end of image before any scan
            return None
        length = (data[pos + 2] << 8) | data[pos + 3]
        if length < 2 or pos + 2 + length > end:
            return None
        segment = view[pos + 4 : pos + 2 + length]
        if marker == 0xDA:  # start of scan: the header is over
            break
        if marker == 0xE1 and orientation == 1:  # the first EXIF or XMP orientation that rotates (or cannot be read) decides
            if segment[:6] == _EXIF:
                orientation = _exif_orientation(segment[6:])
            elif segment[: len(_XMP)] == _XMP and b"tiff:Orientation" in bytes(segment):
                orientation = None  # Pillow reads an XMP orientation too: its own path decides
        elif marker == 0xEE and segment[:5] == b"Adobe" and len(segment) >= 12:
            adobe = segment[11]
        elif 0xC0 <= marker <= 0xCF and marker not in _NOT_SOF:
            if len(segment) < 6 or frame is not None:
                return None
            frame = (marker, segment[0], (segment[1] << 8) | segment[2], (segment[3] << 8) | segment[4], segment[5])
        pos += 2 + length
    if frame is None:
        return None
    return JpegHeader(*frame, orientation=orientation, adobe_transform=adobe)


def _exif_orientation(tiff: memoryview) -> int | None:
    """The orientation tag of IFD0 of an EXIF block (a TIFF structure): 1 when absent, None when unreadable."""
    if len(tiff) < 8:
        return None
    order = bytes(tiff[:4])
    if order == b"II*\x00":
        endian = "little"
    elif order == b"MM\x00*":
        endian = "big"
    else:
        return None

    def number(offset: int, size: int) -> int:
        return int.from_bytes(tiff[offset : offset + size], endian)

    ifd = number(4, 4)
    if ifd + 2 > len(tiff):
        return None
    count = number(ifd, 2)
    if ifd + 2 + 12 * count > len(tiff):
        return None
    for i in range(count):
        entry = ifd + 2 + 12 * i
        if number(entry, 2) == _ORIENTATION:
            kind = number(entry + 2, 2)
            if kind == 3:  # SHORT, as the standard says
                return number(entry + 8, 2)
            if kind == 4:  # LONG, as some writers do
                return number(entry + 8, 4)
            return None
    return 1


def device_decodable(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> bool:
    """Whether ``data`` is a JPEG that ``decode_batch`` gives to nvJPEG rather than to Pillow."""
    header = read_jpeg_header(data)
    return (
        header is not None
        and header.sof in _SOF_DEVICE
        and header.bits == 8
        and header.components in (1, 3)
        and 0 < header.height
        and 0 < header.width
        and header.width * header.height <= max_pixels
        and header.orientation == 1
        and not (header.components == 3 and header.adobe_transform == 0)  # stored as RGB, not YCbCr
        and data.endswith(b"\xff\xd9")  # cut short: Pillow's error row, never a padded image
    )


def _byte_tensor(data: bytes) -> torch.Tensor:
    tensor = torch.empty(len(data), dtype=torch.uint8)
    tensor.numpy()[:] = memoryview(data)  # one copy; torch.frombuffer warns on read-only bytes
    return tensor


def _device_failed(error: BaseException) -> bool:
    """A CUDA error that is the device's, not the file's: never hidden behind a fallback."""
    return isinstance(error, torch.OutOfMemoryError) or "CUDA error" in str(error)


def decode_jpegs(datas: Sequence[bytes], device: torch.device | str) -> list[torch.Tensor | None]:
    """Each JPEG of ``datas`` as a uint8 Tensor[3, H, W] on ``device`` (RGB), decoded there (nvJPEG
    on a GPU, libjpeg on the CPU) in one call for the batch; None for a file the decoder refuses."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if not datas:
        return []
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # the decoder is kept per device index: say which
        device = torch.device("cuda", torch.cuda.current_device())
    inputs = [_byte_tensor(data) for data in datas]
    try:
        return list(decode_jpeg(inputs, mode=ImageReadMode.RGB, device=device))
    except RuntimeError as error:
        if _device_failed(error):
            raise
        if len(inputs) == 1:
            return [None]
    # One refused file fails the whole call: each on its own, keeping the others.
    results: list[torch.Tensor | None] = []
    for tensor in inputs:
        try:
            results.append(decode_jpeg([tensor], mode=ImageReadMode.RGB, device=device)[0])
        except RuntimeError as error:
            if _device_failed(error):
                raise
            results.append(None)
    return results


def decode_batch(datas: Sequence[bytes], device: torch.device | str,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> list[torch.Tensor | ImageDecodeError]:
    """Each of ``datas`` (bytes that ``device_decodable`` accepted) as a uint8 Tensor[3, H, W] on
    ``device``, or the ImageDecodeError that Pillow's path gives a broken file: decoded on the
    device in one call, and by Pillow (then copied to the device) where the device's decoder refuses."""
    results: list[torch.Tensor | ImageDecodeError | None] = list(decode_jpegs(datas, device))
    for i, result in enumerate(results):
        if result is None:
            try:
                results[i] = decode_image(datas[i], max_pixels).to(device)
            except ImageDecodeError as error:
                results[i] = error
    return results  # type: ignore[return-value]
