"""The pictures people look at: ``maskray show``'s overlay and the training curves (metrics.png).

The overlays are drawn from real output folders (the job's schema and writer) with masks that
pycocotools encodes, read back through the storage and decode path; the assertions are on the
pixels of the result. The curves are drawn from metrics rows like the training loop's.
"""

import io
import math

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from maskray.jobs import show as show_job
from maskray.jobs.cli import main
from maskray.pipeline.decode import decode_image
from maskray.pipeline.results.show import (
    DEFAULT_ALPHA,
    DEFAULT_MIN_SCORE,
    Style,
    auto_scale,
    decode_rle_window,
    label_colour,
    outer_box,
    picture_size,
    place_tag,
    render_overlay,
)
from maskray.pipeline.segment.manifest import Manifest
from maskray.pipeline.segment.output import IMAGES_SCHEMA, INSTANCES_SCHEMA, commit_shard
from maskray.pipeline.storage import open_url
from maskray.pipeline.train.curves import (
    COLOURS,
    PANEL_SIZE,
    PANELS,
    epoch_ticks,
    nice_ticks,
    panel_layout,
    plot_curves,
    tick_labels,
    value_ticks,
)

GREY = (90, 90, 90)
NAMES = {1: "disc", 2: "box", 3: "star"}


def rgb(colour: str) -> np.ndarray:
    return np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)])


def write_output(tmp_path, pixels: np.ndarray, instances: list[tuple[np.ndarray, int, float]],
                 image_bytes: bytes | None = None, name: str = "a.png") -> str:
    """An output folder holding one image (``pixels`` as PNG, or ``image_bytes`` as they are)
    and ``instances`` (mask, label, score); returns the output's path."""
    path = tmp_path / name
    if image_bytes is None:
        Image.fromarray(pixels).save(path)
    else:
        path.write_bytes(image_bytes)
    uri = f"file://{path}"
    height, width = instances[0][0].shape if instances else pixels.shape[:2]
    rows = []
    for i, (mask, label, score) in enumerate(instances):
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        x, y, w, h = mask_utils.toBbox(rle)
        rows.append({"image_uri": uri, "image_id": 0, "instance": i, "label": label, "label_name": NAMES[label],
                     "score": score, "box_x1": x, "box_y1": y, "box_x2": x + w, "box_y2": y + h, "area": int(mask.sum()),
                     "mask_height": height, "mask_width": width, "mask_counts": rle["counts"].decode()})
    images = pa.table({"image_uri": [uri], "image_id": [0], "width": [width], "height": [height],
                       "instances": [len(rows)], "status": ["ok"], "error": [None]}, schema=IMAGES_SCHEMA)
    fs, output = open_url(str(tmp_path / "out"))
    commit_shard(fs, output, 0, {"instances": pa.Table.from_pylist(rows, schema=INSTANCES_SCHEMA), "images": images},
                 {}, {"shard": 0})
    Manifest(input=str(tmp_path), output=output, weights={"name": "w.pt", "sha256": "ab"}, config={},
             options={}, versions={}, status="complete").write(fs, output)  # what maskray show checks first
    return str(tmp_path / "out")


def grey_image(height: int, width: int) -> np.ndarray:
    return np.full((height, width, 3), GREY, np.uint8)


def rectangle_mask(height: int, width: int, top: int, left: int, bottom: int, right: int) -> np.ndarray:
    mask = np.zeros((height, width), bool)
    mask[top:bottom, left:right] = True
    return mask


def colour_boxes(picture: np.ndarray, colour: str, box: tuple[int, int, int, int], line_width: int) -> tuple[int, int, int, int]:
    """The bounding box (x0, y0, x1, y1 exclusive) of the pixels exactly ``colour``, leaving out
    the line of ``box`` (its outer corners, inclusive, and its width): the tag drawn in that colour."""
    found = (picture == rgb(colour)).all(axis=2)
    x0, y0, x1, y1 = box
    inside = found[y0 + line_width:y1 + 1 - line_width, x0 + line_width:x1 + 1 - line_width].copy()
    found[max(0, y0):y1 + 1, max(0, x0):x1 + 1] = False
    found[y0 + line_width:y1 + 1 - line_width, x0 + line_width:x1 + 1 - line_width] = inside
    ys, xs = np.nonzero(found)
    assert ys.size, f"no pixel of {colour}"
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


# Masks ------------------------------------------------------------------------------------------


def test_rle_window_decodes_as_pycocotools_does():
    rng = np.random.default_rng(0)
    for case in range(200):
        height, width = (int(v) for v in rng.integers(1, 70, 2))
        kind = case % 4
        if kind == 0:
            mask = rng.random((height, width)) < rng.random()
        elif kind == 1:
            top, left = int(rng.integers(0, height)), int(rng.integers(0, width))
            mask = rectangle_mask(height, width, top, left, int(rng.integers(top, height + 1)),
                                  int(rng.integers(left, width + 1)))
        else:
            mask = np.full((height, width), kind == 2)
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        expected = mask_utils.decode(rle).astype(bool)
        window = decode_rle_window(height, width, rle["counts"].decode())
        if not expected.any():
            assert window is None
            continue
        top, left, crop = window
        ys, xs = np.nonzero(expected)
        assert (top, left) == (ys.min(), xs.min()), case
        assert np.array_equal(crop, expected[ys.min():ys.max() + 1, xs.min():xs.max() + 1]), case


def test_a_mask_is_tinted_inside_and_outlined_at_its_border(tmp_path):
    height, width = 200, 300
    mask = rectangle_mask(height, width, 60, 80, 140, 200)
    output = write_output(tmp_path, grey_image(height, width), [(mask, 1, 0.9)])
    picture, count = render_overlay(output, "a.png", scale=1)
    drawn = np.asarray(picture).astype(int)
    assert count == 1 and drawn.shape == (height, width, 3)
    colour = rgb(label_colour(1))
    blend = np.floor(np.array(GREY) * (1 - DEFAULT_ALPHA) + colour * DEFAULT_ALPHA + 0.5)
    assert np.array_equal(drawn[100, 140], blend)  # inside: the image's colour mixed with the label's
    outline = drawn[60, 140]  # the mask's top row: a darker shade of the label colour, opaque
    assert outline.sum() < colour.sum() and np.allclose(outline / outline.max(), colour / colour.max(), atol=0.05)
    line = Style.for_picture(height, width).line_width
    assert np.array_equal(drawn[100, 80 - 1], colour) and np.array_equal(drawn[100, 80 - line], colour)  # box line
    assert np.array_equal(drawn[100, 80 - line - 1], GREY)  # just outside the box line: the image
    assert np.array_equal(drawn[170, 140], GREY)  # below the box: nothing drawn


def test_masks_follow_the_image_as_it_is_seen_exif_rotation_included(tmp_path):
    """The stored image is rotated, with an EXIF orientation that turns it back: the masks (in
    the coordinates of the image as seen) land on the bright square, at every scale."""
    height, width = 120, 160
    seen = grey_image(height, width)
    seen[20:60, 100:150] = (250, 250, 250)
    stored = Image.fromarray(seen).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to view"
    buffer = io.BytesIO()
    stored.save(buffer, "PNG", exif=exif)
    view = decode_image(buffer.getvalue()).permute(1, 2, 0).numpy()
    assert view.shape == (height, width, 3) and (view[30, 120] == 250).all()  # the decode path turns it back
    output = write_output(tmp_path, seen, [(rectangle_mask(height, width, 20, 100, 60, 150), 2, 0.9)],
                          image_bytes=buffer.getvalue())
    colour = rgb(label_colour(2))
    for scale, point in ((1, (40, 125)), (3, (120, 375)), (0.5, (20, 62))):
        drawn = np.asarray(render_overlay(output, "a.png", scale=scale)[0]).astype(int)
        assert drawn.shape[:2] == (round(height * scale), round(width * scale))
        assert np.abs(drawn[point] - (250 * (1 - DEFAULT_ALPHA) + colour * DEFAULT_ALPHA)).max() <= 2, scale


# Tags -------------------------------------------------------------------------------------------


def test_the_tag_of_a_box_at_the_top_edge_is_whole_inside_the_frame(tmp_path):
    height, width = 240, 320
    mask = rectangle_mask(height, width, 0, 100, 80, 220)  # touches the top: no room above it
    output = write_output(tmp_path, grey_image(height, width), [(mask, 3, 0.93)])
    picture, _ = render_overlay(output, "a.png", scale=1)
    style = Style.for_picture(height, width)
    box = outer_box({"box_x1": 100, "box_y1": 0, "box_x2": 220, "box_y2": 80}, (1, 1), style.line_width)
    tag = colour_boxes(np.asarray(picture), label_colour(3), box, style.line_width)
    tag_width, tag_height = style.tag_size("star 0.93")
    assert (tag[2] - tag[0], tag[3] - tag[1]) == (tag_width, tag_height)  # all of it: nothing cut off
    assert tag[1] >= 0 and tag[3] <= height and tag[1] > box[3]  # below the box, inside the frame
    text = (np.asarray(picture)[tag[1]:tag[3], tag[0]:tag[2]] != rgb(label_colour(3))).any(axis=2)
    assert text.mean() > 0.05  # the text is written on it


def test_tags_of_boxes_at_the_same_place_do_not_overlap(tmp_path):
    height, width = 240, 320
    mask = rectangle_mask(height, width, 100, 100, 160, 220)
    output = write_output(tmp_path, grey_image(height, width), [(mask, 1, 0.9), (mask, 2, 0.8), (mask, 3, 0.7)])
    picture, count = render_overlay(output, "a.png", scale=1)
    assert count == 3
    line_width = Style.for_picture(height, width).line_width
    box = outer_box({"box_x1": 100, "box_y1": 100, "box_x2": 220, "box_y2": 160}, (1, 1), line_width)
    tags = [colour_boxes(np.asarray(picture), label_colour(label), box, line_width) for label in (1, 2, 3)]
    assert tags[0][3] <= box[1] and tags[1][1] > box[3]  # the best above the box, the next below it
    assert box[0] < tags[2][0] and box[1] < tags[2][1] and tags[2][3] < box[3]  # the third inside it
    for i, a in enumerate(tags):
        for b in tags[i + 1:]:
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], (a, b)


def test_tag_placement_is_greedy_and_stays_in_the_frame():
    frame, size = (200, 100), (60, 20)
    assert place_tag((10, 50, 80, 90), size, frame, []) == (10, 30, 70, 50)  # above
    assert place_tag((10, 5, 80, 60), size, frame, []) == (10, 61, 70, 81)  # no room above: below
    assert place_tag((10, 5, 80, 90), size, frame, []) == (10, 5, 70, 25)  # no room either: inside
    assert place_tag((170, 50, 199, 90), size, frame, [])[2] == 200  # pushed left into the frame
    first = place_tag((10, 50, 80, 70), size, frame, [])
    second = place_tag((10, 50, 80, 70), size, frame, [first])
    third = place_tag((10, 50, 80, 70), size, frame, [first, second])
    assert first[1] == 30 and second[1] == 71 and third[1] == 50


# Sizes and the command line ---------------------------------------------------------------------


def test_picture_size_scales_then_fits():
    assert picture_size(3000, 4000, 0.25) == (1000, 750)
    assert picture_size(3000, 4000, None, 1920) == (1920, 1440)  # large images kept, then fitted
    assert picture_size(3000, 4000) == (4000, 3000)
    assert picture_size(40, 60) == (60 * 13, 40 * 13) and auto_scale(40, 60) == 13  # small ones enlarged
    assert picture_size(40, 60, None, 300) == (300, 200)
    assert picture_size(100, 100, 2.0, 150) == (150, 150) and picture_size(100, 100, 2.0, 500) == (200, 200)
    assert auto_scale(20, 2000) == 1  # a long strip is not blown up past 2048 px
    with pytest.raises(ValueError):
        picture_size(10, 10, 0)


@pytest.mark.parametrize("options, size", [
    (["--scale", "0.25"], (150, 100)),
    (["--max-size", "300"], (300, 200)),
    (["--scale", "2", "--max-size", "900"], (900, 600)),
    (["--scale", "1.5"], (900, 600)),
    ([], (600, 400)),  # large enough already: kept
])
def test_show_sizes_the_picture(tmp_path, capsys, options, size):
    mask = rectangle_mask(400, 600, 100, 100, 300, 400)
    output = write_output(tmp_path, grey_image(400, 600), [(mask, 1, 0.9)])
    assert main(["show", output, "a.png", "-o", str(tmp_path / "o.png"), *options]) == 0
    assert Image.open(tmp_path / "o.png").size == size
    assert f"(a {size[0]}x{size[1]} picture)" in capsys.readouterr().out
    drawn = np.asarray(Image.open(tmp_path / "o.png")).astype(int)
    centre = drawn[size[1] // 2, size[0] // 3]  # inside the mask at any size: tinted
    assert np.abs(centre - (np.array(GREY) * (1 - DEFAULT_ALPHA) + rgb(label_colour(1)) * DEFAULT_ALPHA)).max() <= 2


@pytest.mark.parametrize("option, value", [("--scale", "0"), ("--scale", "-1"), ("--scale", "abc"),
                                           ("--scale", "nan"), ("--max-size", "0"), ("--min-score", "2"),
                                           ("--min-score", "-0.1")])
def test_show_refuses_a_bad_size_in_one_line(option, value, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["show", "out", "a.png", option, value])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    errors = err.splitlines()
    assert len(errors) == 1 and errors[0].startswith(f"maskray show: error: argument {option}: ")
    assert value in errors[0] and "Traceback" not in err


def test_the_default_minimum_score_hides_weak_instances(tmp_path, capsys):
    assert show_job.DEFAULT_MIN_SCORE == DEFAULT_MIN_SCORE == 0.5  # the command's and the function's
    height, width = 200, 300
    strong, weak = rectangle_mask(height, width, 40, 40, 100, 120), rectangle_mask(height, width, 120, 180, 180, 280)
    output = write_output(tmp_path, grey_image(height, width), [(strong, 1, 0.9), (weak, 2, 0.3)])
    picture, count = render_overlay(output, "a.png", scale=1)
    drawn = np.asarray(picture)
    assert count == 1 and (drawn[150, 230] == GREY).all() and not (drawn[70, 80] == GREY).all()
    assert main(["show", output, "a.png", "-o", str(tmp_path / "o.png"), "--scale", "1"]) == 0
    assert "1 instances drawn" in capsys.readouterr().out
    assert main(["show", output, "a.png", "-o", str(tmp_path / "o.png"), "--scale", "1", "--min-score", "0.2"]) == 0
    assert "2 instances drawn" in capsys.readouterr().out
    assert not (np.asarray(Image.open(tmp_path / "o.png"))[150, 230] == GREY).all()


def test_text_and_lines_grow_with_the_picture():
    small, large = Style.for_picture(480, 640), Style.for_picture(3000, 4000)
    assert small.font_size >= 13 and small.line_width >= 2
    assert large.font_size > 3 * small.font_size and large.line_width > 2
    assert large.tag_size("person 0.93")[1] > 3 * small.tag_size("person 0.93")[1]


def test_a_label_keeps_its_colour_and_labels_differ():
    assert label_colour(3) == label_colour(3)
    assert len({label_colour(label) for label in range(1, 17)}) == 16


# The training curves ----------------------------------------------------------------------------


@pytest.mark.parametrize("low, high", [(0, 1), (0.13, 2.71), (1e-5, 2e-3), (57.3, 61.2), (3, 3), (-2.5, 7),
                                       (2e-6, 1.9e-5), (0, 1234.5)])
def test_nice_ticks_cover_the_range_in_steps_of_1_2_5(low, high):
    ticks = nice_ticks(low, high)
    steps = np.diff(ticks)
    assert 3 <= len(ticks) <= 11 and ticks[0] <= low and ticks[-1] >= high
    assert np.allclose(steps, steps[0], rtol=1e-6)
    mantissa = steps[0] / 10 ** math.floor(math.log10(steps[0]) + 1e-9)
    assert min(abs(mantissa - m) for m in (1, 2, 5)) < 1e-6, steps[0]
    if high > low:  # no tick wasted (one value gets a range around it)
        assert ticks[0] > low - steps[0] - 1e-12 and ticks[-1] < high + steps[0] + 1e-12
    labels = tick_labels(ticks)
    assert len(set(labels)) == len(labels)
    assert all(math.isclose(float(label), tick, rel_tol=0.01, abs_tol=steps[0] / 100) for label, tick in zip(labels, ticks))


def test_epoch_ticks_are_whole_and_the_ap_axis_is_0_to_1():
    assert epoch_ticks([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]) == [0, 2, 4, 6, 8, 10, 12]
    assert epoch_ticks([1, 2, 3]) == [1, 2, 3]
    assert all(float(t).is_integer() for t in epoch_ticks([1]))
    ap = value_ticks("validation AP", [0.12, 0.31])
    assert ap[0] == 0 and ap[-1] == 1
    assert tick_labels(ap)[0] == "0.0" and tick_labels(ap)[-1] == "1.0"
    assert value_ticks("losses", [0.4, 2.3])[-1] < 3.5  # the others follow their data


def metrics_rows(epochs: int = 8, missing_ap_epoch: int | None = None) -> list[dict]:
    rows = []
    for epoch in range(1, epochs + 1):
        loss = 2.0 * math.exp(-epoch / 3) + 0.3
        row = {"epoch": epoch, "lr": 0.02 * (0.1 if epoch > 6 else 1), "loss": loss, "loss_classifier": loss * 0.3,
               "loss_box_reg": loss * 0.2, "loss_mask": loss * 0.4, "loss_objectness": loss * 0.05,
               "loss_rpn_box_reg": loss * 0.05, "images_per_s": 6 + epoch % 3 * 0.2}
        if epoch != missing_ap_epoch:
            row.update(bbox_AP=0.1 * epoch / 2, segm_AP=0.09 * epoch / 2, bbox_AP50=0.2 * epoch / 2,
                       segm_AP50=0.18 * epoch / 2)
        rows.append(row)
    return rows


def test_metrics_png_has_its_legends_beside_the_plots_and_gaps_where_values_are_missing():
    picture = np.asarray(Image.open(io.BytesIO(plot_curves(metrics_rows(missing_ap_epoch=4)))).convert("RGB")).astype(int)
    assert picture.shape[:2] == (PANEL_SIZE[1] * 2, PANEL_SIZE[0] * 2)
    for i in range(len(PANELS)):
        plot, legend = panel_layout(((i % 2) * PANEL_SIZE[0], (i // 2) * PANEL_SIZE[1]))
        assert legend[0] > plot[2]  # the legend starts right of the plot
        inside = picture[plot[1] + 1:plot[3], plot[0] + 1:plot[2]]
        beside = picture[legend[1]:plot[3], legend[0]:legend[0] + 20]  # the legend's colour samples
        assert (np.abs(beside - COLOURS[0]).sum(axis=2) < 30).any(), i  # the first series' entry is there
        assert (np.abs(inside - COLOURS[0]).sum(axis=2) < 30).any(), i  # and its curve is in the plot
    # The AP panel (top right): its y axis labelled from 0.0 at the bottom to 1.0 at the top, as
    # dark text left of the plot; and no line between epochs 3 and 5, whose epoch 4 is missing.
    plot, _ = panel_layout((PANEL_SIZE[0], 0))
    labels = picture[:, plot[0] - 40:plot[0] - 6]
    for y in (plot[1], plot[3]):
        assert (labels[y - 4:y + 5] < 150).all(axis=2).any(), y
    ticks = epoch_ticks(list(range(1, 9)))
    x_of = lambda epoch: plot[0] + (epoch - ticks[0]) / (ticks[-1] - ticks[0]) * (plot[2] - plot[0])
    column = picture[plot[1] + 1:plot[3] - 1, round(x_of(4))]
    assert not (np.abs(column - COLOURS[0]).sum(axis=1) < 30).any()
    column = picture[plot[1] + 1:plot[3] - 1, round(x_of(2.5))]  # between epochs 2 and 3 it is drawn
    assert (np.abs(column - COLOURS[0]).sum(axis=1) < 30).any()
