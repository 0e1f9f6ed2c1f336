"""The training curves as a PNG, drawn with Pillow (no plotting library needed).

Four panels over the epochs: the loss and each of its parts, the validation AP (bbox and
segm), the learning rate, and the throughput in images per second. Each panel is scaled to its
own data and labelled with its range; a missing value (no validation set) leaves a gap.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence

from PIL import Image, ImageDraw, ImageFont

PANELS = (
    ("losses", ("loss", "loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg")),
    ("validation AP", ("segm_AP", "bbox_AP", "segm_AP50", "bbox_AP50")),
    ("learning rate", ("lr",)),
    ("images / s", ("images_per_s",)),
)
COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75))
PANEL_SIZE = (480, 300)
MARGIN = (58, 28, 16, 34)  # left, top, right, bottom


def _number(value: float) -> str:
    if value == 0:
        return "0"
    return f"{value:.2e}" if abs(value) < 1e-2 or abs(value) >= 1e4 else f"{value:.3g}"


def _values(rows: Sequence[Mapping[str, object]], key: str) -> list[float | None]:
    out: list[float | None] = []
    for row in rows:
        value = row.get(key)
        try:
            number = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            number = math.nan
        out.append(number if math.isfinite(number) else None)
    return out


def _draw_panel(draw: ImageDraw.ImageDraw, origin: tuple[int, int], title: str, epochs: list[float],
                series: dict[str, list[float | None]], font) -> None:
    x0, y0 = origin
    width, height = PANEL_SIZE
    left, top, right, bottom = MARGIN
    plot = (x0 + left, y0 + top, x0 + width - right, y0 + height - bottom)
    draw.rectangle(plot, outline=(90, 90, 90))
    draw.text((x0 + left, y0 + 6), title, fill=(0, 0, 0), font=font)
    present = [v for values in series.values() for v in values if v is not None]
    if not present or not epochs:
        draw.text((plot[0] + 8, plot[1] + 8), "no data", fill=(120, 120, 120), font=font)
        return
    low, high = min(present), max(present)
    if title == "validation AP":
        low = min(low, 0.0)  # AP reads against zero
    if high - low < 1e-12:
        low, high = low - 0.5 * abs(low or 1), high + 0.5 * abs(high or 1)
    first, last = min(epochs), max(epochs)
    span = (last - first) or 1.0

    def point(epoch: float, value: float) -> tuple[float, float]:
        x = plot[0] + (epoch - first) / span * (plot[2] - plot[0])
        y = plot[3] - (value - low) / (high - low) * (plot[3] - plot[1])
        return x, y

    draw.text((x0 + 4, plot[1] - 4), _number(high), fill=(60, 60, 60), font=font)
    draw.text((x0 + 4, plot[3] - 8), _number(low), fill=(60, 60, 60), font=font)
    draw.text((plot[0], plot[3] + 4), f"epoch {_number(first)}", fill=(60, 60, 60), font=font)
    draw.text((plot[2] - 60, plot[3] + 4), f"epoch {_number(last)}", fill=(60, 60, 60), font=font)
    legend_y = plot[1] + 4
    for colour, (name, values) in zip(COLOURS, series.items()):
        if all(v is None for v in values):
            continue
        segment: list[tuple[float, float]] = []
        for epoch, value in zip(epochs, values):
            if value is None:
                if len(segment) > 1:
                    draw.line(segment, fill=colour, width=2)
                segment = []
                continue
            segment.append(point(epoch, value))
            x, y = segment[-1]
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour)
        if len(segment) > 1:
            draw.line(segment, fill=colour, width=2)
        draw.line((plot[2] - 118, legend_y + 6, plot[2] - 104, legend_y + 6), fill=colour, width=3)
        draw.text((plot[2] - 100, legend_y), name, fill=(30, 30, 30), font=font)
        legend_y += 13


def plot_curves(rows: Sequence[Mapping[str, object]]) -> bytes:
    """PNG bytes of the curves of ``rows`` (one dict per epoch, as in metrics.csv)."""
    font = ImageFont.load_default()
    columns = 2
    rows_of_panels = math.ceil(len(PANELS) / columns)
    image = Image.new("RGB", (PANEL_SIZE[0] * columns, PANEL_SIZE[1] * rows_of_panels), "white")
    draw = ImageDraw.Draw(image)
    epochs = [float(v) if v is not None else math.nan for v in _values(rows, "epoch")]
    for i, (title, keys) in enumerate(PANELS):
        origin = ((i % columns) * PANEL_SIZE[0], (i // columns) * PANEL_SIZE[1])
        _draw_panel(draw, origin, title, epochs, {k: _values(rows, k) for k in keys}, font)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
