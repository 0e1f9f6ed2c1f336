"""The per-epoch metrics of a run: metrics.csv and its curves, metrics.png."""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping
from typing import Any

from maskray.model import LOSS_NAMES
from maskray.pipeline.storage import join, open_url

METRICS_CSV = "metrics.csv"
METRICS_PNG = "metrics.png"
METRIC_COLUMNS = ("epoch", "step", "lr", "loss", *LOSS_NAMES, "images_per_s", "epoch_seconds",
                  "skipped_annotations", "bbox_AP", "bbox_AP50", "segm_AP", "segm_AP50")


def write_metrics(rows: list[dict[str, Any]], output: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """metrics.csv and metrics.png from all rows so far (rewritten whole: a reader never sees
    half a file on an object store, where files are written at close)."""
    from maskray.pipeline.train.curves import plot_curves

    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=METRIC_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in METRIC_COLUMNS})
    fs, root = open_url(output, storage_options)
    with fs.open(join(root, METRICS_CSV), "w") as f:
        f.write(text.getvalue())
    with fs.open(join(root, METRICS_PNG), "wb") as f:
        f.write(plot_curves(rows))


def read_metrics(output: str, storage_options: Mapping[str, Any] | None = None) -> list[dict[str, str]]:
    fs, root = open_url(output, storage_options)
    with fs.open(join(root, METRICS_CSV), "r") as f:
        return list(csv.DictReader(f))

