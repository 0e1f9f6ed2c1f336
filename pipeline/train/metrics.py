"""The per-epoch metrics of a run: metrics.csv and its curves, metrics.png."""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping
from typing import Any

from maskray.model import LOSS_NAMES
from maskray.pipeline.storage import join, open_url, read_object, write_bytes_atomically

METRICS_CSV = "metrics.csv"
METRICS_PNG = "metrics.png"
METRIC_COLUMNS = ("epoch", "step", "lr", "loss", *LOSS_NAMES, "images_per_s", "epoch_seconds",
                  "skipped_annotations", "bbox_AP", "bbox_AP50", "segm_AP", "segm_AP50")


def write_metrics(rows: list[dict[str, Any]], output: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """metrics.csv and metrics.png from all rows so far, each rewritten whole and atomically: a
    reader never sees half a file, and a write that fails for a reason that may pass is retried."""
    from maskray.pipeline.train.curves import plot_curves

    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=METRIC_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in METRIC_COLUMNS})
    fs, root = open_url(output, storage_options)
    write_bytes_atomically(fs, join(root, METRICS_CSV), text.getvalue().encode())
    write_bytes_atomically(fs, join(root, METRICS_PNG), plot_curves(rows))


def read_metrics(output: str, storage_options: Mapping[str, Any] | None = None) -> list[dict[str, str]]:
    text = read_object(join(output.rstrip("/"), METRICS_CSV), storage_options).decode()
    return list(csv.DictReader(io.StringIO(text, newline="")))

