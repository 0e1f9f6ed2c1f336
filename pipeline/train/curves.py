"""The training curves as a PNG, drawn with Pillow (no plotting library needed).

Four panels over the epochs: the loss and each of its parts, the validation AP (bbox and
segm), the learning rate, and the throughput in images per second. Each panel has real axes:
"nice" ticks (steps of 1, 2 or 5 times a power of ten, ``nice_ticks``) with labels and light
grid lines on the y axis, whole-epoch ticks on the x axis titled "epoch", and its legend in a
column to the right of the plot, never over the curves. The AP panel is always [0, 1], so
that runs compare at a glance; the others are scaled to their data. A missing value (no
validation set, an epoch without it) leaves a gap in its curve.
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
FIXED_RANGES = {"validation AP": (0.0, 1.0)}  # AP reads against the whole scale
COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75))
PANEL_SIZE = (620, 330)
# Space around the plot inside a panel: tick labels on the left, the title on top, the legend
# column on the right, the epoch ticks and axis title below.
MARGIN = (64, 34, 168, 50)  # left, top, right, bottom
LEGEND_GAP = 14  # between the plot's right edge and the legend
FONT_SIZE, TITLE_SIZE = 13, 15
AXIS, GRID, TEXT, MUTED = (90, 90, 90), (228, 228, 228), (30, 30, 30), (70, 70, 70)


def nice_ticks(low: float, high: float, count: int = 5, integer: bool = False) -> list[float]:
    """About ``count`` evenly spaced ticks covering [low, high], at a step of 1, 2 or 5 times a
    power of ten (at least 1 if ``integer``), the first at or below ``low`` and the last at or
    above ``high``."""
    if high < low:
        low, high = high, low
    if high - low < 1e-12 * max(1.0, abs(high)):  # one value: a range around it
        pad = 1.0 if integer else (abs(low) * 0.1 or 1.0)
        low, high = low - pad, high + pad
    rough = (high - low) / max(1, count)
    power = 10.0 ** math.floor(math.log10(rough))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= rough * (1 - 1e-9))
    if integer:
        step = max(1.0, float(round(step)))
    first = math.floor(low / step + 1e-9) * step
    last = math.ceil(high / step - 1e-9) * step
    digits = max(0, -math.floor(math.log10(step))) + 2  # rounds away float noise (0.30000000000000004)
    return [round(first + i * step, digits) for i in range(round((last - first) / step) + 1)]


def tick_labels(ticks: Sequence[float]) -> list[str]:
    """The labels of evenly spaced ``ticks``, all with the digits their step needs: 0 5 10,
    0.0 0.2 0.4, 0.000 0.005 0.010, and for tiny steps 0 5.0e-6 1.0e-5."""
    step = abs(ticks[1] - ticks[0]) if len(ticks) > 1 else abs(ticks[0]) or 1.0
    step_power = math.floor(math.log10(step) + 1e-9)
    if step_power >= 0 and max(abs(t) for t in ticks) < 1e6:
        return [f"{t:.0f}" for t in ticks]
    if step_power >= -4:
        return [f"{t:.{-step_power}f}" for t in ticks]
    largest_power = math.floor(math.log10(max(abs(t) for t in ticks)) + 1e-9)
    labels = []
    for t in ticks:
        mantissa, exponent = f"{t:.{max(0, largest_power - step_power)}e}".split("e")
        labels.append(f"{mantissa}e{int(exponent)}" if t else "0")
    return labels


def value_ticks(title: str, values: Sequence[float]) -> list[float]:
    """The y ticks of the panel ``title`` for its ``values``: its fixed range's, or the data's."""
    low, high = FIXED_RANGES.get(title, (min(values), max(values)))
    return nice_ticks(low, high)


def epoch_ticks(epochs: Sequence[float]) -> list[float]:
    """The x ticks: whole epochs covering the ones there are."""
    return nice_ticks(min(epochs), max(epochs), count=6, integer=True)


def panel_layout(origin: tuple[int, int]) -> tuple[tuple[int, int, int, int], tuple[int, int]]:
    """The plot rectangle (x0, y0, x1, y1) of the panel at ``origin`` and the top-left corner
    of its legend, which lies to the right of the plot, outside it."""
    x0, y0 = origin
    width, height = PANEL_SIZE
    left, top, right, bottom = MARGIN
    plot = (x0 + left, y0 + top, x0 + width - right, y0 + height - bottom)
    return plot, (plot[2] + LEGEND_GAP, plot[1])


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


def _draw_panel(draw: ImageDraw.ImageDraw, origin: tuple[int, int], title: str, epochs: list[float | None],
                series: dict[str, list[float | None]], font, title_font) -> None:
    plot, legend = panel_layout(origin)
    draw.text(((plot[0] + plot[2]) / 2, origin[1] + 8), title, fill=TEXT, font=title_font, anchor="mt")
    present = [v for values in series.values() for v, e in zip(values, epochs) if v is not None and e is not None]
    known_epochs = [e for e in epochs if e is not None]
    if not present or not known_epochs:
        draw.rectangle(plot, outline=AXIS)
        draw.text(((plot[0] + plot[2]) / 2, (plot[1] + plot[3]) / 2), "no data", fill=MUTED, font=font, anchor="mm")
        return
    y_ticks = value_ticks(title, present)
    x_ticks = epoch_ticks(known_epochs)
    y_low, y_high, x_low, x_high = y_ticks[0], y_ticks[-1], x_ticks[0], x_ticks[-1]

    def point(epoch: float, value: float) -> tuple[float, float]:
        x = plot[0] + (epoch - x_low) / (x_high - x_low) * (plot[2] - plot[0])
        y = plot[3] - (value - y_low) / (y_high - y_low) * (plot[3] - plot[1])
        return x, y

    for tick, label in zip(y_ticks, tick_labels(y_ticks)):
        _, y = point(x_low, tick)
        draw.line((plot[0], y, plot[2], y), fill=GRID)
        draw.line((plot[0] - 5, y, plot[0], y), fill=AXIS)
        draw.text((plot[0] - 8, y), label, fill=MUTED, font=font, anchor="rm")
    for tick, label in zip(x_ticks, tick_labels(x_ticks)):
        x, _ = point(tick, y_low)
        draw.line((x, plot[3], x, plot[3] + 5), fill=AXIS)
        draw.text((x, plot[3] + 8), label, fill=MUTED, font=font, anchor="mt")
    draw.text(((plot[0] + plot[2]) / 2, plot[3] + 28), "epoch", fill=TEXT, font=font, anchor="mt")
    draw.rectangle(plot, outline=AXIS)

    entry_y = legend[1] + 4
    for colour, (name, values) in zip(COLOURS, series.items()):
        if all(v is None for v in values):
            continue
        segment: list[tuple[float, float]] = []
        for epoch, value in zip(epochs, values):
            if value is None or epoch is None:  # a gap in the curve
                if len(segment) > 1:
                    draw.line(segment, fill=colour, width=2)
                segment = []
                continue
            segment.append(point(epoch, value))
            x, y = segment[-1]
            draw.ellipse((x - 2.5, y - 2.5, x + 2.5, y + 2.5), fill=colour)
        if len(segment) > 1:
            draw.line(segment, fill=colour, width=2)
        draw.line((legend[0], entry_y + 7, legend[0] + 18, entry_y + 7), fill=colour, width=3)
        draw.text((legend[0] + 24, entry_y + 7), name, fill=TEXT, font=font, anchor="lm")
        entry_y += 19


def plot_curves(rows: Sequence[Mapping[str, object]]) -> bytes:
    """PNG bytes of the curves of ``rows`` (one dict per epoch, as in metrics.csv)."""
    # Pillow's own TrueType font: no system fonts needed.
    font, title_font = ImageFont.load_default(size=FONT_SIZE), ImageFont.load_default(size=TITLE_SIZE)
    columns = 2
    rows_of_panels = math.ceil(len(PANELS) / columns)
    image = Image.new("RGB", (PANEL_SIZE[0] * columns, PANEL_SIZE[1] * rows_of_panels), "white")
    draw = ImageDraw.Draw(image)
    epochs = _values(rows, "epoch")
    for i, (title, keys) in enumerate(PANELS):
        origin = ((i % columns) * PANEL_SIZE[0], (i // columns) * PANEL_SIZE[1])
        _draw_panel(draw, origin, title, epochs, {k: _values(rows, k) for k in keys}, font, title_font)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
