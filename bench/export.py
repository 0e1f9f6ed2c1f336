"""``maskray export``'s memory: the peak at N and at 10 N instances, against loading it all.

Two synthetic outputs (the job's schema and writer, ``commit_shard``; a plan and a manifest, so
that they are finished outputs) of N and 10 N instances: images of 640x480 with 20 instances
each, masks of ellipses and polygons of varied size as COCO RLE, shards of 64 images. Each
export runs in a fresh Python process, which reports its peak resident memory (``ru_maxrss``),
its resident memory once everything is imported (the baseline), and Arrow's own peak:

- ours: ``export_output`` (coco), which streams a row group at a time;
- the peer: the usual way, every row read into Python (``open_table(...).to_table().to_pylist()``)
  and the whole COCO dict given to ``json.dump``.

Reported: the peak and the peak above the baseline of each, and the ratio of the 10 N peak to the
N peak (ours must stay within 1.2; the peer's grows with the output).

    python bench/export.py                     # N = 20000 (and 200000)
    python bench/export.py --instances 5000
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HEIGHT, WIDTH, PER_IMAGE, SHARD_IMAGES = 480, 640, 20, 64


def mask_pool(count: int = 97, seed: int = 0) -> list[tuple[str, tuple[float, float, float, float], int]]:
    """``count`` masks of varied shape and size: (RLE counts, xywh box, area)."""
    from PIL import Image, ImageDraw
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(seed)
    pool = []
    for _ in range(count):
        w, h = int(rng.integers(20, 300)), int(rng.integers(20, 300))
        x, y = int(rng.integers(0, WIDTH - w)), int(rng.integers(0, HEIGHT - h))
        shape = Image.new("L", (WIDTH, HEIGHT))
        draw = ImageDraw.Draw(shape)
        if rng.random() < 0.5:
            draw.ellipse((x, y, x + w, y + h), fill=1)
        else:
            angles = np.sort(rng.uniform(0, 2 * np.pi, 9))
            draw.polygon([(x + w / 2 * (1 + np.cos(a)), y + h / 2 * (1 + np.sin(a))) for a in angles], fill=1)
        rle = mask_utils.encode(np.asfortranarray(np.asarray(shape, np.uint8)))
        pool.append((rle["counts"].decode(), tuple(float(v) for v in mask_utils.toBbox(rle)), int(mask_utils.area(rle))))
    return pool


def make_output(url: str, instances: int) -> None:
    """A finished output of ``instances`` instances (PER_IMAGE per image)."""
    import pyarrow as pa

    from maskray.pipeline.segment.manifest import Manifest
    from maskray.pipeline.segment.output import IMAGES_SCHEMA, INSTANCES_SCHEMA, commit_shard
    from maskray.pipeline.segment.plan import Plan
    from maskray.pipeline.storage import open_url

    names = ["__background__", "person", "car", "bicycle", "dog", "bench"]
    pool = mask_pool()
    fs, output = open_url(url)
    images = -(-instances // PER_IMAGE)
    uris = [f"s3://photos/in/{i:08d}.jpg" for i in range(images)]
    Plan.create(fs, output, uris, SHARD_IMAGES)
    Manifest(input="s3://photos/in", output=output, weights={"name": "bench.pt", "sha256": "0" * 64},
             config={"class_names": names}, options={}, versions={}).write(fs, output)
    rng = np.random.default_rng(1)
    for shard, first in enumerate(range(0, images, SHARD_IMAGES)):
        ids = np.arange(first, min(first + SHARD_IMAGES, images))
        count = min(len(ids) * PER_IMAGE, instances - first * PER_IMAGE)
        picks = rng.integers(0, len(pool), count)
        boxes = np.array([pool[k][1] for k in picks], np.float32)
        image_ids = np.repeat(ids, PER_IMAGE)[:count]
        rows = {
            "image_uri": [uris[i] for i in image_ids], "image_id": image_ids,
            "instance": np.tile(np.arange(PER_IMAGE), len(ids))[:count],
            "label": (picks % (len(names) - 1) + 1).astype(np.int32),
            "label_name": [names[k % (len(names) - 1) + 1] for k in picks],
            "score": rng.uniform(0.05, 1.0, count).astype(np.float32),
            "box_x1": boxes[:, 0], "box_y1": boxes[:, 1], "box_x2": boxes[:, 0] + boxes[:, 2], "box_y2": boxes[:, 1] + boxes[:, 3],
            "area": np.array([pool[k][2] for k in picks], np.int64), "mask_height": np.full(count, HEIGHT, np.int32),
            "mask_width": np.full(count, WIDTH, np.int32), "mask_counts": [pool[k][0] for k in picks],
        }
        image_rows = {"image_uri": [uris[i] for i in ids], "image_id": ids, "width": np.full(len(ids), WIDTH, np.int32),
                      "height": np.full(len(ids), HEIGHT, np.int32), "instances": np.full(len(ids), PER_IMAGE, np.int32),
                      "status": ["ok"] * len(ids), "error": [None] * len(ids)}
        commit_shard(fs, output, shard, {"instances": pa.table(rows, schema=INSTANCES_SCHEMA),
                                         "images": pa.table(image_rows, schema=IMAGES_SCHEMA)}, {}, {"shard": shard})


def child(method: str, output: str, dest: str) -> None:
    """One export in this process; prints its memory figures as JSON."""
    import resource

    import pyarrow as pa

    from maskray.pipeline.results.export import export_output
    from maskray.pipeline.results.query import open_table

    def rss_mb() -> float:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024

    baseline = rss_mb()
    if method == "ours":
        annotations = export_output(output, dest).annotations
    else:
        rows = open_table(output, "instances").to_table().to_pylist()
        images = open_table(output, "images").to_table().to_pylist()
        data = {"images": [{"id": r["image_id"], "file_name": r["image_uri"], "width": r["width"], "height": r["height"]}
                           for r in images],
                "annotations": [{"id": k + 1, "image_id": r["image_id"], "category_id": r["label"], "iscrowd": 0,
                                 "segmentation": {"size": [r["mask_height"], r["mask_width"]], "counts": r["mask_counts"]},
                                 "bbox": [r["box_x1"], r["box_y1"], r["box_x2"] - r["box_x1"], r["box_y2"] - r["box_y1"]],
                                 "area": r["area"], "score": r["score"]} for k, r in enumerate(rows)],
                "categories": []}
        with open(dest, "w") as f:
            json.dump(data, f)
        annotations = len(rows)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_mb": peak, "baseline_mb": baseline, "arrow_peak_mb": pa.default_memory_pool().max_memory() / 2**20,
                      "annotations": annotations, "bytes": Path(dest).stat().st_size}))


def measure(method: str, output: str, dest: str) -> dict:
    # The imports a fresh process needs (maskray's and torch-free) are the baseline of both sides.
    done = subprocess.run([sys.executable, __file__, "--child", method, output, dest], check=True,
                          capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=20000, help="N (default 20000); the second output has 10 N")
    parser.add_argument("--child", nargs=3, metavar=("METHOD", "OUTPUT", "DEST"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    with tempfile.TemporaryDirectory() as folder:
        figures = {}
        for n in (args.instances, 10 * args.instances):
            output = f"{folder}/out-{n}"
            make_output(output, n)
            for method in ("ours", "peer"):
                figures[method, n] = measure(method, output, f"{folder}/{method}-{n}.json")
                Path(f"{folder}/{method}-{n}.json").unlink()
    print(f"maskray export, coco, on {platform.processor() or platform.machine()}; "
          f"{PER_IMAGE} instances per {WIDTH}x{HEIGHT} image")
    print(f"{'':6} {'instances':>10} {'JSON MB':>8} {'peak MB':>8} {'above base':>10} {'Arrow peak':>10}")
    for (method, n), f in figures.items():
        print(f"{method:6} {n:>10} {f['bytes'] / 2**20:>8.1f} {f['peak_mb']:>8.1f} {f['peak_mb'] - f['baseline_mb']:>10.1f} "
              f"{f['arrow_peak_mb']:>10.1f}")
    for method in ("ours", "peer"):
        small, large = figures[method, args.instances], figures[method, 10 * args.instances]
        print(f"{method}: peak at 10 N / peak at N = {large['peak_mb'] / small['peak_mb']:.2f}; above the baseline "
              f"{(large['peak_mb'] - large['baseline_mb']) / max(small['peak_mb'] - small['baseline_mb'], 1e-9):.2f}")


if __name__ == "__main__":
    main()
