"""Synthetic instance-segmentation data: overlapping shapes on textured backgrounds, in COCO form.

Each image holds a few shapes (circles, squares, triangles, stars, hexagons) of random size,
rotation and colour, painted one over the other on a textured background (gradients, stripes,
checks, blotches, plus pixel noise). Every shape is rasterised once as a binary mask with no
anti-aliasing, and its colour is painted exactly over that mask, so the visible mask of each
instance (its own mask minus those painted later) is the exact ground truth, written as COCO
compressed RLE in an instances JSON that any COCO reader takes.

Deterministic: image ``i`` of seed ``s`` is drawn from ``numpy.random.default_rng([s, i])``
alone, so a set of N images is the first N of any larger set with the same seed, and a
held-out set is simply another seed.
"""

from __future__ import annotations

import colorsys
import io
import json
import math
from dataclasses import dataclass

import numpy as np
import pycocotools.mask as mask_util
from PIL import Image, ImageDraw

CATEGORIES = ("circle", "square", "triangle", "star", "hexagon")

# A shape painted later may hide at most this share of an earlier one; instances that would be
# hidden more are re-drawn elsewhere, so that every instance stays recognisable.
MAX_HIDDEN_FRACTION = 0.5
# Smallest visible instance, in pixels.
MIN_VISIBLE_PIXELS = 40
# Shapes per image, inclusive.
SHAPES_PER_IMAGE = (2, 6)
# Shape radius as a fraction of the image's short side.
RADIUS_RANGE = (0.09, 0.26)
# Least RGB distance between a shape's colour and the background under it.
MIN_CONTRAST = 90.0
NOISE_SIGMA = 6.0


@dataclass(frozen=True)
class ShapeInstance:
    category: str
    mask: np.ndarray  # bool [H, W], the visible part


def parse_size(text: str) -> tuple[int, int]:
    """``'WxH'`` -> (width, height); a ValueError that says what is expected otherwise."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"size must be WIDTHxHEIGHT in pixels, like 160x128, got {text!r}") from None
    if not (32 <= width <= 4096 and 32 <= height <= 4096):
        raise ValueError(f"size {text!r}: width and height must be within 32..4096 pixels")
    return width, height


# ----------------------------------------------------------------------------------------------
# Drawing


def _polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if kind == "square":
        corners, radii = 4, [r]
    elif kind == "triangle":
        corners, radii = 3, [r]
    elif kind == "hexagon":
        corners, radii = 6, [r]
    elif kind == "star":
        corners, radii = 10, [r, 0.45 * r]  # five points, alternating outer and inner radius
    else:
        raise ValueError(kind)
    return [
        (cx + radii[i % len(radii)] * math.cos(angle + 2 * math.pi * i / corners),
         cy + radii[i % len(radii)] * math.sin(angle + 2 * math.pi * i / corners))
        for i in range(corners)
    ]


def _shape_mask(kind: str, width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    short = min(width, height)
    r = rng.uniform(*RADIUS_RANGE) * short
    # The centre may sit near the edge, so that some shapes are cut by the image border.
    cx, cy = rng.uniform(0.25 * r, width - 0.25 * r), rng.uniform(0.25 * r, height - 0.25 * r)
    canvas = Image.new("1", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)
    else:
        draw.polygon(_polygon(kind, cx, cy, r, rng.uniform(0, 2 * math.pi)), fill=1)
    return np.array(canvas, dtype=bool)


def _background(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """A float [H, W, 3] texture in 0..255: muted colours, one of four patterns."""

    def muted() -> np.ndarray:
        h, s, v = rng.uniform(0, 1), rng.uniform(0.0, 0.45), rng.uniform(0.25, 0.85)
        return np.array(colorsys.hsv_to_rgb(h, s, v)) * 255

    a, b = muted(), muted()
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    kind = rng.integers(4)
    if kind == 0:  # linear gradient in a random direction
        theta = rng.uniform(0, 2 * math.pi)
        t = x * math.cos(theta) + y * math.sin(theta)
        t = (t - t.min()) / max(t.max() - t.min(), 1e-9)
    elif kind == 1:  # soft stripes
        theta, period = rng.uniform(0, math.pi), rng.uniform(6, 24)
        t = 0.5 + 0.5 * np.sin(2 * math.pi * (x * math.cos(theta) + y * math.sin(theta)) / period)
    elif kind == 2:  # checks
        cell = int(rng.integers(6, 20))
        t = ((x // cell + y // cell) % 2) * rng.uniform(0.3, 1.0)
    else:  # blotches: coarse noise, smoothly upsampled
        coarse = rng.uniform(0, 1, (max(2, height // 16), max(2, width // 16))).astype(np.float32)
        t = np.asarray(Image.fromarray(coarse, mode="F").resize((width, height), Image.BICUBIC), dtype=np.float64)
        t = np.clip(t, 0, 1)
    return a + (b - a) * t[..., None]


def _shape_colour(under: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A saturated colour far enough from the mean colour ``under`` the shape."""
    colour = None
    for _ in range(50):
        h, s, v = rng.uniform(0, 1), rng.uniform(0.55, 1.0), rng.uniform(0.45, 1.0)
        colour = np.array(colorsys.hsv_to_rgb(h, s, v)) * 255
        if np.linalg.norm(colour - under) >= MIN_CONTRAST:
            break
    return colour


def draw_image(width: int, height: int, rng: np.random.Generator) -> tuple[np.ndarray, list[ShapeInstance]]:
    """One image (uint8 [H, W, 3]) and its instances' visible masks."""
    pixels = _background(width, height, rng)
    kinds: list[str] = []
    masks: list[np.ndarray] = []  # visible masks of the shapes placed so far
    wanted = int(rng.integers(SHAPES_PER_IMAGE[0], SHAPES_PER_IMAGE[1] + 1))
    for _ in range(wanted):
        kind = CATEGORIES[int(rng.integers(len(CATEGORIES)))]
        for _attempt in range(20):
            mask = _shape_mask(kind, width, height, rng)
            if mask.sum() < MIN_VISIBLE_PIXELS:
                continue
            # Every earlier instance must keep enough of itself visible.
            if all((m & ~mask).sum() >= max(MIN_VISIBLE_PIXELS, (1 - MAX_HIDDEN_FRACTION) * m.sum()) for m in masks):
                break
        else:
            continue  # no room for this shape: the image gets fewer
        colour = _shape_colour(pixels[mask].mean(axis=0), rng)
        pixels[mask] = colour
        masks = [m & ~mask for m in masks] + [mask]
        kinds.append(kind)
    noisy = pixels + rng.normal(0, NOISE_SIGMA, pixels.shape)
    image = np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
    return image, [ShapeInstance(k, m) for k, m in zip(kinds, masks)]


# ----------------------------------------------------------------------------------------------
# The data set


def coco_categories() -> list[dict]:
    return [{"id": i, "name": name, "supercategory": "shape"} for i, name in enumerate(CATEGORIES, start=1)]


def make_image(seed: int, index: int, width: int, height: int) -> tuple[bytes, list[dict]]:
    """PNG bytes of image ``index`` of ``seed`` and its annotations (without ids)."""
    image, instances = draw_image(width, height, np.random.default_rng([seed, index]))
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    annotations = []
    for instance in instances:
        rle = mask_util.encode(np.asfortranarray(instance.mask.astype(np.uint8)))
        annotations.append({
            "category_id": CATEGORIES.index(instance.category) + 1,
            "segmentation": {"size": [height, width], "counts": rle["counts"].decode("ascii")},
            "area": int(mask_util.area(rle)),
            "bbox": [float(v) for v in mask_util.toBbox(rle)],
            "iscrowd": 0,
        })
    return buffer.getvalue(), annotations


def write_shapes(out_url: str, count: int, seed: int, size: tuple[int, int] = (160, 128),
                 storage_options: dict | None = None, progress: bool = False) -> dict:
    """Writes ``OUT/images/NNNNNN.png`` and ``OUT/annotations.json``; returns a summary."""
    from maskray.pipeline.storage import join, open_url, write_bytes_atomically

    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    width, height = size
    fs, root = open_url(out_url, storage_options)
    fs.makedirs(join(root, "images"), exist_ok=True)
    images, annotations = [], []
    indices = range(count)
    if progress:
        from tqdm import tqdm

        indices = tqdm(indices, desc="make-shapes", unit="img")
    for index in indices:
        png, image_annotations = make_image(seed, index, width, height)
        file_name = f"{index:06d}.png"
        # Whole or not at all, retried through throttling: a killed or failed run leaves no torn image.
        write_bytes_atomically(fs, join(root, "images", file_name), png)
        image_id = index + 1
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        for annotation in image_annotations:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, **annotation})
    data = {
        "info": {"description": f"maskray synthetic shapes, seed {seed}, {count} images of {width}x{height}"},
        "images": images,
        "annotations": annotations,
        "categories": coco_categories(),
    }
    # The JSON last: a set whose JSON exists is complete.
    write_bytes_atomically(fs, join(root, "annotations.json"), json.dumps(data).encode())
    return {"images": count, "instances": len(annotations), "json": join(root, "annotations.json"),
            "image_dir": join(root, "images")}
