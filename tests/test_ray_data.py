"""The Ray Data face: ``read_binary_files(...).map_batches(Segmenter, ...)`` on a local Ray
cluster (127.0.0.1) gives the rows that ``maskray segment`` writes for the same images and
weights (read back by DuckDB), and an error row for a broken image."""

import pytest

from maskray.jobs.cli import main
from maskray.pipeline.results.query import connect
from maskray.pipeline.segment.output import INSTANCES_SCHEMA
from maskray.pipeline.segment.ray_data import SCHEMA, Segmenter, stable_image_id
from maskray.pipeline.train.shapes import write_shapes
from tests.test_user_errors import WEIGHTS

pytestmark = pytest.mark.slow
COLUMNS = [n for n in INSTANCES_SCHEMA.names if n != "image_id"]


def test_map_batches_gives_the_jobs_rows(ray_local, tmp_path):
    import ray

    write_shapes(str(tmp_path / "set"), count=4, seed=5)
    images = tmp_path / "set" / "images"
    (images / "broken.png").write_bytes(b"<html>not an image</html>")
    assert main(["segment", str(images), str(tmp_path / "out"), "--weights", WEIGHTS, "--batch-size", "1",
                 "--no-progress"]) == 0
    con = connect(str(tmp_path / "out"))
    expected = con.sql(f"SELECT {', '.join(COLUMNS)} FROM instances ORDER BY image_uri, instance").fetchall()
    assert len(expected) > 2, "the demo model found too little to compare"

    rows = (ray.data.read_binary_files(str(images), include_paths=True)
            .map_batches(Segmenter, fn_constructor_kwargs={"weights": WEIGHTS, "model_batch_size": 1, "device": "cpu"},
                         concurrency=1, batch_size=2)
            .to_arrow_refs())
    table = ray.get(rows)
    import pyarrow as pa

    got = pa.concat_tables(table).sort_by([("image_uri", "ascending"), ("instance", "ascending")])
    assert got.schema == SCHEMA
    found = got.filter(pa.compute.is_null(got.column("error")))
    assert [tuple(r[c] for c in COLUMNS) for r in found.to_pylist()] == [tuple(r) for r in expected]
    assert all(r["image_id"] == stable_image_id(r["image_uri"]) for r in got.to_pylist())
    [failed] = got.filter(pa.compute.invert(pa.compute.is_null(got.column("error")))).to_pylist()
    job_error = con.sql("SELECT image_uri, error FROM images WHERE status = 'error'").fetchall()
    assert (failed["image_uri"], failed["error"]) == job_error[0] and failed["label"] is None


def test_uris_and_image_ids_of_the_batch(tmp_path):
    write_shapes(str(tmp_path / "set"), count=2, seed=5)
    uris = [f"file://{tmp_path}/set/images/{i:06d}.png" for i in range(2)] + [f"file://{tmp_path}/gone.png"]
    segmenter = Segmenter(WEIGHTS, score_threshold=0.0, device="cpu")
    table = segmenter({"image_uri": uris, "image_id": [7, 8, 9]})
    ids = dict(zip(table.column("image_uri").to_pylist(), table.column("image_id").to_pylist()))
    assert ids[uris[0]] == 7 and ids[uris[2]] == 9
    assert "does not exist" in table.filter(pa_is(table, uris[2])).column("error")[0].as_py()
    with pytest.raises(ValueError, match="score_threshold must be in"):
        Segmenter(WEIGHTS, score_threshold=2)


def pa_is(table, uri):
    import pyarrow.compute as pc

    return pc.equal(table.column("image_uri"), uri)
