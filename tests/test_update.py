"""Incremental runs over a growing input (``maskray segment --update``), with real parts: a bucket on
the loopback S3 server and local folders, a local Ray cluster on 127.0.0.1, the output read back
with DuckDB.

An update lists the input again and plans the images that are not in the plan yet as a new
generation of it (new shards, numbered on); committed shards are not touched, images gone from
the input keep their rows, and RELIABILITY.md's guarantees hold for it: an update killed at any
point and run again gives the rows of an undisturbed update, none twice, in one generation; an
update with nothing new writes nothing. Without ``--update`` a rerun over a grown input says how
many new images it leaves out. The comparison of a listing with the plan is measured against a
Python set at a CI size (bench/update.py, whose figures are for a million keys).
"""

import dataclasses
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from maskray.pipeline.results.query import connect, output_progress
from maskray.pipeline.segment.job import run_segment
from maskray.pipeline.segment.manifest import Manifest
from maskray.pipeline.segment.plan import GENERATIONS
from maskray.pipeline.segment.settings import SegmentJob
from maskray.pipeline.storage import open_url, public_url
from tests.test_segment import (  # noqa: F401 - weights_path is a fixture
    assert_only_whole_parts,
    assert_same_rows,
    done_markers,
    sample_image,
    scalar,
    wait_for,
    weights_path,
    write_local,
)

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
FIRST, ADDED = 6, 20  # images before and after the input grows; shards of 2: 3 shards, then 10 more
SHARD_SIZE = 2
GENERATION_1 = f"{GENERATIONS}/plan-000001.parquet"


class Killed(BaseException):
    """A kill at a chosen point of the driver: nothing of maskray catches it, as nothing can catch SIGKILL."""


def first_files() -> dict[str, bytes]:
    return {f"img/{i:03d}.{'png' if i % 2 else 'jpg'}": sample_image(i) for i in range(FIRST)}


def added_files() -> dict[str, bytes]:
    # Names before, among and after the first ones: the new generation is not a tail of the old order.
    names = [f"img/{i:03d}b.png" for i in range(ADDED // 2)] + [f"new/{i:03d}.jpg" for i in range(ADDED - ADDED // 2)]
    names[0] = "a-first.jpg"
    return {name: sample_image(100 + i) for i, name in enumerate(names)}


def job(input_folder, output, weights, **changes) -> SegmentJob:
    return SegmentJob(str(input_folder), str(output), str(weights), shard_size=SHARD_SIZE, progress=False, **changes)


def stamps(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file below ``folder`` with its inode and mtime: a rewrite changes them."""
    return {str(p.relative_to(folder)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def grown(tmp_path_factory, weights_path):  # noqa: F811
    """An output of the first images (``base``, to be copied), the input grown since, and an
    undisturbed update of a copy of ``base`` (``reference``): what every disturbed update must equal."""
    import ray

    if not ray.is_initialized():
        from maskray.pipeline.cluster import loopback_only
        from tests.services import RAY_TEST_OPTIONS

        loopback_only()
        ray.init(address="local", **RAY_TEST_OPTIONS)
    root = tmp_path_factory.mktemp("grown")
    folder = write_local(root / "in", first_files())
    base = root / "base"
    first = run_segment(job(folder, base, weights_path))
    assert first.complete and first.shards == FIRST // SHARD_SIZE
    write_local(folder, added_files())
    reference = root / "reference"
    shutil.copytree(base, reference)
    summary = run_segment(job(folder, reference, weights_path, update=True))
    assert summary.complete and summary.images_added == ADDED and summary.shards_added == ADDED // SHARD_SIZE
    return {"input": folder, "base": base, "reference": reference, "summary": summary}


def copy_of_base(grown, tmp_path) -> tuple[Path, dict[str, tuple[int, int]]]:
    output = tmp_path / "out"
    shutil.copytree(grown["base"], output)
    return output, stamps(output)


def assert_same_update(output: Path, reference: Path) -> None:
    """The rows of the reference's update, none twice, in one new generation, and a manifest whose
    plan says so."""
    assert_same_rows(output, reference)
    assert_only_whole_parts(output)
    assert sorted(p.name for p in (output / GENERATIONS).iterdir()) == ["plan-000001.parquet"]
    fs, path = open_url(str(output))
    ours, theirs = Manifest.read(fs, path), Manifest.read(*open_url(str(reference)))
    assert ours.status == "complete" and ours.totals == theirs.totals
    for key in ("num_images", "num_shards", "generations"):
        assert ours.plan[key] == theirs.plan[key], key
    assert ours.plan["num_images"] == FIRST + ADDED and ours.plan["num_shards"] == (FIRST + ADDED) // SHARD_SIZE
    progress = output_progress(str(output))
    assert progress.finished and progress.shards == (FIRST + ADDED) // SHARD_SIZE


def test_the_python_api_keeps_its_positions_and_update_is_last():
    names = [f.name for f in dataclasses.fields(SegmentJob)]
    assert names[-1] == "update" and names.index("precision") == len(names) - 2
    positional = SegmentJob("in", "out", "w.pt", {}, 3, 5)
    assert (positional.batch_size, positional.shard_size, positional.update) == (3, 5, False)


def test_update_over_a_growing_bucket(ray_local, s3, weights_path, caplog):  # noqa: F811
    """The bucket gains three images and loses one: a rerun says so and leaves them out, an
    update adds them as two new shards without touching the committed ones, the gone image keeps
    its rows, the totals (manifest, output_progress, DuckDB) count all of them, and an update with
    nothing new writes nothing."""
    fs = s3.filesystem()
    for i in range(5):
        fs.pipe(f"{s3.name}/in/img/{i:03d}.png", sample_image(i))
    segment = SegmentJob(s3.url("in"), s3.url("out"), str(weights_path), s3.storage_options, shard_size=2, progress=False)
    first = run_segment(segment)
    assert first.complete and (first.shards, first.images) == (3, 5)
    out_fs, out_path = open_url(s3.url("out"), s3.storage_options)

    def objects() -> dict[str, tuple[str, object]]:
        out_fs.invalidate_cache()
        return {p: (out_fs.info(p)["ETag"], out_fs.info(p)["LastModified"]) for p in out_fs.find(out_path)}

    for i in range(5, 8):
        fs.pipe(f"{s3.name}/in/img/{i:03d}.png", sample_image(i))
    fs.rm(f"{s3.name}/in/img/001.png")
    committed = objects()

    # Without --update: the new images are counted and left out; nothing is written.
    with caplog.at_level(logging.WARNING, logger="maskray.segment"):
        again = run_segment(segment)
    said = f"3 new images in {s3.url('in')} are not in this output's plan; add them with --update"
    assert said in caplog.text and said in again.describe()
    assert (again.new_images_ignored, again.shards_run, again.shards, again.images) == (3, 0, 3, 5)
    assert objects() == committed

    # --update: two new shards (3 images), numbered on; the committed shards' objects as they were.
    updated = run_segment(dataclasses.replace(segment, update=True))
    assert updated.complete and (updated.images_added, updated.shards_added, updated.images_gone) == (3, 2, 1)
    assert (updated.shards, updated.shards_run, updated.images, updated.new_images_ignored) == (5, 2, 8, 0)
    assert "update: 3 new images in 2 new shards; 1 planned image no longer in the input keeps its rows" in updated.describe()
    now = objects()
    assert {p: v for p, v in now.items() if p in committed and not p.endswith("_manifest.json")} == {
        p: v for p, v in committed.items() if not p.endswith("_manifest.json")}
    assert f"{out_path}/{GENERATION_1}" in now
    for shard in (3, 4):
        assert f"{out_path}/_done/shard-{shard:06d}.json" in now
    con = connect(s3.url("out"), s3.storage_options)
    rows = con.sql("SELECT image_id, image_uri, status FROM images ORDER BY image_id").fetchall()
    assert [r[0] for r in rows] == list(range(8))
    assert [r[1] for r in rows] == [s3.url("in", f"img/{i:03d}.png") for i in range(8)]  # 001 (gone) keeps its row
    assert scalar(con, "SELECT count(*) FROM (SELECT image_uri FROM images GROUP BY 1 HAVING count(*) > 1)") == 0
    manifest = Manifest.read(out_fs, out_path)
    assert manifest.status == "complete" and manifest.totals["images"] == 8
    assert (manifest.plan["num_images"], manifest.plan["num_shards"], manifest.plan["generations"]) == (8, 5, 2)
    assert manifest.plan["last_update"]["new_images"] == 3 and manifest.plan["last_update"]["images_gone"] == 1
    assert manifest.plan["last_update"]["first_shard"] == 3
    progress = output_progress(s3.url("out"), s3.storage_options)
    assert progress.finished and (progress.shards, progress.committed) == (5, 5)
    for secret in (s3.storage_options["key"], s3.storage_options["secret"]):
        assert secret.encode() not in out_fs.cat_file(f"{out_path}/_manifest.json")

    # An update with nothing new writes nothing, not even the manifest.
    before = objects()
    nothing = run_segment(dataclasses.replace(segment, update=True))
    assert (nothing.images_added, nothing.shards_run, nothing.images) == (0, 0, 8)
    assert objects() == before


def test_a_rerun_without_update_says_what_it_leaves_out(grown, weights_path, tmp_path):  # noqa: F811
    """The command line over an output whose input has grown: one line on stderr at the start and
    in the summary, exit status 0, nothing written (a finished job starts no Ray at all)."""
    output, before = copy_of_base(grown, tmp_path)
    command = [sys.executable, str(ROOT / "jobs" / "segment.py"), str(grown["input"]), str(output), "--weights",
               str(weights_path), "--shard-size", str(SHARD_SIZE), "--no-progress"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    said = (f"{ADDED} new images in {public_url(job(grown['input'], output, weights_path).input)} are not in this "
            "output's plan; add them with --update")
    assert done.returncode == 0, done.stderr
    assert said in done.stderr and said in done.stdout and "Traceback" not in done.stderr
    assert "nothing to do: all 3 shards were already done" in done.stdout
    assert stamps(output) == before


def test_update_killed_mid_shards_and_run_again(ray_local, grown, weights_path, tmp_path):  # noqa: F811
    """The driver of an update killed with SIGKILL while the new generation's shards run: the
    same command finishes that generation (no second one), skips every committed shard without
    rewriting a file of it, and gives the undisturbed update's rows."""
    output, before = copy_of_base(grown, tmp_path)
    address = ray_local.get_runtime_context().gcs_address
    command = [sys.executable, str(ROOT / "jobs" / "segment.py"), str(grown["input"]), str(output), "--weights",
               str(weights_path), "--shard-size", str(SHARD_SIZE), "--address", address, "--no-progress", "--update"]
    driver = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    first_shards = FIRST // SHARD_SIZE
    try:
        wait_for(lambda: done_markers(output) >= first_shards + 2 or driver.poll() is not None, 180, "the new shards")
        assert driver.poll() is None, driver.stderr.read().decode()
        os.killpg(driver.pid, signal.SIGKILL)  # mid-update, with new shards in flight
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    total = (FIRST + ADDED) // SHARD_SIZE
    assert first_shards + 2 <= done_markers(output) < total
    generation = stamps(output / GENERATIONS)
    summary = run_segment(job(grown["input"], output, weights_path, update=True))
    assert summary.complete and summary.images_added == 0 and summary.shards == total
    assert 1 <= summary.shards_run <= total - first_shards - 2
    after = stamps(output)
    # The first run's files (its plan, parts and markers) and the generation, none rewritten.
    assert {k: after[k] for k in before if k != "_manifest.json"} == {k: v for k, v in before.items() if k != "_manifest.json"}
    assert stamps(output / GENERATIONS) == generation
    assert_same_update(output, grown["reference"])


@pytest.mark.parametrize("where", ["before its generation is written", "after its generation, before the manifest"])
def test_update_killed_around_writing_its_generation(ray_local, grown, weights_path, tmp_path, monkeypatch, where):  # noqa: F811
    """Killed before the new generation lands, an update leaves the plan and the manifest as they
    were (a writer's temporary file at most, removed by the next run); killed after, the generation
    is the plan's: readers count its shards at once, and a rerun, here without --update, runs them,
    where an update again would not add a second generation with the same images."""
    from maskray.pipeline.segment import manifest as manifest_module
    from maskray.pipeline.segment import plan as plan_module

    output, before = copy_of_base(grown, tmp_path)
    manifest_bytes = (output / "_manifest.json").read_bytes()
    if where.startswith("before"):
        def killed_write(fs, path, data):
            if GENERATIONS in path:
                (output / GENERATIONS).mkdir(exist_ok=True)  # what a writer killed before its rename leaves
                (output / GENERATIONS / f".plan-000001.parquet.{'0123abcd' * 4}.tmp").write_bytes(data[: len(data) // 2])
                raise Killed()
        monkeypatch.setattr(plan_module, "write_bytes_atomically", killed_write)
    else:
        def killed_write(self, fs, path):
            raise Killed()
        monkeypatch.setattr(manifest_module.Manifest, "write", killed_write)
    with pytest.raises(Killed):
        run_segment(job(grown["input"], output, weights_path, update=True))
    monkeypatch.undo()
    assert (output / "_manifest.json").read_bytes() == manifest_bytes
    assert {k: v for k, v in stamps(output).items() if not k.startswith(GENERATIONS + "/")} == before
    if where.startswith("before"):
        assert not (output / GENERATION_1).exists()
        assert output_progress(str(output)).shards == FIRST // SHARD_SIZE
        summary = run_segment(job(grown["input"], output, weights_path, update=True))
        assert summary.images_added == ADDED
    else:
        generation = stamps(output / GENERATIONS)
        assert list(generation) == ["plan-000001.parquet"]
        progress = output_progress(str(output))
        assert (progress.shards, progress.committed, progress.finished) == ((FIRST + ADDED) // SHARD_SIZE, FIRST // SHARD_SIZE, False)
        summary = run_segment(job(grown["input"], output, weights_path))  # no --update: the generation is the plan's
        assert summary.images_added == 0 and summary.new_images_ignored == 0
        assert stamps(output / GENERATIONS) == generation
    assert summary.complete and summary.shards_run == ADDED // SHARD_SIZE
    assert not [p for p in output.rglob("*.tmp")]
    assert_same_update(output, grown["reference"])
    again = stamps(output)
    assert run_segment(job(grown["input"], output, weights_path, update=True)).images_added == 0
    assert stamps(output) == again  # an update with nothing new writes nothing


def test_comparing_a_listing_with_the_plan_costs_a_few_bytes_a_key(tmp_path):
    """bench/update.py's merge against its Python-set peer, at 20,000 and 200,000 keys: the same
    new images found, the merge's memory a few bytes a listed key over the listing, and several
    times less than the set's."""
    sys.path.insert(0, str(ROOT))
    from bench import update as bench_update

    small = bench_update.measure(20_000, tmp_path / "small", ways=("merge", "set"))
    large = bench_update.measure(200_000, tmp_path / "large", ways=("merge", "set"))
    failures = bench_update.bound_failures(large, small)
    assert not failures, (failures, bench_update.figures(large))
    assert large["merge"]["new"] == large["merge"]["new_keys"] == 2000
