"""A corpus of broken and unusual image files, made here with Pillow and by hand (nothing is
downloaded), each with what maskray must make of it: an ``ok`` row of a known size (and, for
the decoder, known pixels), or an ``error`` row whose message says what is wrong.

It holds what real buckets hold: every format and colour mode the decoder claims, files cut
short or damaged, things that are not images under image names (an HTML error page, a PDF, an
iPhone's HEIC), decompression bombs, extreme shapes, and keys that are hard on a reader (spaces,
unicode, a 900-byte key, ``../``, ``//``, ``./``, ``?``, ``#``, ``%``, glob characters, a URL
inside a key). ``tests/test_input_corpus.py`` uploads it and runs the job over it.
"""

import io
import struct
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

# The four colours of a quadrant picture: which corner ends up where tells how it was turned.
RED, GREEN, BLUE, YELLOW = (230, 30, 30), (30, 200, 60), (40, 60, 220), (240, 220, 40)


@dataclass(frozen=True)
class Case:
    """One file of the corpus and what the job must make of it."""

    key: str  # under the input prefix
    data: bytes
    size: tuple[int, int] | None = None  # (width, height) as decoded and shown; None: the decoder refuses it
    error: str | None = None  # a regular expression the error row's message must match; None: an ok row
    pixels: np.ndarray | None = None  # the exact H x W x 3 picture (lossless files)
    colours: tuple[tuple[int, int, tuple[int, int, int]], ...] = ()  # (x, y, rgb) of the shown picture
    tolerance: int = 0  # per channel, for ``pixels`` and ``colours``

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def decodes(self) -> bool:
        return self.size is not None

    def __post_init__(self) -> None:
        assert self.size is not None or self.error is not None, f"{self.key}: a case is decoded, or an error, or both"


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def quadrants(width: int, height: int) -> np.ndarray:
    """RED top left, GREEN top right, BLUE bottom left, YELLOW bottom right."""
    picture = np.empty((height, width, 3), np.uint8)
    half_w, half_h = width // 2, height // 2
    picture[:half_h, :half_w], picture[:half_h, half_w:] = RED, GREEN
    picture[half_h:, :half_w], picture[half_h:, half_w:] = BLUE, YELLOW
    return picture


def quadrant_colours(width: int, height: int) -> tuple[tuple[int, int, tuple[int, int, int]], ...]:
    """The centre of each quadrant of an upright ``quadrants(width, height)`` picture."""
    x0, x1, y0, y1 = width // 4, 3 * width // 4, height // 4, 3 * height // 4
    return (x0, y0, RED), (x1, y0, GREEN), (x0, y1, BLUE), (x1, y1, YELLOW)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_by_hand(width: int, height: int, bit_depth: int, colour_type: int, rows: bytes) -> bytes:
    """A PNG from raw filtered rows (each starting with filter byte 0): for what Pillow cannot write."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(rows)) + png_chunk(b"IEND", b"")


def jpeg(width: int, height: int, **params) -> bytes:
    return encode(Image.fromarray(quadrants(width, height)), "JPEG", quality=95, **params)


def lossless(width: int, height: int, fmt: str, **params) -> tuple[np.ndarray, bytes]:
    """A quadrant picture and its file in a lossless format: the decoded pixels must be exactly these."""
    picture = quadrants(width, height)
    return picture, encode(Image.fromarray(picture), fmt, **params)


def ok(key: str, data: bytes, width: int, height: int, **expect) -> Case:
    return Case(key, data, size=(width, height), **expect)


def error(key: str, data: bytes, message: str) -> Case:
    return Case(key, data, error=message)


# Cases, one maker each -----------------------------------------------------------------------


def _formats_and_modes() -> list[Case]:
    cases = []
    cases.append(ok("ok/baseline.jpg", jpeg(64, 48), 64, 48, colours=quadrant_colours(64, 48), tolerance=12))
    cases.append(ok("ok/progressive.jpg", jpeg(64, 48, progressive=True), 64, 48, colours=quadrant_colours(64, 48), tolerance=12))
    # CMYK JPEG (print workflows): Pillow stores it Adobe-style, inverted; it must come back as the RGB it was.
    cmyk = encode(Image.fromarray(quadrants(64, 48)).convert("CMYK"), "JPEG", quality=95)
    assert Image.open(io.BytesIO(cmyk)).mode == "CMYK"
    cases.append(ok("ok/cmyk.jpg", cmyk, 64, 48, colours=quadrant_colours(64, 48), tolerance=16))
    for name, fmt, params in [("ok/lossless.webp", "WEBP", {"lossless": True}), ("ok/plain.bmp", "BMP", {}),
                              ("ok/plain.png", "PNG", {})]:
        picture, data = lossless(40, 30, fmt, **params)
        cases.append(ok(name, data, 40, 30, pixels=picture))

    # 16-bit grayscale PNG (scientific and medical images): a viewer shows the top 8 bits.
    gray16 = np.tile(np.linspace(0, 65535, 50).astype(np.uint16), (20, 1))
    data = encode(Image.fromarray(gray16), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    top_bits = np.repeat((gray16 >> 8).astype(np.uint8)[:, :, None], 3, 2)
    cases.append(ok("ok/gray16.png", data, 50, 20, pixels=top_bits, tolerance=1))
    # 48-bit RGB PNG (16 bits per channel), which Pillow cannot write: made by hand.
    rgb16 = np.random.default_rng(7).integers(0, 65536, (12, 18, 3), dtype=np.uint16)
    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in rgb16)
    cases.append(ok("ok/rgb48.png", png_by_hand(18, 12, 16, 2, rows), 18, 12, pixels=(rgb16 >> 8).astype(np.uint8), tolerance=1))

    gray = np.tile(np.arange(0, 250, 5, dtype=np.uint8), (10, 1))
    cases.append(ok("ok/gray.png", encode(Image.fromarray(gray), "PNG"), 50, 10, pixels=np.repeat(gray[:, :, None], 3, 2)))
    bilevel = (np.indices((16, 16)).sum(0) % 2 * 255).astype(np.uint8)  # a checkerboard, 1 bit per pixel
    cases.append(ok("ok/bilevel.png", encode(Image.fromarray(bilevel).convert("1"), "PNG"), 16, 16,
                    pixels=np.repeat(bilevel[:, :, None], 3, 2)))
    # Palette PNG: four entries, indices laid out as quadrants.
    picture = quadrants(40, 30)
    palette = Image.new("P", (40, 30))
    palette.putpalette([*RED, *GREEN, *BLUE, *YELLOW])
    index = np.zeros((30, 40), np.uint8)
    index[:15, 20:], index[15:, :20], index[15:, 20:] = 1, 2, 3
    palette.putdata(index.ravel().tolist())
    cases.append(ok("ok/palette.png", encode(palette, "PNG"), 40, 30, pixels=picture))
    # RGBA, with alpha 0 in the left half: the colours as stored, alpha dropped.
    rgba = np.dstack([picture, np.where(np.arange(40) < 20, 0, 255).astype(np.uint8)[None, :].repeat(30, 0)])
    cases.append(ok("ok/rgba.png", encode(Image.fromarray(rgba, "RGBA"), "PNG"), 40, 30, pixels=picture))

    # Animated GIF (three frames, each one colour): the first frame.
    frames = []
    for colour in (RED, GREEN, BLUE):
        frame = Image.new("P", (24, 16), 0)
        frame.putpalette([*colour, 0, 0, 0])  # exact colours (a conversion from RGB would dither)
        frames.append(frame)
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(io.BytesIO(buffer.getvalue())).n_frames == 3
    cases.append(ok("ok/animated.gif", buffer.getvalue(), 24, 16, pixels=np.full((16, 24, 3), RED, np.uint8)))
    # A TIFF with two pages: the first page.
    first, _ = lossless(40, 30, "TIFF")
    buffer = io.BytesIO()
    Image.fromarray(first).save(buffer, "TIFF", save_all=True, append_images=[Image.new("RGB", (10, 10), BLUE)])
    cases.append(ok("ok/pages.tiff", buffer.getvalue(), 40, 30, pixels=first))

    # EXIF orientation 6 (a phone held upright): stored 64x48, shown 48x64 turned a quarter clockwise,
    # so the stored top-left (RED) is shown top right and the stored bottom-left (BLUE) top left.
    image = Image.fromarray(quadrants(64, 48))
    exif = image.getexif()
    exif[0x0112] = 6
    rotated = encode(image, "JPEG", quality=95, exif=exif)
    cases.append(ok("ok/exif_rotated.jpg", rotated, 48, 64, tolerance=12,
                    colours=((12, 16, BLUE), (36, 16, RED), (12, 48, YELLOW), (36, 48, GREEN))))

    # A damaged EXIF block (cameras and editors write them): no orientation to apply, the picture as stored.
    blob = b"Exif\0\0MM\0*\0\0\0\x08" + b"\xff" * 30
    plain = jpeg(64, 48)
    damaged_exif = plain[:2] + b"\xff\xe1" + struct.pack(">H", len(blob) + 2) + blob + plain[2:]
    cases.append(ok("ok/damaged_exif.jpg", damaged_exif, 64, 48, colours=quadrant_colours(64, 48), tolerance=12))

    one = Image.new("RGB", (1, 1), (10, 20, 30))
    cases.append(ok("ok/one_pixel.png", encode(one, "PNG"), 1, 1, pixels=np.full((1, 1, 3), (10, 20, 30), np.uint8)))
    # A strip about as long as the light model takes (its long side is resized to at most 160,
    # which leaves the short side at one pixel).
    cases.append(ok("ok/strip_600x4.png", encode(Image.new("RGB", (600, 4), GREEN), "PNG"), 600, 4))
    # A good PNG named .jpg, an upper-case extension, a JPEG followed by junk (some uploaders append).
    picture, data = lossless(40, 30, "PNG")
    cases.append(ok("ok/png_named.jpg", data, 40, 30, pixels=picture))
    cases.append(ok("ok/UPPER_CASE.JPG", jpeg(32, 32), 32, 32, colours=quadrant_colours(32, 32), tolerance=12))
    cases.append(ok("ok/trailing_junk.jpg", jpeg(64, 48) + b"\0junk after the end-of-image marker" * 50, 64, 48,
                    colours=quadrant_colours(64, 48), tolerance=12))
    return cases


def _extreme_shapes() -> list[Case]:
    # A one-pixel-high strip 20000 wide: the model's resize keeps at least one pixel across (it
    # used to scale the height to 0 and fail), so it is an ok row of its own size.
    strip = encode(Image.new("RGB", (20000, 1), BLUE), "PNG")
    return [Case("shapes/strip_20000x1.png", strip, size=(20000, 1), pixels=np.full((1, 20000, 3), BLUE, np.uint8))]


def _pdf_document() -> bytes:
    return encode(Image.new("RGB", (30, 20), RED), "PDF")


def _tiff_with_float_strip_offsets() -> bytes:
    """A TIFF whose StripOffsets tag (273) says its type is DOUBLE: Pillow's loader then raises
    TypeError, which must become an error row, not an exception that fails the whole shard."""
    data = bytearray(encode(Image.new("RGB", (32, 24), GREEN), "TIFF"))
    assert data[:4] == b"II*\0"
    directory = struct.unpack_from("<I", data, 4)[0]
    for i in range(struct.unpack_from("<H", data, directory)[0]):
        entry = directory + 2 + 12 * i
        if struct.unpack_from("<H", data, entry)[0] == 273:
            struct.pack_into("<H", data, entry + 2, 12)  # DOUBLE
            return bytes(data)
    raise AssertionError("Pillow's TIFF has no StripOffsets tag")


def _broken_files() -> list[Case]:
    good_jpeg, good_png = jpeg(64, 48), encode(Image.fromarray(quadrants(64, 48)), "PNG")
    noise = encode(Image.fromarray(np.random.default_rng(3).integers(0, 256, (64, 96, 3), dtype=np.uint8)), "JPEG", quality=90)
    idat = good_png.index(b"IDAT") + 24
    bit_flipped_png = good_png[:idat] + bytes([good_png[idat] ^ 0xFF]) + good_png[idat + 1 :]
    sof = good_jpeg.index(b"\xff\xc0")
    zero_height_jpeg = good_jpeg[: sof + 5] + struct.pack(">H", 0) + good_jpeg[sof + 7 :]
    small_gif = encode(Image.new("RGB", (8, 8), RED).convert("P"), "GIF")
    gif_bomb = small_gif[:6] + struct.pack("<HH", 65535, 65535) + small_gif[10:]  # the logical screen's size
    jpeg_bomb = good_jpeg[: sof + 5] + struct.pack(">HH", 60000, 60000) + good_jpeg[sof + 9 :]
    # A real, valid PNG of 15000 x 14000 one-bit pixels (210 MP, over the default 200 MP) in ~30 KB.
    valid_bomb = encode(Image.new("1", (15000, 14000)), "PNG", optimize=False)
    assert len(valid_bomb) < 100_000
    no_frames_gif = b"GIF89a" + struct.pack("<HHBBB", 10, 10, 0, 0, 0) + b";"  # header, screen, trailer
    heic = b"\0\0\0\x18ftypheic\0\0\0\0mif1heic" + bytes(200)
    return [
        error("bad/empty.jpg", b"", r"^empty file \(0 bytes\)$"),
        error("bad/truncated.jpg", noise[: 2 * len(noise) // 3], r"^cannot decode JPEG image \(96x64\): image file is truncated"),
        error("bad/truncated_header.jpg", good_jpeg[:120], r"^corrupt image header: .*JPEG"),
        error("bad/truncated.png", good_png[: len(good_png) // 2], r"^cannot decode PNG image \(64x48\)"),
        error("bad/bit_flipped.png", bit_flipped_png, r"^cannot decode PNG image \(64x48\): broken data stream"),
        error("bad/zero_height.jpg", zero_height_jpeg, r"^corrupt image header: .*JPEG"),
        error("bad/no_frames.gif", no_frames_gif, r"^corrupt image header: .*GIF.*no more images"),
        error("bad/text.jpg", b"just some text, saved under an image's name\n", r"^not an image: text"),
        error("bad/error_page.png", b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head></html>",
              r"^not an image: an HTML page"),
        error("bad/document.jpg", _pdf_document(), r"^not an image: a PDF document"),
        error("bad/iphone.jpg", heic, r"^unsupported image format: HEIC/HEIF"),
        error("bad/float_strip_offsets.tif", _tiff_with_float_strip_offsets(),
              r"^cannot decode TIFF image \(32x24\), a damaged file: TypeError"),
        error("bad/bomb_header.png", png_by_hand(50_000, 50_000, 8, 2, b"\0" * 64),
              r"^PNG image of 50000x50000 = 2,500,000,000 pixels is over the limit of 200,000,000"),
        error("bad/bomb_valid.png", valid_bomb, r"^PNG image of 15000x14000 = 210,000,000 pixels is over the limit"),
        error("bad/bomb.gif", gif_bomb, r"^GIF image of 65535x65535 = .* is over the limit"),
        error("bad/bomb.jpg", jpeg_bomb, r"^JPEG image of 60000x60000 = .* is over the limit"),
    ]


def _hard_keys() -> list[Case]:
    """Keys that are hard on a reader. Each holds a JPEG of its own width, so that its row proves
    which object was read; on S3 a key is a plain string, and each is read as it is written."""
    names = [
        "names/photo with spaces.jpg",
        "names/café 日本 😀.jpg",
        "names/" + "long-name-" * 88 + ".jpg",  # a 900-byte key (S3 allows 1024)
        "a/../../escape.jpg",  # not a way out of the prefix: on S3 the dots are characters of the key
        "../up-and-out.jpg",
        "names/x/../y.jpg",
        "names/y.jpg",  # what a normalising reader would read instead of the key above
        "names//double-slash.jpg",
        "names/./dot.jpg",
        "names/question?x=1.jpg",
        "names/hash#fragment.jpg",
        "names/per%20cent.jpg",
        "names/glob*[1]{a,b}.jpg",
        "names/http://127.0.0.1:9/inside-a-key.jpg",  # a URL in a key is no URL: nothing is fetched from it
        "names/tab\there.jpg",
        "names/ leading space.jpg",
        "names/$HOME~.jpg",
    ]
    return [ok(name, jpeg(20 + i, 16), 20 + i, 16) for i, name in enumerate(names)]


def build_corpus() -> list[Case]:
    """Every case; keys are unique."""
    cases = _formats_and_modes() + _extreme_shapes() + _broken_files() + _hard_keys()
    assert len({c.key for c in cases}) == len(cases)
    return cases


# Files under the input prefix that are not image names: the listing skips and counts them.
SKIPPED = {
    "skipped/document.pdf": _pdf_document,
    "skipped/notes.txt": lambda: b"notes\n",
    "skipped/iphone.heic": lambda: b"\0\0\0\x18ftypheic",
}



def decoys() -> dict[str, bytes]:
    """Beside the input prefix, where ``a/../../escape.jpg`` and ``../up-and-out.jpg`` under it
    would point if a reader normalised them: never read, never written."""
    return {"escape.jpg": jpeg(99, 77), "up-and-out.jpg": jpeg(98, 76)}


def is_local_name(key: str) -> bool:
    """Whether ``key`` can be a file's path on a local disk as it is (no ``..``, ``.`` or empty
    parts, which a file system resolves, no part over 255 bytes)."""
    parts = key.split("/")
    return all(part not in ("", ".", "..") and len(part.encode()) <= 255 for part in parts)
