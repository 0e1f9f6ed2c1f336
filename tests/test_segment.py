"""The segmentation job end to end with real parts: a bucket on the loopback S3 server, a
local Ray cluster on 127.0.0.1, the output read back with DuckDB and pyarrow, and the masks
compared with what the same model returns when called directly (the oracle), decoded with
pycocotools. Then the hard cases: rerun, resume after the driver is killed, an actor killed
mid-shard, a second node, and input that fails fast."""

import hashlib
import io
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from maskray.model import MaskRCNN, MaskRCNNConfig
from maskray.pipeline.decode import decode_image
from maskray.pipeline.errors import JobError, StorageError
from maskray.pipeline.results.query import connect, open_table
from maskray.pipeline.segment.job import run_segment
from maskray.pipeline.segment.plan import Plan
from maskray.pipeline.segment.settings import SegmentJob
from maskray.pipeline.storage import open_url
from maskray.pipeline.weights import Weights, build_model

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("__background__", "disc", "box", "wedge")
BROKEN = {"broken/empty.jpg": b"", "broken/text.jpg": b"<html>404 not found</html>", "broken/cut.png": None}


def sample_image(index: int) -> bytes:
    """A textured image with a few filled shapes; sizes and formats vary with ``index``."""
    rng = np.random.default_rng(index)
    height, width = (96, 128) if index % 3 else (120, 90)
    image = Image.fromarray(rng.integers(0, 80, (height, width, 3), dtype=np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x, y = rng.integers(0, width - 30), rng.integers(0, height - 30)
        colour = tuple(int(c) for c in rng.integers(120, 256, 3))
        draw.ellipse([x, y, x + 28, y + 24], fill=colour) if rng.random() < 0.5 else draw.rectangle([x, y, x + 25, y + 20], fill=colour)
    buffer = io.BytesIO()
    image.save(buffer, "PNG" if index % 2 else "JPEG")
    return buffer.getvalue()


def sample_files(count: int) -> dict[str, bytes]:
    files = {f"img/{i:03d}.{'png' if i % 2 else 'jpg'}": sample_image(i) for i in range(count)}
    cut = sample_image(1)
    return {**files, **{k: (v if v is not None else cut[: len(cut) // 2]) for k, v in BROKEN.items()}}


@pytest.fixture(scope="module")
def weights_path(tmp_path_factory) -> Path:
    """An untrained light model (seeded): its random detections are what the oracle checks."""
    torch.manual_seed(0)
    config = MaskRCNNConfig.light(num_classes=4, class_names=CLASSES, min_size=(128,), max_size=160, box_detections_per_img=12)
    path = tmp_path_factory.mktemp("weights") / "light.pt"
    MaskRCNN(config).save(path)
    return path


def write_local(folder: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return folder


def expected_detections(weights_path: Path, output_url: str, storage_options: dict | None, batch_size: int) -> dict[str, dict]:
    """The oracle: the model called directly, image by image in the job's batches (each shard's
    decodable images in order, ``batch_size`` at a time, as the job batches them)."""
    data = weights_path.read_bytes()
    model = build_model(Weights("w", hashlib.sha256(data).hexdigest(), data))
    fs, output = open_url(output_url, storage_options)
    plan = Plan(fs, output)
    results = {}
    for shard in plan.shards():
        images = []
        for uri in shard.uris:
            ifs, path = open_url(uri, storage_options if uri.startswith("s3://") else None)
            try:
                images.append((uri, decode_image(ifs.cat_file(path))))
            except ValueError:
                continue
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            for (uri, _), result in zip(chunk, model([t for _, t in chunk])):
                results[uri] = result
    return results


def assert_output_matches_model(con, expected: dict[str, dict]) -> None:
    rows = con.sql("SELECT * FROM instances ORDER BY image_uri, instance").fetchall()
    columns = con.sql("SELECT * FROM instances LIMIT 0").columns
    by_image: dict[str, list[dict]] = {}
    for row in rows:
        record = dict(zip(columns, row))
        by_image.setdefault(record["image_uri"], []).append(record)
    assert set(by_image) <= set(expected)
    total = 0
    for uri, result in expected.items():
        got = by_image.get(uri, [])
        assert len(got) == len(result["labels"]), uri
        total += len(got)
        for i, record in enumerate(got):
            assert record["instance"] == i
            assert record["label"] == int(result["labels"][i]) and record["label_name"] == CLASSES[record["label"]]
            assert record["score"] == pytest.approx(float(result["scores"][i]), abs=1e-6)
            box = [record[k] for k in ("box_x1", "box_y1", "box_x2", "box_y2")]
            assert box == pytest.approx(result["boxes"][i].tolist(), abs=1e-4)
            assert record["mask_counts"] == result["masks"][i]["counts"]
            rle = {"size": [record["mask_height"], record["mask_width"]], "counts": record["mask_counts"].encode()}
            decoded = mask_utils.decode(rle)  # pycocotools reads our strings as they are
            assert decoded.sum() == record["area"] == int(mask_utils.area(rle))
    assert total > 0, "the oracle model detected nothing: the comparison would be empty"


def scalar(con, sql: str):
    return con.sql(sql).fetchall()[0][0]


def read_everything(fs, root: str) -> bytes:
    return b"".join(fs.cat_file(p) for p in sorted(fs.find(root)))


def test_job_over_s3_bucket(ray_local, s3, weights_path):
    files = sample_files(9)
    fs = s3.filesystem()
    for name, data in files.items():
        fs.pipe(f"{s3.name}/in/{name}", data)
    fs.pipe(f"{s3.name}/in/README.md", b"not an image name: skipped")
    # fp32: the oracle's rows are equal to the job's whatever this CPU is (auto picks bf16 on some).
    job = SegmentJob(s3.url("in"), s3.url("out"), str(weights_path), s3.storage_options, batch_size=2, shard_size=4,
                     progress=False, precision="fp32")
    summary = run_segment(job)

    assert summary.complete and summary.shards == 3 and summary.shards_run == 3
    assert (summary.images, summary.errors) == (len(files), len(BROKEN))
    con = connect(s3.url("out"), s3.storage_options)
    # Every input image exactly once in `images`.
    assert sorted(r[0] for r in con.sql("SELECT image_uri FROM images").fetchall()) == sorted(s3.url("in", n) for n in files)
    errors = dict(con.sql("SELECT image_uri, error FROM images WHERE status = 'error'").fetchall())
    assert "empty file" in errors[s3.url("in", "broken/empty.jpg")]
    assert "not an image" in errors[s3.url("in", "broken/text.jpg")]
    assert "cannot decode PNG" in errors[s3.url("in", "broken/cut.png")]
    sizes = dict(((u, (w, h)) for u, w, h in con.sql("SELECT image_uri, width, height FROM images WHERE status = 'ok'").fetchall()))
    assert sizes[s3.url("in", "img/000.jpg")] == (90, 120) and sizes[s3.url("in", "img/001.png")] == (128, 96)
    assert scalar(con, "SELECT sum(instances) FROM images") == summary.instances == scalar(con, "SELECT count(*) FROM instances")

    assert_output_matches_model(con, expected_detections(weights_path, s3.url("out"), s3.storage_options, batch_size=2))
    # pyarrow reads the same rows.
    assert open_table(s3.url("out"), "instances", s3.storage_options).count_rows() == summary.instances

    # The manifest says what made the output; no credential anywhere in it.
    from maskray.pipeline.segment.manifest import Manifest

    out_fs, out_path = open_url(s3.url("out"), s3.storage_options)
    manifest = Manifest.read(out_fs, out_path)
    assert manifest.status == "complete" and manifest.totals["images"] == len(files)
    assert manifest.weights["sha256"] == hashlib.sha256(weights_path.read_bytes()).hexdigest()
    everything = read_everything(out_fs, out_path)
    for secret in (s3.storage_options["key"], s3.storage_options["secret"]):
        assert secret.encode() not in everything

    # A rerun finds every shard done and writes nothing.
    before = {p: out_fs.info(p)["ETag"] for p in out_fs.find(out_path) if "_manifest" not in p}
    again = run_segment(job)
    assert again.shards_run == 0 and again.images == summary.images
    assert {p: out_fs.info(p)["ETag"] for p in out_fs.find(out_path) if "_manifest" not in p} == before

    # The same output with another job's settings is refused.
    with pytest.raises(JobError, match="different job .*box_score_thresh"):
        run_segment(SegmentJob(s3.url("in"), s3.url("out"), str(weights_path), s3.storage_options, shard_size=4, score_threshold=0.9, progress=False))


def test_fails_fast_before_any_work(s3, weights_path, tmp_path):
    options = s3.storage_options
    s3.filesystem().pipe(f"{s3.name}/in/a.jpg", sample_image(0))
    cases = [
        (SegmentJob("s3://no-such-bucket-maskray/in", s3.url("out"), str(weights_path), options), StorageError, "bucket 'no-such-bucket-maskray' does not exist"),
        (SegmentJob(s3.url("in"), "s3://no-such-bucket-maskray/out", str(weights_path), options), StorageError, "does not exist"),
        (SegmentJob(s3.url("absent"), s3.url("out"), str(weights_path), options), StorageError, "no such file or prefix"),
        (SegmentJob(s3.url("in"), s3.url("out"), str(tmp_path / "none.pt"), options), FileNotFoundError, "--weights .*none.pt: no such file"),
        (SegmentJob(s3.url("in"), s3.url("out"), __file__, options), ValueError, "--weights .*test_segment.py: not a loadable weights file"),
        (SegmentJob(s3.url("in"), s3.url("out"), str(weights_path), options, batch_size=0), ValueError, "batch_size must be at least 1"),
    ]
    import ray

    started = ray.is_initialized()
    for job, error, message in cases:
        with pytest.raises(error, match=message) as raised:
            run_segment(job)
        assert options["secret"] not in str(raised.value)
    assert not s3.filesystem().exists(f"{s3.name}/out")  # nothing was written
    assert ray.is_initialized() == started  # and no cluster was started for it


def test_empty_input_is_an_error(tmp_path, weights_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "notes.txt").write_text("x")
    with pytest.raises(JobError, match="no images found .1 other files skipped"):
        run_segment(SegmentJob(str(tmp_path / "in"), str(tmp_path / "out"), str(weights_path), progress=False))


def test_a_read_that_keeps_failing_fails_the_shard_uncommitted(weights_path, tmp_path, monkeypatch):
    """An image that is gone is an error row (final); storage that keeps failing is not the
    image's fault, so its shard raises and stays uncommitted, to be retried or rerun."""
    from maskray.pipeline import retry as retry_module
    from maskray.pipeline.segment import worker as worker_module
    from maskray.pipeline.segment.listing import list_images
    from maskray.pipeline.segment.output import finished_shards
    from maskray.pipeline.segment.plan import Shard

    monkeypatch.setattr(retry_module, "STORAGE_RETRY", retry_module.RetryPolicy(retry_module.STORAGE_RETRY.attempts, first_wait=0.0))
    folder = write_local(tmp_path / "in", {"a.png": sample_image(1)})
    good = list_images(str(folder / "a.png")).uris[0]
    gone = good.replace("a.png", "gone.png")
    unreachable = "http://127.0.0.1:9/b.png"  # nothing listens there: connection refused, every time
    data = weights_path.read_bytes()
    out_fs, output = open_url(str(tmp_path / "out"))
    worker = worker_module.ShardWorker(Weights("w", hashlib.sha256(data).hexdigest(), data), str(tmp_path / "out"))
    try:
        summary = worker.process(Shard(0, 0, (good, gone)))
        assert (summary["images"], summary["errors"]) == (2, 1)
        with pytest.raises(worker_module.ShardReadError, match=r"127.0.0.1:9/b.png: the storage endpoint cannot be reached.*4 attempts"):
            worker.process(Shard(1, 2, (good, unreachable)))
    finally:
        worker.close()
    assert finished_shards(out_fs, output) == {0}
    assert sorted(p.name for p in (tmp_path / "out").rglob("*.parquet")) == ["part-000000.parquet"] * 2
    con = connect(str(tmp_path / "out"))
    assert con.sql("SELECT status, error FROM images WHERE image_id = 1").fetchall()[0][0] == "error"
    assert "does not exist" in con.sql("SELECT error FROM images WHERE image_id = 1").fetchall()[0][0]


# Resume and faults ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_input(tmp_path_factory) -> Path:
    return write_local(tmp_path_factory.mktemp("input"), sample_files(24))


@pytest.fixture(scope="module")
def reference_output(tmp_path_factory, local_input, weights_path):
    """An undisturbed run over ``local_input``: what every disturbed run must equal."""
    import ray

    if not ray.is_initialized():
        from tests.services import RAY_TEST_OPTIONS

        ray.init(address="local", **RAY_TEST_OPTIONS)
    output = tmp_path_factory.mktemp("reference") / "out"
    run_segment(SegmentJob(str(local_input), str(output), str(weights_path), shard_size=2, progress=False))
    return output


def assert_same_rows(output: Path, reference: Path) -> None:
    """The same rows in both outputs (DuckDB, both ways), and no image twice."""
    con = connect(str(output))
    ref = connect(str(reference))
    for table in ("instances", "images"):
        ours = con.sql(f"SELECT * FROM {table}").fetchall()
        theirs = ref.sql(f"SELECT * FROM {table}").fetchall()
        assert sorted(ours, key=repr) == sorted(theirs, key=repr), table
    assert scalar(con, "SELECT count(*) FROM (SELECT image_uri FROM images GROUP BY 1 HAVING count(*) > 1)") == 0
    assert scalar(con, "SELECT count(*) FROM (SELECT image_uri, instance FROM instances GROUP BY 1, 2 HAVING count(*) > 1)") == 0


def assert_only_whole_parts(output: Path, finished: bool = True) -> None:
    """Every shard with a done-marker has both part files and every part file reads as Parquet;
    once the job has ``finished``, no temporary file of an interrupted write is left either."""
    import pyarrow.parquet as pq

    for marker in (output / "_done").glob("shard-*.json") if (output / "_done").exists() else ():
        part = marker.name.replace("shard-", "part-").replace(".json", ".parquet")
        for table in ("instances", "images"):
            pq.read_metadata(output / table / part)
    for part in output.rglob("*.parquet"):
        pq.read_table(part)
    if finished:
        assert not [p for p in output.rglob("*") if p.name.endswith(".tmp")]


def done_markers(output: Path) -> int:
    return len(list((output / "_done").glob("*.json"))) if (output / "_done").exists() else 0


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_resume_after_driver_killed(ray_local, local_input, reference_output, weights_path, tmp_path):
    output = tmp_path / "out"
    address = ray_local.get_runtime_context().gcs_address
    command = [sys.executable, str(ROOT / "jobs" / "segment.py"), str(local_input), str(output), "--weights", str(weights_path),
               "--shard-size", "2", "--address", address, "--no-progress"]
    driver = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        wait_for(lambda: len(list((output / "_done").glob("*.json"))) >= 3 if (output / "_done").exists() else driver.poll() is not None,
                 120, "the first shards")
        assert driver.poll() is None, driver.stderr.read().decode()
        os.killpg(driver.pid, signal.SIGKILL)  # mid-job, with shards in flight
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    done_before = {p.name for p in (output / "_done").glob("*.json")}
    total_shards = 14  # 27 images (24 + 3 broken), 2 per shard
    assert 3 <= len(done_before) < total_shards
    # The part files of the shards done before the kill, as they are (a rewrite makes a new inode).
    parts_before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for name in done_before for table in ("instances", "images")
                    for p in [output / table / name.replace("shard-", "part-").replace(".json", ".parquet")]}
    # What a writer killed between writing and renaming leaves (the kill above may or may not have
    # hit that moment): the rerun removes it.
    (output / "images" / f".part-000013.parquet.{'0123abcd' * 4}.tmp").write_bytes(b"PAR1 cut short")
    summary = run_segment(SegmentJob(str(local_input), str(output), str(weights_path), shard_size=2, progress=False))
    # The killed driver's actors may commit a shard or two more before Ray stops them.
    assert summary.complete and summary.shards == total_shards
    assert 1 <= summary.shards_run <= total_shards - len(done_before)
    # The finished shards were skipped: not one of their files was written again.
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in parts_before} == parts_before
    assert_same_rows(output, reference_output)
    assert_only_whole_parts(output)


def test_actor_killed_mid_shard(ray_local, local_input, reference_output, weights_path, tmp_path):
    import ray

    output = tmp_path / "out"
    job = SegmentJob(str(local_input), str(output), str(weights_path), shard_size=2, progress=False)
    outcome = {}
    runner = threading.Thread(target=lambda: outcome.setdefault("summary", run_segment(job)))
    runner.start()
    try:
        def our_actor():
            names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("maskray-segment-")]
            return names[0] if names else None

        wait_for(lambda: done_markers(output) >= 2, 120, "two shards")
        actor = ray.get_actor(our_actor())
        os.kill(ray.get(actor.pid.remote()), signal.SIGKILL)  # mid-shard: it has two in flight
        # While the shard is redone, whatever is visible is whole: a marker only with both of its
        # parts, every part a readable Parquet file.
        while runner.is_alive():
            assert_only_whole_parts(output, finished=False)
            runner.join(timeout=0.2)
    finally:
        runner.join(timeout=300)
    summary = outcome["summary"]
    assert summary.complete and summary.retries >= 1 and summary.actors_lost == 1
    assert_same_rows(output, reference_output)
    assert_only_whole_parts(output)


def test_runs_on_a_second_node(ray_cluster, local_input, weights_path, tmp_path):
    """The head node has no CPUs: every shard must run on the added node, which loads the
    compiled ops and the model there."""
    import ray

    worker_node = ray_cluster.add_node(num_cpus=2, node_ip_address="127.0.0.1")
    ray.init(address=ray_cluster.address)
    ray_cluster.wait_for_nodes()
    summary = run_segment(SegmentJob(str(local_input / "img"), str(tmp_path / "out"), str(weights_path), shard_size=8, progress=False))
    assert summary.complete and summary.images == 24
    assert summary.nodes == {worker_node.node_id}
    ray.shutdown()


# The command line ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        (["segment", "in"], "the following arguments are required: OUTPUT"),
        (["segment", "in", "out", "--precision", "fp8"], "--precision: invalid choice: 'fp8'"),
        # Out of range (--batch-size 0) is SegmentJob.validate's to say: tests/test_cli.py.
        (["segment", "in", "out", "--weights", "w", "--batch-size", "two"], "--batch-size: invalid int value: 'two'"),
        (["segment", "in", "out", "--weights", "w", "--score-threshold", "high"],
         "--score-threshold: invalid float value"),
        (["segment", "in", "out", "--weights", "w", "--storage-options", '{"secret": "hunter22'], "--storage-options: not valid JSON"),
        (["segment", "in", "out", "--weights", "w", "--storage-options", "[1]"], "must be a JSON object"),
        (["show", "out", "a.png", "-o", "x.png", "--scale", "0"], "--scale: must be a positive number, got 0"),
        (["demo", "--images", "0"], "--images: must be at least 1"),
    ],
)
def test_bad_arguments(argv, message, capsys):
    from maskray.jobs.cli import main

    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and "hunter22" not in err


def test_cli_segment_query_show(ray_local, local_input, weights_path, tmp_path, capsys):
    from maskray.jobs.cli import main

    output = tmp_path / "out"
    # A glob input: the 24 images under img/ (the broken files are beside it, in broken/).
    assert main(["segment", str(local_input / "img" / "*"), str(output), "--weights", str(weights_path), "--shard-size", "12",
                 "--no-progress"]) == 0
    assert "24 images (0 errors)" in capsys.readouterr().out
    assert main(["query", str(output), "SELECT count(*) AS n FROM images WHERE status = 'ok'", "--csv"]) == 0
    assert capsys.readouterr().out.splitlines() == ["n", "24"]
    assert main(["show", str(output), "img/001.png", "-o", str(tmp_path / "o.png")]) == 0
    assert Image.open(tmp_path / "o.png").size == (128 * 5, 96 * 5)  # small images are enlarged
    assert main(["show", str(output), "img/001.png", "-o", str(tmp_path / "o.png"), "--scale", "1"]) == 0
    assert Image.open(tmp_path / "o.png").size == (128, 96)
    assert main(["show", str(output), "img/absent.png", "-o", str(tmp_path / "x.png")]) == 2
    assert "no image 'img/absent.png'" in capsys.readouterr().err
    assert main(["segment", str(tmp_path / "nothing"), str(output), "--weights", str(weights_path)]) == 2
    assert "no such file or prefix" in capsys.readouterr().err
