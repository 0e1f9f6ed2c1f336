"""Reading an output back: DuckDB views and pyarrow datasets (local and on the loopback S3
server), the totals, and the overlay picture (its drawing in detail: tests/test_pictures.py).
The outputs are committed directly with known masks (pycocotools encodes them), so no model or
Ray is needed here."""

import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from maskray.jobs.cli import main
from maskray.pipeline.errors import QueryError
from maskray.pipeline.results.query import connect, open_table, output_totals
from maskray.pipeline.results.show import auto_scale, render_overlay
from maskray.pipeline.segment.manifest import Manifest
from maskray.pipeline.segment.output import IMAGES_SCHEMA, INSTANCES_SCHEMA, commit_shard, table_to_parquet_bytes
from maskray.pipeline.storage import open_url

HEIGHT, WIDTH = 40, 60


def _instances(uri: str, image_id: int, masks: list[np.ndarray], labels: list[int]) -> dict:
    rows = {name: [] for name in INSTANCES_SCHEMA.names}
    for i, (mask, label) in enumerate(zip(masks, labels)):
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        x, y, w, h = mask_utils.toBbox(rle)
        values = dict(image_uri=uri, image_id=image_id, instance=i, label=label, label_name=["bg", "disc", "box"][label],
                      score=0.9 - 0.1 * i, box_x1=x, box_y1=y, box_x2=x + w, box_y2=y + h, area=int(mask.sum()),
                      mask_height=HEIGHT, mask_width=WIDTH, mask_counts=rle["counts"].decode())
        for name in rows:
            rows[name].append(values[name])
    return rows


def write_output(fs, output: str, image_uri: str) -> list[np.ndarray]:
    """Shard 0: one image with two instances, one broken image; shard 1: one image, none."""
    first, second = np.zeros((HEIGHT, WIDTH), bool), np.zeros((HEIGHT, WIDTH), bool)
    first[5:20, 10:30] = True
    second[25:38, 40:58] = True
    instances = pa.table(_instances(image_uri, 0, [first, second], [1, 2]), schema=INSTANCES_SCHEMA)
    images = pa.table({"image_uri": [image_uri, "s3://b/bad.jpg"], "image_id": [0, 1], "width": [WIDTH, None],
                       "height": [HEIGHT, None], "instances": [2, 0], "status": ["ok", "error"], "error": [None, "empty file (0 bytes)"]},
                      schema=IMAGES_SCHEMA)
    commit_shard(fs, output, 0, {"instances": instances, "images": images}, {}, {"shard": 0})
    empty = pa.table({n: [] for n in INSTANCES_SCHEMA.names}, schema=INSTANCES_SCHEMA)
    lone = pa.table({"image_uri": ["s3://b/c.jpg"], "image_id": [2], "width": [8], "height": [8], "instances": [0],
                     "status": ["ok"], "error": [None]}, schema=IMAGES_SCHEMA)
    commit_shard(fs, output, 1, {"instances": empty, "images": lone}, {}, {"shard": 1})
    Manifest(input="s3://b/", output=output, weights={"name": "w.pt", "sha256": "ab"}, config={}, options={},
             versions={}, status="complete").write(fs, output)  # what the commands check first
    return [first, second]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_duckdb_views_and_pyarrow(tmp_path, request, where):
    if where == "s3":
        bucket = request.getfixturevalue("s3")
        url, options = bucket.url("out"), bucket.storage_options
    else:
        url, options = str(tmp_path / "out"), None
    fs, output = open_url(url, options)
    masks = write_output(fs, output, "file:///photos/a.png")
    con = connect(url, options)
    assert con.sql("SELECT status, count(*) FROM images GROUP BY 1 ORDER BY 1").fetchall() == [("error", 1), ("ok", 2)]
    rows = con.sql("SELECT label_name, area, mask_height, mask_width, mask_counts FROM instances ORDER BY instance").fetchall()
    assert [r[:2] for r in rows] == [("disc", int(masks[0].sum())), ("box", int(masks[1].sum()))]
    for (_, _, h, w, counts), mask in zip(rows, masks):  # the strings decode back to the masks
        assert np.array_equal(mask_utils.decode({"size": [h, w], "counts": counts.encode()}).astype(bool), mask)
    assert open_table(url, "instances", options).count_rows() == 2
    assert open_table(url, "images", options).to_table().num_rows == 3
    assert output_totals(url, options) == {"images": 3, "ok": 2, "errors": 1, "instances": 2}

    # Shard 2 half-written (its instances part, no images part, no done-marker), as when its
    # writer died or it failed for good: readers see the committed shards only.
    stray = pa.table(_instances("file:///photos/d.png", 3, [masks[0]], [1]), schema=INSTANCES_SCHEMA)
    fs.pipe_file(f"{output}/instances/part-000002.parquet", table_to_parquet_bytes(stray, {}))
    con = connect(url, options)
    assert con.sql("SELECT count(*) FROM instances").fetchall() == [(2,)]
    assert con.sql("SELECT count(*) FROM images").fetchall() == [(3,)]
    assert open_table(url, "instances", options).count_rows() == 2
    assert output_totals(url, options)["instances"] == 2
    # Once committed, it counts.
    images = pa.table({"image_uri": ["file:///photos/d.png"], "image_id": [3], "width": [WIDTH], "height": [HEIGHT],
                       "instances": [1], "status": ["ok"], "error": [None]}, schema=IMAGES_SCHEMA)
    commit_shard(fs, output, 2, {"instances": stray, "images": images}, {}, {"shard": 2})
    con = connect(url, options)
    assert con.sql("SELECT count(*) FROM instances").fetchall() == [(3,)]
    assert output_totals(url, options) == {"images": 4, "ok": 3, "errors": 1, "instances": 3}


def test_empty_output_has_views_with_columns(tmp_path):
    (tmp_path / "out").mkdir()
    con = connect(str(tmp_path / "out"))
    assert con.sql("SELECT count(*) FROM instances").fetchall() == [(0,)]
    assert con.sql("SELECT * FROM images").columns == IMAGES_SCHEMA.names
    assert con.sql("SELECT * FROM instances").columns == INSTANCES_SCHEMA.names
    with pytest.raises(FileNotFoundError, match="no such output"):
        connect(str(tmp_path / "absent"))
    with pytest.raises(ValueError, match="no table 'boxes'"):
        open_table(str(tmp_path / "out"), "boxes")


def test_an_output_duckdb_cannot_read_is_one_line_not_a_traceback(tmp_path, capsys):
    """A committed part that is not Parquet: DuckDB's own error (neither ValueError nor OSError)
    becomes a QueryError naming the output and the part, which the CLI says in one line."""
    fs, output = open_url(str(tmp_path / "out"))
    write_output(fs, output, "file:///photos/a.png")
    (tmp_path / "out" / "instances" / "part-000000.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(QueryError, match=rf"^{tmp_path}/out: DuckDB cannot read this output \(.*part-000000.parquet"):
        connect(str(tmp_path / "out"))
    assert main(["query", str(tmp_path / "out"), "select 1"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.splitlines()) == 1, captured.err
    assert captured.err.startswith(f"maskray query: error: {tmp_path}/out: DuckDB cannot read this output")


def test_overlay_of_an_image_gone_since_names_it(tmp_path):
    fs, output = open_url(str(tmp_path / "out"))
    write_output(fs, output, f"file://{tmp_path}/gone.png")
    with pytest.raises(FileNotFoundError, match=rf"^file://{tmp_path}/gone.png: no such file \(moved or deleted"):
        render_overlay(str(tmp_path / "out"), "gone.png")


def test_overlay_draws_masks_where_they_are(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 50, (HEIGHT, WIDTH, 3), dtype=np.uint8)  # dark: any drawn colour shows
    Image.fromarray(pixels).save(tmp_path / "a.png")
    fs, output = open_url(str(tmp_path / "out"))
    masks = write_output(fs, output, f"file://{tmp_path}/a.png")

    # A small image is enlarged a whole number of times by default, masks with it.
    picture, count = render_overlay(str(tmp_path / "out"), "a.png")
    scale = auto_scale(HEIGHT, WIDTH)
    enlarge = lambda a: np.repeat(np.repeat(a, scale, axis=0), scale, axis=1)
    drawn = np.asarray(picture)
    assert count == 2 and scale > 1 and drawn.shape == (HEIGHT * scale, WIDTH * scale, 3)
    changed = (drawn != enlarge(pixels)).any(axis=2)
    for mask in masks:
        assert changed[enlarge(mask)].mean() > 0.99  # the mask is tinted
    # Left of both boxes' lines, and the rows between the first box and the second's tag
    # (tags go above their box), nothing is drawn.
    untouched = np.zeros(changed.shape, bool)
    untouched[:, :10 * scale - 4] = True
    untouched[20 * scale + 4:25 * scale - 40, :] = True
    assert not changed[untouched].any()

    picture, count = render_overlay(str(tmp_path / "out"), "a.png", min_score=0.85)
    assert count == 1
    same, _ = render_overlay(str(tmp_path / "out"), "a.png", scale=1)
    assert np.asarray(same).shape == pixels.shape
    with pytest.raises(LookupError, match="no image 'nothing.png'"):
        render_overlay(str(tmp_path / "out"), "nothing.png")
    with pytest.raises(ValueError, match="could not be segmented: empty file"):
        render_overlay(str(tmp_path / "out"), "s3://b/bad.jpg")


def test_overlay_suffix_must_be_unique(tmp_path):
    fs, output = open_url(str(tmp_path / "out"))
    write_output(fs, output, "s3://b/c.jpg")  # shard 1 also holds s3://b/c.jpg: two rows, one name
    with pytest.raises(LookupError, match="matches 2 images"):
        render_overlay(str(tmp_path / "out"), "c.jpg")


def test_png_bytes_of_overlay_open(tmp_path):
    Image.fromarray(np.zeros((HEIGHT, WIDTH, 3), np.uint8)).save(tmp_path / "a.png")
    fs, output = open_url(str(tmp_path / "out"))
    write_output(fs, output, f"file://{tmp_path}/a.png")
    picture, _ = render_overlay(str(tmp_path / "out"), f"file://{tmp_path}/a.png", scale=1)
    buffer = io.BytesIO()
    picture.save(buffer, "PNG")
    assert Image.open(io.BytesIO(buffer.getvalue())).size == (WIDTH, HEIGHT)
