"""Results as pictures: an image with its instances drawn the way Detectron2's Visualizer draws
them, fast enough for a 12-megapixel photo with a hundred instances.

``render_overlay`` reads the image through the same storage and decode path as the job (so
EXIF rotation matches the masks), sizes the picture (``picture_size``: a scale, then fitted
to a longest side), and draws each instance with score >= ``min_score``:

- its mask filled with a translucent label colour and outlined in a darker shade of it;
- its box, in the label colour, just outside the mask, its line width scaled to the picture;
- a tag "label 0.93" on a filled label-coloured background, text sized to the picture
  (proportional to sqrt(height x width)), placed greedily: above the box, else below it, else
  inside its top-left corner, never outside the frame and not over a tag already placed.

The work is kept to each instance's own region: a mask's compressed RLE is decoded only over the
columns it spans (``decode_rle_window``), scaled with nearest-pixel indexing, and blended over
its box in numpy; the photo is resized once with Pillow (nearest when enlarging, so that pixels
and masks stay aligned; Lanczos when shrinking), and boxes and text are drawn with ImageDraw.
A label keeps its colour across images (``label_colour``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as ds

from maskray.pipeline.decode import decode_image
from maskray.pipeline.results.query import open_table
from maskray.pipeline.segment.output import IMAGES, INSTANCES
from maskray.pipeline.storage import MISSING, open_object_url, public_url, read_bytes

# Distinct, readable colours (Sasha Trubetskoy's list); a label keeps its colour across images.
PALETTE = ["#e6194b", "#3cb44b", "#ffe119", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6",
           "#bcf60c", "#fabebe", "#008080", "#e6beff", "#9a6324", "#800000", "#aaffc3", "#808000"]
DEFAULT_MIN_SCORE = 0.5
DEFAULT_ALPHA = 0.5
# The default enlargement brings a small image's shorter side to about this many pixels, so
# that its labels are legible, but never its longer side past AUTO_SCALE_LONGEST.
AUTO_SCALE_TARGET = 512
AUTO_SCALE_LONGEST = 2048


def find_image_uri(output_url: str, image: str, storage_options: Mapping[str, Any] | None = None) -> dict:
    """The ``images`` row of ``image``: its exact URI, or a path or name that ends exactly one URI."""
    images = open_table(output_url, IMAGES, storage_options)
    rows = images.to_table(filter=ds.field("image_uri") == image).to_pylist()
    if not rows:
        suffix = image if image.startswith("/") else "/" + image
        rows = images.to_table(filter=pc.ends_with(ds.field("image_uri"), suffix)).to_pylist()
    if not rows:
        raise LookupError(f"no image {image!r} in the output {output_url}")
    if len(rows) > 1:
        names = ", ".join(r["image_uri"] for r in rows[:5])
        raise LookupError(f"{image!r} matches {len(rows)} images ({names}, ...): give the full image_uri")
    return rows[0]


def render_overlay(
    output_url: str,
    image: str,
    storage_options: Mapping[str, Any] | None = None,
    min_score: float = DEFAULT_MIN_SCORE,
    alpha: float = DEFAULT_ALPHA,
    scale: float | None = None,
    max_size: int | None = None,
):
    """The image ``image`` (a URI in the output, or a unique suffix of one) with its instances
    of score >= ``min_score`` drawn, as a PIL image (``draw_image``); and the number of instances drawn.

    The picture is the image times ``scale`` (default ``auto_scale``: small images enlarged so
    that labels stay legible, others kept), then shrunk, if need be, so that its longest side
    is at most ``max_size`` pixels (``picture_size``)."""
    row = find_image_uri(output_url, image, storage_options)
    if row["status"] != "ok":
        raise ValueError(f"{row['image_uri']} could not be segmented: {row['error']}")
    instances = open_table(output_url, INSTANCES, storage_options).to_table(
        filter=(ds.field("image_uri") == row["image_uri"]) & (ds.field("score") >= min_score)
    ).to_pylist()
    return draw_image(row["image_uri"], instances, storage_options, alpha, scale, max_size), len(instances)


def draw_image(uri: str, instances: list[dict], storage_options: Mapping[str, Any] | None = None,
               alpha: float = DEFAULT_ALPHA, scale: float | None = None, max_size: int | None = None):
    """The image at ``uri`` (read and decoded as the job did) with ``instances`` (its rows of the
    instances table) drawn, sized by ``picture_size``, as a PIL image: what ``maskray show``
    and ``maskray browse`` draw."""
    from PIL import Image

    fs, path = open_object_url(uri, storage_options if not uri.startswith("file://") else None)
    try:
        data = read_bytes(fs, path, public_url(uri))  # retried, like the job's own read of it
    except MISSING:
        raise FileNotFoundError(f"{public_url(uri)}: no such file (moved or deleted since it was segmented)") from None
    pixels = decode_image(data).permute(1, 2, 0).numpy()  # H x W x 3: the tensor is channels-last
    original = (pixels.shape[1], pixels.shape[0])  # the masks' size: the image as the job decoded it
    size = picture_size(pixels.shape[0], pixels.shape[1], scale, max_size)
    if size == original:
        canvas = pixels.copy()
    else:
        enlarging = size[0] >= original[0]
        # Nearest when enlarging keeps each pixel where its mask says it is; Lanczos when
        # shrinking keeps the photo smooth (reducing_gap: a fast box reduction first).
        canvas = np.asarray(Image.fromarray(pixels).resize(
            size, Image.Resampling.NEAREST if enlarging else Image.Resampling.LANCZOS,
            reducing_gap=None if enlarging else 3.0)).copy()
    instances = sorted(instances, key=lambda r: r["instance"])
    factor = (size[0] / original[0], size[1] / original[1])
    return draw_instances(canvas, instances, factor, alpha)


def draw_instances(canvas: np.ndarray, instances: list[dict], factor: tuple[float, float],
                   alpha: float = DEFAULT_ALPHA):
    """A PIL image of ``canvas`` (H x W x 3 uint8, the photo at the picture's size; masks are
    blended into it in place) with ``instances`` (rows of the instances table, in the
    coordinates of the original image) drawn; ``factor`` is the picture's size over the
    original's, (x, y)."""
    from PIL import Image, ImageDraw

    style = Style.for_picture(canvas.shape[0], canvas.shape[1])
    # Large masks first, so that small ones drawn later stay visible on top of them.
    for r in sorted(instances, key=lambda r: -(r["area"] or 0)):
        if r["mask_counts"]:  # a Faster R-CNN output has boxes only
            blend_mask(canvas, r, factor, label_colour(r["label"]), alpha, style.outline_width)
    picture = Image.fromarray(canvas)
    draw = ImageDraw.Draw(picture)
    boxes = [outer_box(r, factor, style.line_width) for r in instances]
    for r, box in zip(instances, boxes):
        draw.rectangle(box, outline=label_colour(r["label"]), width=style.line_width)
    placed: list[tuple[int, int, int, int]] = []
    # The best-scoring instances choose their tag's place first.
    for i in sorted(range(len(instances)), key=lambda i: -instances[i]["score"]):
        r = instances[i]
        text = f"{r['label_name'] or r['label']} {r['score']:.2f}"
        tag = place_tag(boxes[i], style.tag_size(text), picture.size, placed)
        placed.append(tag)
        colour = label_colour(r["label"])
        draw.rectangle((tag[0], tag[1], tag[2] - 1, tag[3] - 1), fill=colour)
        draw.text((tag[0] + style.padding[0], tag[1] + style.padding[1]), text, font=style.font,
                  fill=text_colour_on(colour), anchor="lt")
    return picture


# Sizes ------------------------------------------------------------------------------------------


def auto_scale(height: int, width: int, target: int = AUTO_SCALE_TARGET, longest: int = AUTO_SCALE_LONGEST) -> int:
    """The default enlargement: the whole number that brings the shorter side to about
    ``target`` pixels, without the longer side passing ``longest``; 1 for images that are large
    enough. Whole, so that each pixel becomes an equal square (a fractional nearest enlargement
    would make some pixels wider than others)."""
    wanted = round(target / max(1, min(height, width)))
    return max(1, min(wanted, longest // max(1, max(height, width))))


def picture_size(height: int, width: int, scale: float | None = None, max_size: int | None = None) -> tuple[int, int]:
    """(width, height) of the picture of a ``height`` x ``width`` image: times ``scale`` (None:
    ``auto_scale``), then shrunk to fit ``max_size`` on the longest side if it is larger."""
    if scale is None:
        scale = auto_scale(height, width)
    if scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    if max_size is not None:
        if max_size < 1:
            raise ValueError(f"max_size must be at least 1, got {max_size}")
        scale = min(scale, max_size / max(height, width))
    return max(1, round(width * scale)), max(1, round(height * scale))


class Style:
    """Font, line widths and padding for a picture of a given size: all proportional to
    sqrt(height x width), as Detectron2 sizes its default font, with floors for small pictures."""

    def __init__(self, font_size: int, line_width: int, outline_width: int):
        from PIL import ImageFont

        self.font_size, self.line_width, self.outline_width = font_size, line_width, outline_width
        self.font = ImageFont.load_default(size=font_size)  # Pillow's own TrueType font: no system fonts needed
        self.padding = (max(2, round(font_size * 0.3)), max(1, round(font_size * 0.2)))

    @classmethod
    def for_picture(cls, height: int, width: int) -> Style:
        diagonal = math.sqrt(height * width)
        return cls(font_size=max(13, round(diagonal / 60)), line_width=max(2, round(diagonal / 600)),
                   outline_width=max(1, round(diagonal / 1000)))

    def tag_size(self, text: str) -> tuple[int, int]:
        _, _, right, bottom = self.font.getbbox(text, anchor="lt")
        # The height of the font's tallest letters rather than this text's, so tags line up.
        _, _, _, tallest = self.font.getbbox("Hg", anchor="lt")
        return right + 2 * self.padding[0], max(bottom, tallest) + 2 * self.padding[1]


# Masks ------------------------------------------------------------------------------------------


def decode_rle_counts(counts: str) -> np.ndarray:
    """The run lengths of a COCO compressed RLE string (zeros first, column-major), as int64.

    The format (pycocotools' rleToString): each count in 5-bit groups, least significant
    first, as characters from '0' (48); 0x20 marks "more groups follow", 0x10 on the last group
    is the sign; from the fourth count on, each is stored as its difference from the count two
    before it. Vectorised with numpy: a Python loop over the characters of a hundred large
    masks would cost more than drawing them."""
    codes = np.frombuffer(counts.encode(), np.uint8).astype(np.int64) - 48
    if codes.size == 0:
        return np.zeros(0, np.int64)
    last = (codes & 0x20) == 0  # the last group of each count
    number = np.cumsum(np.concatenate(([0], last[:-1])))  # which count each character belongs to
    starts = np.flatnonzero(np.concatenate(([True], last[:-1])))
    position = np.arange(codes.size) - starts[number]
    values = np.add.reduceat((codes & 0x1F) << (5 * position), starts)
    negative = (codes[last] & 0x10) != 0
    values[negative] -= np.left_shift(1, 5 * (position[last][negative] + 1))
    runs = values.copy()
    # Counts 3, 5, 7, ... and 4, 6, 8, ... are each a running sum from count 1 and count 2 on.
    runs[1::2] = np.cumsum(values[1::2])
    runs[2::2] = np.cumsum(values[2::2])
    return runs


def decode_rle_window(height: int, width: int, counts: str) -> tuple[int, int, np.ndarray] | None:
    """The mask of a COCO compressed RLE over its own bounding box only: (top, left, mask)
    with mask a bool array of the rows and columns it spans; None for an empty mask. Never
    builds the full-image mask (12 MB per instance on a 12-megapixel photo)."""
    runs = decode_rle_counts(counts)
    ends = np.cumsum(runs)
    starts = ends - runs
    on = np.arange(runs.size) % 2 == 1
    on &= runs > 0
    starts, ends = starts[on], np.minimum(ends[on], height * width)
    if starts.size == 0:
        return None
    left, right = int(starts[0] // height), int((ends[-1] - 1) // height) + 1
    offset = left * height
    # Mark each run's start and end in the window, then a running sum is 1 inside the runs.
    edges = np.zeros((right - left) * height + 1, np.int8)
    np.add.at(edges, starts - offset, 1)
    np.add.at(edges, ends - offset, -1)
    columns = np.cumsum(edges[:-1], dtype=np.int8).astype(bool).reshape(right - left, height).T
    rows = np.flatnonzero(columns.any(axis=1))
    top, bottom = int(rows[0]), int(rows[-1]) + 1
    return top, left, columns[top:bottom]


def _scaled_range(start: int, stop: int, factor: float, limit: int) -> tuple[int, np.ndarray]:
    """The first picture pixel that nearest-pixel scaling by ``factor`` maps into source pixels
    [start, stop), and the source pixel of each from there on (picture pixel j shows source
    pixel floor((j + 0.5) / factor), as Pillow's nearest resize does)."""
    first = max(0, math.ceil(start * factor - 0.5))
    last = min(limit, math.ceil(stop * factor - 0.5))
    source = np.floor((np.arange(first, last) + 0.5) / factor).astype(np.int64)
    return first, np.clip(source, start, stop - 1)


def blend_mask(canvas: np.ndarray, row: dict, factor: tuple[float, float], colour: str, alpha: float,
               outline_width: int) -> None:
    """Tint ``row``'s mask on ``canvas`` (H x W x 3 uint8, the scaled picture) with ``colour`` at
    ``alpha`` and outline it ``outline_width`` pixels wide in a darker shade, within its box only."""
    window = decode_rle_window(row["mask_height"], row["mask_width"], row["mask_counts"])
    if window is None:
        return
    top, left, mask = window
    y0, rows = _scaled_range(top, top + mask.shape[0], factor[1], canvas.shape[0])
    x0, columns = _scaled_range(left, left + mask.shape[1], factor[0], canvas.shape[1])
    if rows.size == 0 or columns.size == 0:
        return
    mask = mask[np.ix_(rows - top, columns - left)]
    region = canvas[y0:y0 + mask.shape[0], x0:x0 + mask.shape[1]]
    # The whole box blended, then copied where the mask is: cheaper than indexing by the mask.
    tinted = region * np.float32(1 - alpha) + np.array(_rgb(colour), np.float32) * np.float32(alpha) + np.float32(0.5)
    np.copyto(region, tinted.astype(np.uint8), where=mask[..., None])
    np.copyto(region, np.array(_darker(_rgb(colour)), np.uint8), where=(mask & ~_eroded(mask, outline_width))[..., None])


def _eroded(mask: np.ndarray, times: int) -> np.ndarray:
    """``mask`` less ``times`` pixels at its border (4-neighbour erosion; outside counts as off)."""
    inner = mask.copy()
    for _ in range(times):
        shrunk = inner.copy()
        shrunk[1:] &= inner[:-1]
        shrunk[:-1] &= inner[1:]
        shrunk[:, 1:] &= inner[:, :-1]
        shrunk[:, :-1] &= inner[:, 1:]
        shrunk[0] = shrunk[-1] = False
        shrunk[:, 0] = shrunk[:, -1] = False
        inner = shrunk
    return inner


# Boxes and tags ---------------------------------------------------------------------------------


def outer_box(row: dict, factor: tuple[float, float], line_width: int) -> tuple[int, int, int, int]:
    """The rectangle (x0, y0, x1, y1, inclusive) whose ``line_width`` line lies just outside
    ``row``'s box in the picture, so that the line never hides the mask's own outline."""
    x0, y0 = math.floor(row["box_x1"] * factor[0]), math.floor(row["box_y1"] * factor[1])
    x1, y1 = math.ceil(row["box_x2"] * factor[0]) - 1, math.ceil(row["box_y2"] * factor[1]) - 1
    return x0 - line_width, y0 - line_width, max(x0, x1) + line_width, max(y0, y1) + line_width


def place_tag(box: tuple[int, int, int, int], size: tuple[int, int], frame: tuple[int, int],
              placed: list[tuple[int, int, int, int]]) -> tuple[int, int, int, int]:
    """Where a tag of ``size`` (w, h) goes for ``box`` (inclusive corners) in a picture of
    ``frame`` (w, h), as (x0, y0, x1, y1) with x1, y1 exclusive: the first of above the box,
    below it, inside its top-left corner that is inside the frame and overlaps no ``placed``
    tag; failing those, the first place down from there that overlaps none; failing that,
    above (or below) the box regardless. Always inside the frame (when the tag fits in it)."""
    width, height = size
    frame_width, frame_height = frame
    x = min(max(0, box[0]), max(0, frame_width - width))  # kept inside the frame sideways
    candidates = [y for y in (box[1] - height, box[3] + 1) if 0 <= y <= frame_height - height]
    candidates.append(min(max(0, box[1]), max(0, frame_height - height)))  # inside the box

    def at(y: int) -> tuple[int, int, int, int]:
        return x, y, x + width, y + height

    for y in candidates:
        if not any(_overlap(at(y), other) for other in placed):
            return at(y)
    for y in range(candidates[0], frame_height - height + 1):
        if not any(_overlap(at(y), other) for other in placed):
            return at(y)
    return at(candidates[0])


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


# Colours ----------------------------------------------------------------------------------------


def label_colour(label: int) -> str:
    """The colour of ``label``, the same on every picture."""
    return PALETTE[int(label) % len(PALETTE)]


def _rgb(colour: str) -> tuple[int, int, int]:
    return int(colour[1:3], 16), int(colour[3:5], 16), int(colour[5:7], 16)


def _darker(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    return tuple(int(c * 0.55) for c in rgb)


def text_colour_on(colour: str) -> str:
    """Black or white, whichever reads better on ``colour`` (by its luma)."""
    r, g, b = _rgb(colour)
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 150 else "white"
