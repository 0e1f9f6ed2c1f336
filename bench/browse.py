"""``maskray browse``: the time to serve a gallery page of 50 thumbnails, cold and cached, over
outputs of 1,000 and 100,000 images. A benchmark, not a timed test.

Each output is a real output folder (the job's own schema and writer, ``commit_shard``, in
shards of 64 images as ``maskray segment`` writes by default, with its manifest): 64 synthetic
shapes images (``maskray make-shapes``, 160x128 PNG) hard-linked under as many names as the
output has images, each with its shapes as instances (COCO RLE masks, random scores). The
server is the command's own (``make_app`` of a ``Browser`` under uvicorn, on 127.0.0.1), and the
client fetches as a browser does: the page's HTML, then its 50 thumbnails over 6 connections
at once. Reported, for each size:

- ``start``: the browser's start, its index of the output built (once, before serving);
- ``page``: the gallery HTML alone (the DuckDB queries), first page and one near the end;
- ``cold``: the HTML and its 50 thumbnails, none drawn yet (each image read, decoded, drawn
  with its masks and encoded as PNG); ``cached``: the same page again (the pictures from
  memory); ``deep cold``: the same for a page near the end (keyset paging: the same cost);
  ``label cold``: a page filtered by a label, its thumbnails not drawn yet.

    python bench/browse.py                     # 1,000 and 100,000 images
    python bench/browse.py --images 1000 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import socket
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa

from maskray.pipeline.results.browse import Browser, make_app
from maskray.pipeline.segment.manifest import Manifest
from maskray.pipeline.segment.output import IMAGES_SCHEMA, INSTANCES_SCHEMA, commit_shard
from maskray.pipeline.storage import open_url
from maskray.pipeline.train.shapes import coco_categories, write_shapes

SHARD = 64
SOURCES = 64
CONNECTIONS = 6  # what a browser opens to one host


def make_output(root: Path, images: int, seed: int = 0) -> str:
    """An output of ``images`` images in ``root`` (made once, reused by later runs)."""
    output = root / f"out-{images}"
    if (output / "_manifest.json").exists():
        return str(output)
    shapes = root / "shapes"
    if not (shapes / "annotations.json").exists():
        write_shapes(str(shapes), SOURCES, seed=seed)
    coco = json.loads((shapes / "annotations.json").read_text())
    names = {c["id"]: c["name"] for c in coco_categories()}
    by_image: dict[int, list[dict]] = {}
    for a in coco["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    sources = sorted(coco["images"], key=lambda i: i["id"])
    folder = root / f"images-{images}"
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    fs, out = open_url(str(output))
    for shard in range((images + SHARD - 1) // SHARD):
        rows, image_rows = [], []
        for image_id in range(shard * SHARD, min(images, (shard + 1) * SHARD)):
            source = sources[image_id % len(sources)]
            path = folder / f"{image_id:07d}.png"
            if not path.exists():
                os.link(shapes / "images" / source["file_name"], path)
            uri = f"file://{path}"
            found = sorted(by_image.get(source["id"], []), key=lambda a: -a["area"])
            scores = np.sort(rng.uniform(0.3, 1.0, len(found)))[::-1]
            for i, (a, score) in enumerate(zip(found, scores)):
                x, y, w, h = a["bbox"]
                rows.append({"image_uri": uri, "image_id": image_id, "instance": i, "label": a["category_id"],
                             "label_name": names[a["category_id"]], "score": float(score), "box_x1": x, "box_y1": y,
                             "box_x2": x + w, "box_y2": y + h, "area": int(a["area"]),
                             "mask_height": source["height"], "mask_width": source["width"],
                             "mask_counts": a["segmentation"]["counts"]})
            image_rows.append({"image_uri": uri, "image_id": image_id, "width": source["width"],
                               "height": source["height"], "instances": len(found), "status": "ok", "error": None})
        commit_shard(fs, out, shard, {"instances": pa.Table.from_pylist(rows, schema=INSTANCES_SCHEMA),
                                      "images": pa.Table.from_pylist(image_rows, schema=IMAGES_SCHEMA)},
                     {}, {"shard": shard})
    Manifest(input=str(folder), output=out, weights={"name": "bench", "sha256": "-"}, config={}, options={},
             versions={}, status="complete").write(fs, out)
    return str(output)


class Server:
    """uvicorn serving ``make_app(browser)`` on 127.0.0.1, in a thread."""

    def __init__(self, browser: Browser):
        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.base = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(make_app(browser), log_level="warning", access_log=False, lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join()
        self.sock.close()


def fetch_page(base: str, query: str, clients) -> tuple[float, float, int]:
    """Seconds for the HTML alone, seconds for the HTML and all its thumbnails, and how many."""
    started = time.perf_counter()
    html = clients[0].get(base + "/" + query)
    html.raise_for_status()
    page = time.perf_counter() - started
    thumbs = [t.replace("&amp;", "&") for t in re.findall(r'<img loading="lazy" src="([^"]+)"', html.text)]

    def get(i: int) -> None:
        answer = clients[i % len(clients)].get(base + thumbs[i])
        answer.raise_for_status()

    with ThreadPoolExecutor(len(clients)) as pool:
        list(pool.map(get, range(len(thumbs))))
    return page, time.perf_counter() - started, len(thumbs)


def bench(output: str, images: int, repeats: int) -> dict:
    import httpx

    results: dict[str, list[float]] = {k: [] for k in ("start", "page", "deep page", "cold", "cached", "deep cold",
                                                       "label cold")}
    for _ in range(repeats):
        started = time.perf_counter()
        browser = Browser(output)  # a fresh browser: nothing drawn, nothing cached
        results["start"].append(time.perf_counter() - started)
        server = Server(browser)
        clients = [httpx.Client(timeout=120) for _ in range(CONNECTIONS)]
        try:
            page, cold, count = fetch_page(server.base, "", clients)
            assert count == 50, count
            results["page"].append(page)
            results["cold"].append(cold)
            results["cached"].append(fetch_page(server.base, "", clients)[1])
            deep = f"?after={images - 200}"
            page, cold, count = fetch_page(server.base, deep, clients)
            assert count == 50, count
            results["deep page"].append(page)
            results["deep cold"].append(cold)
            label = browser.labels[1][0]
            results["label cold"].append(fetch_page(server.base, f"?label={label}&after={images // 2}", clients)[1])
        finally:
            for c in clients:
                c.close()
            server.stop()
            browser.close()
    return {k: statistics.median(v) for k, v in results.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, nargs="+", default=[1000, 100_000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="where to make the outputs (default: a temp folder)")
    args = parser.parse_args(argv)
    root = args.dir or Path(tempfile.mkdtemp(prefix="maskray-bench-browse-"))
    root.mkdir(parents=True, exist_ok=True)
    print(f"maskray browse bench: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}; outputs in {root}")
    print("| images | shards | start (index) | page HTML | deep page HTML | 50 thumbnails cold | cached | "
          "deep page cold | label page cold |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for images in args.images:
        made = time.perf_counter()
        output = make_output(root, images)
        made = time.perf_counter() - made
        r = bench(output, images, args.repeats)
        print(f"| {images:,} | {(images + SHARD - 1) // SHARD:,} | {r['start']:.2f} s | {r['page'] * 1000:.0f} ms | "
              f"{r['deep page'] * 1000:.0f} ms | {r['cold']:.2f} s | {r['cached'] * 1000:.0f} ms | "
              f"{r['deep cold']:.2f} s | {r['label cold']:.2f} s |", flush=True)
        print(f"  (output made in {made:.1f} s; medians of {args.repeats} runs)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
