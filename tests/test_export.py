"""``maskray export``: a segmentation output as COCO JSON, read back with pycocotools.

The main test runs a real ``maskray segment`` (the demo model, a local Ray cluster on 127.0.0.1)
over synthetic shapes, exports both formats and checks them against the Parquet rows read by
DuckDB: every instance once, masks that pycocotools decodes to the Parquet's own, boxes in
xywh, and COCOeval of the results against the instances file (the same detections: AP 1).
Then outputs written directly (the job's schema and writer): box-only rows, filters, an empty,
unfinished or missing output, a bucket on the loopback S3 server, and each mistake in one line.
"""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from maskray.jobs import export as export_job
from maskray.jobs.cli import main
from maskray.pipeline.errors import StorageError
from maskray.pipeline.results import export as export_module
from maskray.pipeline.results.export import export_output
from maskray.pipeline.results.query import connect
from maskray.pipeline.segment.manifest import Manifest
from maskray.pipeline.segment.output import IMAGES_SCHEMA, INSTANCES_SCHEMA, commit_shard
from maskray.pipeline.segment.plan import Plan
from maskray.pipeline.storage import open_url
from maskray.pipeline.train.shapes import write_shapes
from tests.test_user_errors import WEIGHTS, one_line

CLASSES = ("__background__", "disc", "box")


def parquet_instances(url: str, options: dict | None = None, where: str = "true") -> list[dict]:
    """The instances rows, by DuckDB, in (image_id, instance) order; box widths in float64."""
    con = connect(url, options)
    relation = con.sql(f"SELECT *, CAST(box_x2 AS DOUBLE) - CAST(box_x1 AS DOUBLE) AS w, "
                       f"CAST(box_y2 AS DOUBLE) - CAST(box_y1 AS DOUBLE) AS h FROM instances WHERE {where} "
                       "ORDER BY image_id, instance")
    return [dict(zip(relation.columns, row)) for row in relation.fetchall()]


def decoded(height: int, width: int, counts: str) -> np.ndarray:
    return mask_utils.decode({"size": [height, width], "counts": counts.encode()})


def assert_annotations_are_rows(annotations: list[dict], rows: list[dict]) -> None:
    """Each row once, in order: the ids, the box in xywh, the score, and the mask decoded alike."""
    assert len(annotations) == len(rows)
    for annotation, row in zip(annotations, rows):
        assert (annotation["image_id"], annotation["category_id"]) == (row["image_id"], row["label"])
        assert annotation["bbox"] == [float(np.float32(row["box_x1"])), float(np.float32(row["box_y1"])), row["w"], row["h"]]
        assert annotation["score"] == float(np.float32(row["score"]))
        assert annotation["area"] == row["area"]
        assert np.array_equal(mask_utils.decode(annotation["segmentation"]),
                              decoded(row["mask_height"], row["mask_width"], row["mask_counts"]))


# A real segmentation job ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def segmented(tmp_path_factory):
    """``maskray segment`` over six synthetic shapes images and one broken file, in shards of 3."""
    import ray

    if not ray.is_initialized():
        from maskray.pipeline.cluster import loopback_only
        from tests.services import RAY_TEST_OPTIONS

        loopback_only()
        ray.init(address="local", **RAY_TEST_OPTIONS)
    root = tmp_path_factory.mktemp("export")
    write_shapes(str(root / "set"), count=6, seed=11)
    (root / "set" / "images" / "broken.png").write_bytes(b"<html>not an image</html>")
    output = root / "out"
    assert main(["segment", str(root / "set" / "images"), str(output), "--weights", WEIGHTS, "--shard-size", "3",
                 "--no-progress"]) == 0
    return root, output


@pytest.mark.slow
def test_coco_files_of_a_real_job_load_in_pycocotools(segmented, capsys):
    root, output = segmented
    capsys.readouterr()
    assert main(["export", str(output), str(root / "coco.json")]) == 0
    said = capsys.readouterr().out
    assert said.startswith(f"{root / 'coco.json'}: a COCO instances file: ") and "1 images that could not be" in said
    assert main(["export", str(output), str(root / "results.json"), "--format", "coco-results"]) == 0

    gt = COCO(str(root / "coco.json"))
    rows = parquet_instances(str(output))
    assert len(rows) > 3, "the demo model found too little to compare"
    con = connect(str(output))
    ok = con.sql("SELECT image_id, image_uri, width, height FROM images WHERE status = 'ok' ORDER BY 1").fetchall()
    assert sorted(gt.getImgIds()) == [r[0] for r in ok]  # the Parquet image ids; the broken file left out
    for image_id, uri, width, height in ok:
        image = gt.loadImgs(image_id)[0]
        assert (image["width"], image["height"], image["coco_url"]) == (width, height, uri)
        assert image["file_name"] == Path(uri).name == f"{image_id:06d}.png"  # below INPUT: data_path is INPUT
    # The model's classes by label index, read from the weights file itself.
    from maskray.model import MaskRCNN

    names = MaskRCNN.load(WEIGHTS).class_names
    assert {c["id"]: c["name"] for c in gt.loadCats(gt.getCatIds())} == dict(enumerate(names[1:], start=1))
    annotations = gt.loadAnns(sorted(gt.getAnnIds()))
    assert [a["id"] for a in annotations] == list(range(1, len(rows) + 1))
    assert_annotations_are_rows(annotations, rows)
    for annotation in annotations:  # what COCO itself makes of them: the Parquet masks again
        assert annotation["iscrowd"] == 0
        assert np.array_equal(gt.annToMask(annotation), mask_utils.decode(annotation["segmentation"]))

    results = json.loads((root / "results.json").read_text())
    assert_annotations_are_rows(results, rows)
    assert all(set(r) == {"image_id", "category_id", "segmentation", "bbox", "score", "area"} for r in results)
    detections = gt.loadRes(str(root / "results.json"))
    for kind in ("segm", "bbox"):  # the results are the instances file's own detections: perfect scores
        evaluation = COCOeval(gt, detections, kind)
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
        assert evaluation.stats[0] == pytest.approx(1.0) and evaluation.stats[8] == pytest.approx(1.0)


@pytest.mark.slow
def test_min_score_and_where_choose_the_instances(segmented):
    root, output = segmented
    scores = sorted(r["score"] for r in parquet_instances(str(output)))
    threshold = float(scores[len(scores) // 2])  # half of them, about
    label = parquet_instances(str(output))[0]["label_name"]
    dest = root / "chosen.json"
    assert main(["export", str(output), str(dest), "--min-score", str(threshold),
                 "--where", f"label_name = '{label}' AND area > 20"]) == 0
    chosen = parquet_instances(str(output), where=f"score >= {threshold} AND label_name = '{label}' AND area > 20")
    assert 0 < len(chosen) < len(scores)
    gt = COCO(str(dest))
    assert_annotations_are_rows(gt.loadAnns(sorted(gt.getAnnIds())), chosen)
    assert len(gt.getImgIds()) == 6  # every image stays, with or without annotations


# Outputs written directly ----------------------------------------------------------------------


def disc(height: int, width: int, cy: int, cx: int, r: int) -> np.ndarray:
    y, x = np.ogrid[:height, :width]
    return (y - cy) ** 2 + (x - cx) ** 2 <= r * r


def write_output(fs, output: str, images: list[tuple[str, int, int, list[np.ndarray]]], shard_size: int = 2,
                 shards: set[int] | None = None, box_only: bool = False) -> None:
    """A finished output as the job writes it: a plan, parts and done-markers per shard (only
    ``shards``, when given: an unfinished output), a manifest. ``images``: (uri, height, width,
    masks); a width of 0 makes an error row. ``box_only``: the rows a Faster R-CNN gives."""
    Plan.create(fs, output, [uri for uri, *_ in images], shard_size)
    Manifest(input="s3://photos/in", output=output, weights={"name": "w.pt", "sha256": "ab"},
             config={"class_names": list(CLASSES)}, options={}, versions={}).write(fs, output)
    for shard, start in enumerate(range(0, len(images), shard_size)):
        if shards is not None and shard not in shards:
            continue
        instances, rows = [], []
        for image_id, (uri, height, width, masks) in enumerate(images[start:start + shard_size], start=start):
            for i, mask in enumerate(masks):
                rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
                x, y, w, h = (float(v) + 0.25 for v in mask_utils.toBbox(rle))
                row = {"image_uri": uri, "image_id": image_id, "instance": i, "label": 1 + i % 2,
                       "label_name": CLASSES[1 + i % 2], "score": 0.95 - 0.1 * i, "box_x1": x, "box_y1": y,
                       "box_x2": x + w + 0.1, "box_y2": y + h + 0.3, "area": int(mask.sum()), "mask_height": height,
                       "mask_width": width, "mask_counts": rle["counts"].decode()}
                if box_only:  # as the worker writes a Faster R-CNN's rows; a mask size of 0 too
                    row.update({"mask_counts": "", "area": 0}, **({"mask_height": 0, "mask_width": 0} if i % 2 else {}))
                instances.append(row)
            error = None if width else "not an image: text"
            rows.append({"image_uri": uri, "image_id": image_id, "width": width or None, "height": height or None,
                         "instances": len(masks), "status": "error" if error else "ok", "error": error})
        commit_shard(fs, output, shard, {"instances": pa.Table.from_pylist(instances, schema=INSTANCES_SCHEMA),
                                         "images": pa.Table.from_pylist(rows, schema=IMAGES_SCHEMA)}, {}, {"shard": shard})


def sample_images(prefix: str = "s3://photos/in") -> list[tuple[str, int, int, list[np.ndarray]]]:
    h, w = 40, 60
    return [(f"{prefix}/a.jpg", h, w, [disc(h, w, 10, 12, 6), disc(h, w, 25, 40, 9)]),
            (f"{prefix}/sub/b.jpg", h, w, [disc(h, w, 20, 30, 15)]),
            (f"{prefix}/c.jpg", h, w, []),
            ("s3://elsewhere/d.jpg", h, w, [disc(h, w, 5, 5, 3)]),
            (f"{prefix}/bad.jpg", 0, 0, [])]


def test_box_only_outputs_export_boxes(tmp_path):
    fs, output = open_url(str(tmp_path / "out"))
    write_output(fs, output, sample_images(), box_only=True)
    summaries = [export_output(str(tmp_path / "out"), str(tmp_path / f"{format}.json"), format)
                 for format in ("coco", "coco-results")]
    assert [(s.images, s.annotations) for s in summaries] == [(4, 4), (3, 4)]  # results: the images with instances
    gt = COCO(str(tmp_path / "coco.json"))
    rows = parquet_instances(str(tmp_path / "out"))
    annotations = gt.loadAnns(sorted(gt.getAnnIds()))
    assert len(annotations) == len(rows) == 4
    for annotation, row in zip(annotations, rows):
        assert "segmentation" not in annotation
        assert annotation["bbox"] == [float(np.float32(row["box_x1"])), float(np.float32(row["box_y1"])), row["w"], row["h"]]
        assert annotation["area"] == pytest.approx(row["w"] * row["h"])
    detections = gt.loadRes(str(tmp_path / "coco-results.json"))  # pycocotools' box branch
    assert len(detections.getAnnIds()) == 4
    evaluation = COCOeval(gt, detections, "bbox")
    evaluation.evaluate()
    evaluation.accumulate()
    assert evaluation.eval["precision"].max() == pytest.approx(1.0)


def test_file_names_ids_and_categories(tmp_path):
    fs, output = open_url(str(tmp_path / "out"))
    write_output(fs, output, sample_images())
    summary = export_output(str(tmp_path / "out"), str(tmp_path / "coco.json"))
    assert (summary.images, summary.annotations, summary.categories, summary.left_out) == (4, 4, 2, 1)
    data = json.loads((tmp_path / "coco.json").read_text())
    assert [(i["id"], i["file_name"]) for i in data["images"]] == [
        (0, "a.jpg"), (1, "sub/b.jpg"), (2, "c.jpg"), (3, "s3://elsewhere/d.jpg")]  # below INPUT, else the URL
    assert data["categories"] == [{"id": 1, "name": "disc", "supercategory": ""}, {"id": 2, "name": "box", "supercategory": ""}]
    assert data["info"]["maskray"]["output"] == output
    gt = COCO(str(tmp_path / "coco.json"))
    assert_annotations_are_rows(gt.loadAnns(sorted(gt.getAnnIds())), parquet_instances(str(tmp_path / "out")))
    # The same output exports to the same file.
    export_output(str(tmp_path / "out"), str(tmp_path / "again.json"))
    assert (tmp_path / "again.json").read_bytes() == (tmp_path / "coco.json").read_bytes()


def test_empty_and_unfinished_outputs(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["export", str(tmp_path / "empty"), str(tmp_path / "e.json")]) == 2
    assert "not a segmentation output (no _manifest.json; it is empty)" in one_line(capsys, "export")

    fs, output = open_url(str(tmp_path / "nothing-found"))  # finished, no instances: a file with no annotations
    write_output(fs, output, [("s3://photos/in/c.jpg", 8, 8, [])])
    assert main(["export", output, str(tmp_path / "n.json")]) == 0
    assert capsys.readouterr().out.endswith(": a COCO instances file: 0 annotations, 1 images, 2 categories\n")
    assert COCO(str(tmp_path / "n.json")).getAnnIds() == []

    fs, output = open_url(str(tmp_path / "unfinished"))
    write_output(fs, output, sample_images(), shards={0, 2})
    assert main(["export", output, str(tmp_path / "u.json"), "--format", "coco-results"]) == 2
    line = one_line(capsys, "export")
    assert f"cannot export {output} is unfinished: 2 of 3 shards committed" in line and "resumes it" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "n.json", "nothing-found", "unfinished"]


def test_mistakes_are_one_line_before_any_writing(tmp_path, capsys):
    fs, output = open_url(str(tmp_path / "out"))
    write_output(fs, output, sample_images())
    (tmp_path / "taken.json").write_text("mine")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "notes.txt").write_text("x")
    cases = [
        (["export", output, str(tmp_path / "taken.json")], f"{tmp_path}/taken.json: already exists (a file)"),
        (["export", output, str(tmp_path / "folder")], "folder: already exists (a folder)"),
        (["export", output, f"{output}/coco.json"], "coco.json: inside the segmentation output"),
        (["export", output, str(tmp_path / "a.json"), "--where", "lable = 1"],
         "--where 'lable = 1' cannot run: Binder Error: Referenced column \"lable\" not found"),
        (["export", output, str(tmp_path / "a.json"), "--where", "1=1); DROP TABLE x; --"], "--where '1=1); DROP TABLE x; --' is more than a condition"),
        (["export", str(tmp_path / "folder"), str(tmp_path / "a.json")], "not a segmentation output"),
        (["export", str(tmp_path / "absent"), str(tmp_path / "a.json")], "absent: no such file or prefix"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert message in one_line(capsys, "export"), argv
    assert (tmp_path / "taken.json").read_text() == "mine"
    assert not (tmp_path / "a.json").exists() and not (tmp_path / "out" / "coco.json").exists()
    for argv in (["--format", "yolo"], ["--min-score", "2"]):  # argparse's mistakes: one line too
        with pytest.raises(SystemExit) as stopped:
            main(["export", output, str(tmp_path / "a.json"), *argv])
        assert stopped.value.code == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and "error:" in err
    assert export_job.FORMATS == export_module.FORMATS


def test_a_failure_midway_leaves_no_file(tmp_path, monkeypatch):
    fs, output = open_url(str(tmp_path / "out"))
    write_output(fs, output, sample_images())

    def broken(*args, **kwargs):
        yield {"id": 1, "image_id": 0}
        raise OSError("disk full")

    monkeypatch.setattr(export_module, "_annotations", broken)
    with pytest.raises(OSError, match="disk full"):
        export_output(output, str(tmp_path / "exports" / "coco.json"))
    assert list((tmp_path / "exports").iterdir()) == []  # neither DEST nor its temporary file


def test_bucket_output_to_bucket_and_local_dest(s3, tmp_path, capsys):
    fs, output = open_url(s3.url("out"), s3.storage_options)
    write_output(fs, output, sample_images())
    options = json.dumps(s3.storage_options)
    assert main(["export", s3.url("out"), s3.url("exports", "coco.json"), "--storage-options", options]) == 0
    assert capsys.readouterr().out.startswith(f"{s3.url('exports', 'coco.json')}: a COCO instances file: 4 annotations")
    assert main(["export", s3.url("out"), str(tmp_path / "r.json"), "--format", "coco-results", "--where",
                 "image_uri LIKE '%/sub/%'", "--storage-options", options]) == 0
    data = s3.filesystem().cat_file(f"{s3.name}/exports/coco.json")
    for secret in (s3.storage_options["key"], s3.storage_options["secret"]):
        assert secret.encode() not in data
    (tmp_path / "coco.json").write_bytes(data)
    gt = COCO(str(tmp_path / "coco.json"))
    rows = parquet_instances(s3.url("out"), s3.storage_options)
    assert_annotations_are_rows(gt.loadAnns(sorted(gt.getAnnIds())), rows)
    assert_annotations_are_rows(json.loads((tmp_path / "r.json").read_text()), [r for r in rows if "/sub/" in r["image_uri"]])
    assert sorted(s3.filesystem().ls(f"{s3.name}/exports")) == [f"{s3.name}/exports/coco.json"]
    # A second export to the same object is refused, and it stays as it was.
    assert main(["export", s3.url("out"), s3.url("exports", "coco.json"), "--storage-options", options]) == 2
    assert "coco.json: already exists (a file)" in one_line(capsys, "export")
    with pytest.raises(StorageError, match="the bucket .no-such-bucket-maskray. does not exist"):
        export_output(s3.url("out"), "s3://no-such-bucket-maskray/c.json", storage_options=s3.storage_options)
