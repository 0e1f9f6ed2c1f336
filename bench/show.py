"""``maskray show``'s drawing against the torchvision way, on a 12-megapixel photo, one run.

The input is a real output folder (the job's own schema and writer, ``commit_shard``) holding
one 4000x3000 JPEG of smooth, photo-like ground with N instances of varied size (ellipses and
polygons, 40-900 px across, COCO RLE masks). Both sides read the image through the output and
the same storage and decode path, and return a PIL image:

- ours: ``render_overlay`` (each RLE decoded over its own columns, blended in numpy over its
  box, boxes and tags drawn with Pillow);
- the peer: what ``render_overlay`` did before, the usual torchvision recipe:
  ``pycocotools.mask.decode`` of every mask at full size, then
  ``torchvision.utils.draw_segmentation_masks`` and ``draw_bounding_boxes`` on the whole image.

The runs alternate between the two so that the machine's drift hits both alike; reported are
the median seconds of each, the ratio (peer / ours: above 1, ours is faster), and ours with
``--max-size`` (a picture that fits a screen).

    python bench/show.py                       # 4000x3000, 50 instances, 3 runs each
    python bench/show.py --instances 100 --repeats 5
"""

from __future__ import annotations

import argparse
import io
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import torch
import torchvision
from PIL import Image, ImageDraw, ImageFilter
from pycocotools import mask as mask_utils

from maskray.pipeline.decode import decode_image
from maskray.pipeline.results.query import open_table
from maskray.pipeline.results.show import PALETTE, find_image_uri, render_overlay
from maskray.pipeline.segment.output import IMAGES_SCHEMA, INSTANCES, INSTANCES_SCHEMA, commit_shard
from maskray.pipeline.storage import open_object_url, open_url, public_url, read_bytes

NAMES = ["person", "car", "bicycle", "dog", "traffic light", "bench", "umbrella", "bus"]


def photo_like(height: int, width: int, seed: int = 0) -> Image.Image:
    """Smooth colour fields with some grain: compresses and decodes like a photo, not like noise."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(40, 220, (height // 250 + 2, width // 250 + 2, 3), dtype=np.uint8))
    image = coarse.resize((width, height), Image.Resampling.BICUBIC)
    grain = rng.normal(0, 6, (height, width, 1)).astype(np.float32)
    pixels = np.clip(np.asarray(image, np.float32) + grain, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels).filter(ImageFilter.GaussianBlur(1))


def random_instances(height: int, width: int, count: int, seed: int = 0) -> list[dict]:
    """``count`` instances of varied size with their masks as COCO RLE, as the job writes them."""
    rng = np.random.default_rng(seed)
    instances = []
    for i in range(count):
        size = int(np.exp(rng.uniform(np.log(40), np.log(900))))
        w, h = size, int(size * rng.uniform(0.5, 1.5))
        x, y = int(rng.integers(0, width - w)), int(rng.integers(0, max(1, height - h)))
        h = min(h, height - y)
        shape = Image.new("L", (w, h))
        draw = ImageDraw.Draw(shape)
        if rng.random() < 0.5:
            draw.ellipse((0, 0, w - 1, h - 1), fill=1)
        else:
            angles = np.sort(rng.uniform(0, 2 * np.pi, 7))
            draw.polygon([(w / 2 * (1 + np.cos(a)), h / 2 * (1 + np.sin(a))) for a in angles], fill=1)
        full = np.zeros((height, width), np.uint8)
        full[y:y + h, x:x + w] = np.asarray(shape)
        rle = mask_utils.encode(np.asfortranarray(full))
        bx, by, bw, bh = mask_utils.toBbox(rle)
        label = int(rng.integers(1, len(NAMES) + 1))
        instances.append({"instance": i, "label": label, "label_name": NAMES[label - 1],
                          "score": float(rng.uniform(0.5, 0.99)), "box_x1": float(bx), "box_y1": float(by),
                          "box_x2": float(bx + bw), "box_y2": float(by + bh), "area": int(mask_utils.area(rle)),
                          "mask_height": height, "mask_width": width, "mask_counts": rle["counts"].decode()})
    return instances


def write_output(folder: Path, height: int, width: int, count: int) -> str:
    """An output folder with one segmented photo; returns the photo's name."""
    photo_path = folder / "photo.jpg"
    photo_like(height, width).save(photo_path, "JPEG", quality=90)
    uri = f"file://{photo_path}"
    rows = [{"image_uri": uri, "image_id": 0, **r} for r in random_instances(height, width, count)]
    instances = pa.Table.from_pylist(rows, schema=INSTANCES_SCHEMA)
    images = pa.table({"image_uri": [uri], "image_id": [0], "width": [width], "height": [height], "instances": [count],
                       "status": ["ok"], "error": [None]}, schema=IMAGES_SCHEMA)
    fs, output = open_url(str(folder / "out"))
    commit_shard(fs, output, 0, {"instances": instances, "images": images}, {}, {"shard": 0})
    return "photo.jpg"


def torchvision_overlay(output_url: str, image: str, min_score: float = 0.5) -> Image.Image:
    """The peer: full-image masks and torchvision's drawing utilities (render_overlay before)."""
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

    uri = find_image_uri(output_url, image)["image_uri"]
    fs, path = open_object_url(uri)
    picture = decode_image(read_bytes(fs, path, public_url(uri))).contiguous()
    rows = open_table(output_url, INSTANCES).to_table(
        filter=(ds.field("image_uri") == uri) & (ds.field("score") >= min_score)).sort_by("instance").to_pylist()
    colours = [PALETTE[r["label"] % len(PALETTE)] for r in rows]
    rles = [{"size": [r["mask_height"], r["mask_width"]], "counts": r["mask_counts"].encode()} for r in rows]
    masks = torch.from_numpy(mask_utils.decode(rles)).permute(2, 0, 1).bool()
    picture = draw_segmentation_masks(picture, masks, alpha=0.5, colors=colours)
    boxes = torch.tensor([[r["box_x1"], r["box_y1"], r["box_x2"], r["box_y2"]] for r in rows])
    labels = [f"{r['label_name']} {r['score']:.2f}" for r in rows]
    picture = draw_bounding_boxes(picture, boxes, labels=labels, colors=colours, width=2)
    return Image.fromarray(picture.permute(1, 2, 0).numpy())


def timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--height", type=int, default=3000)
    parser.add_argument("--width", type=int, default=4000)
    parser.add_argument("--instances", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-size", type=int, default=1920, help="ours, also fitted to this longest side")
    parser.add_argument("--save", type=Path, help="write both pictures here (ours.png, torchvision.png)")
    args = parser.parse_args()

    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as folder:
        name = write_output(Path(folder), args.height, args.width, args.instances)
        output = str(Path(folder) / "out")
        ours = lambda: render_overlay(output, name, scale=1)
        fitted = lambda: render_overlay(output, name, max_size=args.max_size)
        peer = lambda: torchvision_overlay(output, name)
        picture, drawn = ours()  # warm-up: imports, the font, Parquet metadata
        peer_picture = peer()
        times: dict[str, list[float]] = {"ours": [], "fitted": [], "peer": []}
        for _ in range(args.repeats):
            times["ours"].append(timed(ours))
            times["peer"].append(timed(peer))
            times["fitted"].append(timed(fitted))
        if args.save:
            args.save.mkdir(parents=True, exist_ok=True)
            picture.save(args.save / "ours.png")
            peer_picture.save(args.save / "torchvision.png")
            buffer = io.BytesIO()
            fitted()[0].save(buffer, "PNG")
            (args.save / "fitted.png").write_bytes(buffer.getvalue())
    ours_s, peer_s, fitted_s = (statistics.median(times[k]) for k in ("ours", "peer", "fitted"))
    print(f"{args.width}x{args.height} JPEG, {drawn} instances drawn, median of {args.repeats} alternating runs")
    print(f"{'case':<44} {'seconds':>8}")
    print(f"{'torchvision draw_* on full-image masks':<44} {peer_s:>8.2f}")
    print(f"{'render_overlay, full size':<44} {ours_s:>8.2f}")
    print(f"{f'render_overlay, --max-size {args.max_size}':<44} {fitted_s:>8.2f}")
    print(f"ratio (torchvision / ours, full size): {peer_s / ours_s:.1f}x")


if __name__ == "__main__":
    sys.exit(main())
