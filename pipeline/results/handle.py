"""A segmentation output from Python, for notebooks: its images, and an image's instances with
the masks as a numpy array.

    from maskray.pipeline.results.handle import open_output

    out = open_output("s3://results/run1", storage_options)
    out.images()                      # pyarrow Table: image_uri, image_id, width, height, instances, status, error
    found = out.instances("cat.jpg")  # its image_uri, or a path or file name that ends exactly one
    found.masks                       # numpy bool [N, H, W] (pycocotools.mask.decode of the RLE), None if box-only
    found.boxes, found.labels, found.label_names, found.scores, found.areas

Reads the committed shards (an output still being written answers from what is committed:
``progress`` says how far it got). An image that could not be segmented raises ValueError with
its reason; one that is not in the output, LookupError.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds

from maskray.pipeline.results.query import OutputProgress, open_table, output_progress
from maskray.pipeline.results.show import find_image_uri
from maskray.pipeline.segment.output import IMAGES, INSTANCES


@dataclass(frozen=True)
class Instances:
    """One image's instances, best score first (the Parquet ``instance`` order)."""

    image_uri: str
    image_id: int
    height: int
    width: int
    labels: np.ndarray  # int32 [N], the model's label index
    label_names: list[str]
    scores: np.ndarray  # float32 [N]
    boxes: np.ndarray  # float32 [N, 4], xyxy pixels
    areas: np.ndarray  # int64 [N], mask pixels
    masks: np.ndarray | None  # bool [N, H, W]; None for a box-only model's output

    def __len__(self) -> int:
        return len(self.labels)


class Output:
    """A segmentation output (see ``open_output``)."""

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None):
        self.url = url
        self.storage_options = dict(storage_options or {})
        self.progress: OutputProgress = output_progress(url, self.storage_options)  # not an output: one line

    def table(self, name: str) -> ds.Dataset:
        """The table ``instances`` or ``images`` as a pyarrow dataset (committed shards)."""
        return open_table(self.url, name, self.storage_options)

    def images(self) -> pa.Table:
        return self.table(IMAGES).to_table()

    def instances(self, image: str, min_score: float = 0.0) -> Instances:
        """The instances of ``image`` (its image_uri, or a unique path suffix or file name) of
        score >= ``min_score``."""
        row = find_image_uri(self.url, image, self.storage_options)
        if row["status"] != "ok":
            raise ValueError(f"{row['image_uri']} could not be segmented: {row['error']}")
        rows = self.table(INSTANCES).to_table(
            filter=(ds.field("image_id") == row["image_id"]) & (ds.field("score") >= min_score)).sort_by("instance")
        height, width = int(row["height"]), int(row["width"])
        counts = rows.column("mask_counts").to_pylist()
        if not counts:
            masks = np.zeros((0, height, width), bool)
        elif all(counts) and all(rows.column("mask_height").to_pylist()):
            from pycocotools import mask as mask_utils

            rles = [{"size": [h, w], "counts": c.encode()} for h, w, c in
                    zip(rows.column("mask_height").to_pylist(), rows.column("mask_width").to_pylist(), counts)]
            masks = np.moveaxis(mask_utils.decode(rles), -1, 0).astype(bool)  # [H, W, N] -> [N, H, W]
        else:  # a box-only model: no masks
            masks = None
        boxes = np.stack([rows.column(c).to_numpy() for c in ("box_x1", "box_y1", "box_x2", "box_y2")], axis=1)
        return Instances(row["image_uri"], int(row["image_id"]), height, width,
                         rows.column("label").to_numpy(), rows.column("label_name").to_pylist(),
                         rows.column("score").to_numpy(), boxes.reshape(-1, 4).astype(np.float32),
                         rows.column("area").to_numpy(), masks)


def open_output(url: str, storage_options: Mapping[str, Any] | None = None) -> Output:
    """The segmentation output at ``url`` (any fsspec URL). Raises at once (StorageError,
    OutputError) where there is no segmentation output."""
    return Output(url, storage_options)
