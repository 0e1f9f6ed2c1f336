"""Bad and unusual input, many kinds (tests/corpus.py), through the decoder and through the
whole job: each file gives a correct result or an error row that says what is wrong with it,
the job never fails, every image in is one row in ``images``, and no key, however odd, makes a
read go to another object or a write land outside the output prefix.

The job runs for real: the corpus in a bucket on the loopback S3 server (and, for the names a
disk can hold, in a local folder), a local Ray cluster on 127.0.0.1, the output read back with
DuckDB.
"""

import hashlib
import re

import numpy as np
import pytest
import torch

from maskray.model import MaskRCNN, MaskRCNNConfig
from maskray.pipeline.decode import ImageDecodeError, decode_image
from maskray.pipeline.results.query import connect
from maskray.pipeline.segment.job import run_segment
from maskray.pipeline.segment.manifest import Manifest
from maskray.pipeline.segment.settings import SegmentJob
from maskray.pipeline.storage import open_url
from tests.corpus import SKIPPED, Case, build_corpus, decoys, is_local_name, jpeg

CORPUS = build_corpus()
CLASSES = ("__background__", "disc", "box", "wedge")


def _case_id(case: Case) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", case.key)[:60]


@pytest.fixture(scope="module")
def weights_path(tmp_path_factory):
    """An untrained light model (seeded), as tests/test_segment.py makes it."""
    torch.manual_seed(0)
    config = MaskRCNNConfig.light(num_classes=4, class_names=CLASSES, min_size=(128,), max_size=160, box_detections_per_img=12)
    path = tmp_path_factory.mktemp("weights") / "light.pt"
    MaskRCNN(config).save(path)
    return path


def test_corpus_covers_the_issue():
    """At least 20 kinds, both outcomes, and every kind the issue names (by its key)."""
    assert len(CORPUS) >= 20
    assert any(c.error is None for c in CORPUS) and any(c.error is not None for c in CORPUS)
    keys = " ".join(c.key for c in CORPUS)
    for kind in ("truncated.jpg", "truncated.png", "empty", "text.jpg", "error_page.png", "document.jpg", "png_named.jpg",
                 "progressive", "cmyk", "gray16", "gray.png", "palette", "rgba", "animated.gif", ".webp", ".tiff",
                 "exif_rotated", "one_pixel", "strip_20000x1", "bomb", "long-name-" * 80, "日本", " ", "../"):
        assert kind in keys, kind


# The decoder, case by case ---------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::UserWarning:PIL")  # pytest resets the filter maskray.pipeline.decode sets for Pillow
@pytest.mark.parametrize("case", CORPUS, ids=_case_id)
def test_decoder(case: Case):
    """The decoded picture (size, and pixels or colours where the case knows them), or an
    ImageDecodeError whose message says what is wrong."""
    if not case.decodes:
        with pytest.raises(ImageDecodeError) as raised:
            decode_image(case.data)
        assert re.search(case.error, str(raised.value)), str(raised.value)
        return
    tensor = decode_image(case.data)
    assert tensor.dtype == torch.uint8 and tensor.shape == (3, case.size[1], case.size[0])
    picture = tensor.permute(1, 2, 0).numpy().astype(np.int64)
    if case.pixels is not None:
        difference = int(np.abs(picture - case.pixels.astype(np.int64)).max())
        assert difference <= case.tolerance, f"a pixel is off by {difference} (tolerance {case.tolerance})"
    for x, y, colour in case.colours:
        assert np.abs(picture[y, x] - np.array(colour)).max() <= case.tolerance, (x, y, picture[y, x].tolist(), colour)


@pytest.mark.parametrize(
    "data, message",
    [
        (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code></Error>',
         r"not an image: an XML document, starting '<\?xml"),
        (b'\xef\xbb\xbf<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"/>', "unsupported image format: SVG"),
        (b'{"error": "not found"}', "not an image: JSON or other text"),
        (b"BMW 320i, blue", "not an image: text, starting 'BMW 320i"),  # "BM" is also a BMP's signature
        (b"PK\x03\x04" + bytes(40), "not an image: a ZIP archive"),
        (b"\0\0\0\x20ftypmp42" + bytes(40), "not an image: an ISO media file of brand 'mp42'"),
        (b"\x89PNG\r\n\x1a\n" + bytes(4), "corrupt image header: .*PNG"),
        (bytes(range(256)), r"not an image: no known image format in its first bytes b'\\x00\\x01"),
    ],
    ids=["s3_error_xml", "svg", "json", "text_starting_BM", "zip", "video", "png_signature_only", "binary"],
)
def test_what_a_non_image_is_called(data, message):
    with pytest.raises(ImageDecodeError, match=message):
        decode_image(data)


# The job over a bucket ---------------------------------------------------------------------------


def _snapshot(fs, bucket: str) -> dict[str, str]:
    """Every key of the bucket and the SHA-256 of its bytes (one listing, no cache)."""
    fs.invalidate_cache()
    return {path.split("/", 1)[1]: hashlib.sha256(fs.cat_file(path)).hexdigest() for path in fs.find(bucket)}


def _rows(con, sql: str) -> list[tuple]:
    return con.sql(sql).fetchall()


def assert_rows_match_corpus(con, uri_of: dict[str, Case]) -> None:
    """Every image in once, with the status, size and message its case expects; instances only
    for ok images, and as many as their ``images`` row says, with masks of the image's size."""
    rows = _rows(con, "SELECT image_uri, status, width, height, instances, error FROM images")
    assert sorted(r[0] for r in rows) == sorted(uri_of), "images in must be rows in images, each once"
    for uri, status, width, height, instances, message in rows:
        case = uri_of[uri]
        if case.error is None:
            assert (status, (width, height), message) == ("ok", case.size, None), case.key
        else:
            assert (status, width, height, instances) == ("error", None, None, 0), case.key
            assert message and re.search(case.error, message), f"{case.key}: {message}"
    per_image = _rows(con, """
        SELECT i.image_uri, i.instances, count(n.image_uri), i.width, i.height,
               bool_and(n.mask_width = i.width AND n.mask_height = i.height)
        FROM images i LEFT JOIN instances n USING (image_uri)
        GROUP BY i.image_uri, i.instances, i.width, i.height""")
    for uri, instances, counted, width, height, masks_fit in per_image:
        assert instances == counted, uri
        assert counted == 0 or masks_fit, f"{uri}: a mask of another size than its image ({width}x{height})"
    assert not _rows(con, "SELECT image_uri FROM instances "
                          "WHERE image_uri NOT IN (SELECT image_uri FROM images WHERE status = 'ok')")
    assert _rows(con, "SELECT count(*) FROM instances")[0][0] > 0, "the model detected nothing: the instance checks were empty"


@pytest.mark.slow
def test_job_over_the_corpus_in_a_bucket(ray_local, s3, weights_path):
    fs = s3.filesystem()
    for case in CORPUS:
        fs.pipe(f"{s3.name}/in/{case.key}", case.data)
    for key, make in SKIPPED.items():
        fs.pipe(f"{s3.name}/in/{key}", make())
    for key, data in decoys().items():
        fs.pipe(f"{s3.name}/{key}", data)
    before = _snapshot(fs, s3.name)
    assert len(before) == len(CORPUS) + len(SKIPPED) + len(decoys())  # every odd key was stored as it is

    # Shards of 8 images, batches of 2: broken files share shards and batches with good ones.
    summary = run_segment(SegmentJob(s3.url("in"), s3.url("out"), str(weights_path), s3.storage_options, batch_size=2,
                                     shard_size=8, progress=False))

    errors = sum(c.error is not None for c in CORPUS)
    assert summary.complete and summary.shards == summary.shards_run == -(-len(CORPUS) // 8)
    assert (summary.images, summary.errors, summary.images_run) == (len(CORPUS), errors, len(CORPUS))
    con = connect(s3.url("out"), s3.storage_options)
    assert_rows_match_corpus(con, {s3.url("in", c.key): c for c in CORPUS})
    assert summary.instances == _rows(con, "SELECT count(*) FROM instances")[0][0]
    out_fs, out_path = open_url(s3.url("out"), s3.storage_options)
    manifest = Manifest.read(out_fs, out_path)
    assert manifest.status == "complete" and manifest.plan["skipped_files"] == len(SKIPPED)
    assert manifest.totals["images"] == len(CORPUS) and manifest.totals["errors"] == errors

    # Nothing was changed or added outside the output prefix: the input and the decoys are as
    # they were, and every new key is one of the output's own files.
    after = _snapshot(fs, s3.name)
    assert {k: v for k, v in after.items() if k in before} == before
    new = sorted(set(after) - set(before))
    own = re.compile(r"out/(_manifest\.json|_plan\.parquet|_done/shard-\d{6}\.json|(images|instances)/part-\d{6}\.parquet)")
    assert new and all(own.fullmatch(k) for k in new), [k for k in new if not own.fullmatch(k)]
    assert sum(k.startswith("out/_done/") for k in new) == summary.shards


@pytest.mark.slow
def test_job_over_the_corpus_in_a_local_folder(ray_local, weights_path, tmp_path):
    """The cases whose keys a disk can hold as they are (unicode, spaces, tabs, ``?``, ``#``,
    ``%``, glob characters, a 250-byte name), from a folder: the same rows."""
    cases = [c for c in CORPUS if is_local_name(c.key)]
    cases.append(Case("names/" + "n" * 246 + ".jpg", jpeg(50, 16), size=(50, 16)))  # a 250-byte file name
    folder = tmp_path / "in"
    for case in cases:
        (folder / case.key).parent.mkdir(parents=True, exist_ok=True)
        (folder / case.key).write_bytes(case.data)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}

    summary = run_segment(SegmentJob(str(folder), str(tmp_path / "out"), str(weights_path), batch_size=2, shard_size=8,
                                     progress=False))

    assert summary.complete and summary.images == len(cases)
    con = connect(str(tmp_path / "out"))
    assert_rows_match_corpus(con, {_local_uri(folder, c.key): c for c in cases})
    after = {p for p in tmp_path.rglob("*") if p.is_file()}
    assert all(p.read_bytes() == data for p, data in before.items())
    assert all(p in before or (tmp_path / "out") in p.parents for p in after)


def _local_uri(folder, key: str) -> str:
    """The image_uri of a local file: fsspec's ``file://`` and the path as it is (not percent-encoded)."""
    return f"file://{folder}/{key}"


# A key with "::" -----------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["local", "s3"])
def test_key_with_double_colon_is_read_as_it_is(where, weights_path, tmp_path, request, monkeypatch):
    """``photo::1.jpg`` (a colon pair is legal in S3 keys and file names: times, IPv6
    addresses) must be read as itself, not as ``photo`` beside it."""
    from maskray.pipeline import retry as retry_module
    from maskray.pipeline.segment import worker as worker_module
    from maskray.pipeline.segment.listing import list_images
    from maskray.pipeline.segment.plan import Shard
    from maskray.pipeline.weights import Weights

    monkeypatch.setattr(retry_module, "STORAGE_RETRY", retry_module.RetryPolicy(retry_module.STORAGE_RETRY.attempts, first_wait=0.0))
    files = {"photo::1.jpg": jpeg(40, 30), "photo": jpeg(99, 77)}  # "photo" has no image extension: not listed
    if where == "s3":
        s3 = request.getfixturevalue("s3")
        for name, data in files.items():
            s3.filesystem().pipe(f"{s3.name}/in/{name}", data)
        source, options = s3.url("in"), s3.storage_options
    else:
        for name, data in files.items():
            (tmp_path / "in").mkdir(exist_ok=True)
            (tmp_path / "in" / name).write_bytes(data)
        source, options = str(tmp_path / "in"), None
    uris = list_images(source, options).uris
    assert [u.rsplit("/", 1)[1] for u in uris] == ["photo::1.jpg"]
    data = weights_path.read_bytes()
    worker = worker_module.ShardWorker(Weights("w", hashlib.sha256(data).hexdigest(), data), str(tmp_path / "out"), options)
    try:
        summary = worker.process(Shard(0, 0, tuple(uris)))
    finally:
        worker.close()
    assert summary["errors"] == 0
    assert _rows(connect(str(tmp_path / "out")), "SELECT width, height FROM images") == [(40, 30)]


def test_key_starting_with_a_slash(s3, weights_path, tmp_path):
    """An S3 key may start with '/' (``s3://bucket//photo.jpg``); listed from the bucket's root,
    it is read as itself, not as ``photo.jpg`` beside it."""
    from maskray.pipeline.segment import worker as worker_module
    from maskray.pipeline.segment.listing import list_images
    from maskray.pipeline.segment.plan import Shard
    from maskray.pipeline.weights import Weights

    fs = s3.filesystem()
    fs.call_s3("put_object", Bucket=s3.name, Key="/photo.jpg", Body=jpeg(40, 30))  # s3fs's pipe would drop the '/'
    fs.pipe(f"{s3.name}/photo.jpg", jpeg(99, 77))
    uris = list_images(s3.url(), s3.storage_options).uris
    assert uris == [f"s3://{s3.name}//photo.jpg", f"s3://{s3.name}/photo.jpg"]
    data = weights_path.read_bytes()
    weights = Weights("w", hashlib.sha256(data).hexdigest(), data)
    worker = worker_module.ShardWorker(weights, str(tmp_path / "out"), s3.storage_options)
    try:
        summary = worker.process(Shard(0, 0, tuple(uris)))
    finally:
        worker.close()
    assert summary["errors"] == 0
    rows = _rows(connect(str(tmp_path / "out")), "SELECT image_uri, width, height FROM images ORDER BY image_id")
    assert rows == [(uris[0], 40, 30), (uris[1], 99, 77)]
