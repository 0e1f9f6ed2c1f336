"""``open_output``: an output's images, and an image's instances with masks as numpy arrays,
checked against pycocotools' own decoding of the Parquet rows (read by DuckDB)."""

import numpy as np
import pyarrow.compute as pc
import pytest
from pycocotools import mask as mask_utils

from maskray.pipeline.errors import OutputError
from maskray.pipeline.results.handle import open_output
from maskray.pipeline.results.query import connect
from maskray.pipeline.storage import open_url
from tests.test_export import sample_images, write_output


def test_masks_are_the_parquet_rows_decoded(tmp_path):
    assert_handle_reads(str(tmp_path / "out"), None)


def test_an_output_in_a_bucket(s3):
    assert_handle_reads(s3.url("out"), s3.storage_options)


def assert_handle_reads(url: str, options: dict | None) -> None:
    write_output(*open_url(url, options), sample_images())
    out = open_output(url, options)
    assert out.progress.finished
    images = out.images()
    assert images.num_rows == 5 and images.column("status").to_pylist().count("error") == 1
    rows = connect(url, options).sql("SELECT image_uri, instance, label, label_name, score, box_x1, box_y1, box_x2, box_y2, "
                                     "area, mask_height, mask_width, mask_counts FROM instances ORDER BY image_id, instance").fetchall()
    for uri in images.filter(pc.equal(images.column("status"), "ok")).column("image_uri").to_pylist():
        found = out.instances(uri)
        mine = [r for r in rows if r[0] == uri]
        assert len(found) == len(mine) and found.masks.shape == (len(mine), 40, 60) and found.masks.dtype == bool
        for k, r in enumerate(mine):
            expected = mask_utils.decode({"size": [r[10], r[11]], "counts": r[12].encode()}).astype(bool)
            assert np.array_equal(found.masks[k], expected)
            assert (int(found.labels[k]), found.label_names[k]) == (r[2], r[3])
            assert found.scores[k] == np.float32(r[4]) and found.areas[k] == r[9]
            assert found.boxes[k].tolist() == [float(np.float32(v)) for v in r[5:9]]
    assert len(out.instances("sub/b.jpg")) == 1  # a unique suffix will do
    assert len(out.instances("a.jpg", min_score=0.9)) == 1
    with pytest.raises(ValueError, match="bad.jpg could not be segmented: not an image"):
        out.instances("bad.jpg")
    with pytest.raises(LookupError, match="no image 'zzz.jpg'"):
        out.instances("zzz.jpg")


def test_box_only_and_not_an_output(tmp_path):
    fs, output = open_url(str(tmp_path / "out"))
    write_output(fs, output, sample_images(), box_only=True)
    found = open_output(output).instances("a.jpg")
    assert found.masks is None and len(found) == 2 and found.boxes.shape == (2, 4)
    (tmp_path / "folder").mkdir()
    with pytest.raises(OutputError, match="not a segmentation output"):
        open_output(str(tmp_path / "folder"))
