"""Listing, shard plan, part-file commits and the manifest: the pieces that make a job
deterministic and resumable, on a local folder and on the loopback S3 server."""

import io
import json
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from maskray.pipeline.errors import StorageError
from maskray.pipeline.segment.listing import list_images
from maskray.pipeline.segment.manifest import Manifest, identity_mismatch
from maskray.pipeline.segment.output import (
    IMAGES_SCHEMA,
    commit_shard,
    finished_shards,
    part_path,
    remove_interrupted_writes,
    table_to_parquet_bytes,
)
from maskray.pipeline.segment.plan import GENERATIONS, PLAN_FILE, Plan
from maskray.pipeline.storage import open_url, write_bytes_atomically
from tests.test_storage import _throttled, failing_first, no_waits  # noqa: F401 - no_waits is a fixture

NAMES = ["b/2.JPG", "a/1.png", "a/0.jpeg", "c.webp", "notes.txt", "d/e/f.tif", "x.gif", "y.bmp", "data.csv"]


@pytest.fixture
def folder(tmp_path):
    for name in NAMES:
        (tmp_path / "in" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "in" / name).write_bytes(b"x")
    return tmp_path / "in"


def test_prefix_listing_is_sorted_and_filtered(folder):
    listing = list_images(str(folder))
    images = sorted(n for n in NAMES if not n.endswith((".txt", ".csv")))
    assert listing.uris == [f"file://{folder}/{n}" for n in images]
    assert listing.skipped == 2
    assert list_images(str(folder) + "/").uris == listing.uris  # a trailing slash changes nothing


def test_glob_listing_takes_what_it_matches(folder):
    assert list_images(str(folder / "a" / "*")).uris == [f"file://{folder}/a/0.jpeg", f"file://{folder}/a/1.png"]
    assert list_images(str(folder / "*.txt")).uris == [f"file://{folder}/notes.txt"]  # asked for by name


def test_text_and_parquet_listings(folder, tmp_path):
    (tmp_path / "list.txt").write_text(f"# images\nin/a/1.png\n\n{folder}/c.webp\ns3://bucket/k.jpg\nin/a/1.png\n")
    expected = [f"file://{folder}/a/1.png", f"file://{folder}/c.webp", "s3://bucket/k.jpg"]
    assert list_images(str(tmp_path / "list.txt")).uris == sorted(expected)
    pq.write_table(pa.table({"uri": ["in/a/1.png", f"{folder}/c.webp", "s3://bucket/k.jpg"]}), tmp_path / "list.parquet")
    assert list_images(str(tmp_path / "list.parquet")).uris == sorted(expected)
    pq.write_table(pa.table({"name": ["a"]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="needs a column named one of"):
        list_images(str(tmp_path / "bad.parquet"))


def test_missing_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file, directory or prefix"):
        list_images(str(tmp_path / "absent"))


def test_listing_on_s3(s3):
    fs = s3.filesystem()
    for name in ["p/2.jpg", "p/1.png", "p/sub/3.jpg", "p/readme.md", "other/4.jpg"]:
        fs.pipe(f"{s3.name}/{name}", b"x")
    listing = list_images(s3.url("p"), s3.storage_options)
    assert listing.uris == [s3.url("p/1.png"), s3.url("p/2.jpg"), s3.url("p/sub/3.jpg")]
    assert listing.skipped == 1


@pytest.mark.parametrize("count, shard_size", [(10, 3), (9, 3), (1, 5), (7, 1)])
def test_plan_shards_cover_every_image_once(tmp_path, count, shard_size):
    fs, output = open_url(str(tmp_path / "out"))
    uris = [f"s3://b/{i:04d}.jpg" for i in range(count)]
    plan = Plan.create(fs, output, uris, shard_size)
    assert plan.num_images == count and plan.num_shards == -(-count // shard_size)
    shards = list(plan.shards())
    assert [u for s in shards for u in s.uris] == uris
    assert [i for s in shards for i in s.image_ids] == list(range(count))
    assert all(len(s.uris) == shard_size for s in shards[:-1])
    reopened = Plan(fs, output)  # a rerun reads the same plan back
    assert [reopened.shard(s.index) for s in shards] == shards
    assert [s.index for s in plan.shards(skip={0})] == list(range(1, plan.num_shards))
    with pytest.raises(IndexError):
        plan.shard(plan.num_shards)


def test_plan_reads_are_retried_and_a_failure_is_never_no_plan(no_waits, monkeypatch):  # noqa: F811
    """Whether a plan exists: a 503 is retried, and one that persists raises rather than reading
    as "no plan" (a resume would plan the output again). The driver's reads of the plan, its
    footer and each shard's row group while the job runs, are retried too."""
    fs, output = MemoryFileSystem(skip_instance_cache=True), f"/out-{uuid.uuid4().hex[:8]}"
    assert not Plan.exists(fs, output)
    uris = [f"s3://b/{i:04d}.jpg" for i in range(10)]
    shards = list(Plan.create(fs, output, uris, 3).shards())
    calls = failing_first(monkeypatch, fs, "info", [_throttled(), _throttled()])
    assert Plan.exists(fs, output) and len(calls) == 3
    calls = failing_first(monkeypatch, fs, "info", [_throttled()] * 99)
    with pytest.raises(StorageError, match=rf"cannot read memory:/*{output.lstrip('/')}/{PLAN_FILE}: .*HTTP 503"):
        Plan.exists(fs, output)
    assert len(calls) == no_waits

    class Throttled(io.BytesIO):
        """The plan's bytes, its next ``failures`` reads answered with a 503."""

        failures = 0

        def read(self, *args):
            if Throttled.failures:
                Throttled.failures -= 1
                raise _throttled()
            return super().read(*args)

    stored = fs.cat_file(f"{output}/{PLAN_FILE}")
    monkeypatch.setattr(fs, "open", lambda path, mode="rb", **kwargs: Throttled(stored))
    Throttled.failures = 2
    plan = Plan(fs, output)  # its footer
    for shard in reversed(shards):
        Throttled.failures = 2
        assert plan.shard(shard.index) == shard
    Throttled.failures = 99
    with pytest.raises(StorageError, match=rf"cannot read .*{PLAN_FILE}: .*HTTP 503 SlowDown.*\({no_waits} attempts\)"):
        plan.shard(0)
    monkeypatch.setattr(fs, "open", lambda path, mode="rb", **kwargs: io.BytesIO(b"not parquet"))
    with pytest.raises(pa.ArrowInvalid):  # a plan that is not Parquet: as pyarrow says it, not retried
        Plan(fs, output)


def test_interrupted_writes_in_the_output_itself_are_removed(tmp_path):
    """The driver writes the manifest and the plan atomically in the output itself: a run killed
    mid-write leaves their temporary files there, and the next one removes them; the user's own
    files stay."""
    fs, output = open_url(str(tmp_path))
    (tmp_path / "instances").mkdir()
    killed = [f"._manifest.json.{uuid.uuid4().hex}.tmp", f"._plan.parquet.{uuid.uuid4().hex}.tmp",
              f"instances/.part-000001.parquet.{uuid.uuid4().hex}.tmp"]
    kept = ["_manifest.json", ".notes.tmp", "instances/part-000001.parquet"]
    for name in killed + kept:
        (tmp_path / name).write_bytes(b"x")
    remove_interrupted_writes(fs, output)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == sorted(kept)


def test_atomic_write_leaves_no_temporary(tmp_path):
    fs, output = open_url(str(tmp_path))
    write_bytes_atomically(fs, f"{output}/deep/dir/file.bin", b"abc")
    write_bytes_atomically(fs, f"{output}/deep/dir/file.bin", b"abcd")  # replaced whole
    assert (tmp_path / "deep/dir/file.bin").read_bytes() == b"abcd"
    assert [p.name for p in (tmp_path / "deep/dir").iterdir()] == ["file.bin"]


def _images_table(n: int) -> pa.Table:
    return pa.table(
        {"image_uri": [f"u{i}" for i in range(n)], "image_id": list(range(n)), "width": [1] * n, "height": [1] * n,
         "instances": [0] * n, "status": ["ok"] * n, "error": [None] * n},
        schema=IMAGES_SCHEMA,
    )


@pytest.mark.parametrize("where", ["local", "s3"])
def test_commit_shard_writes_parts_then_marker(tmp_path, request, where):
    if where == "s3":
        bucket = request.getfixturevalue("s3")
        fs, output = open_url(bucket.url("out"), bucket.storage_options)
    else:
        fs, output = open_url(str(tmp_path / "out"))
    assert finished_shards(fs, output) == set()
    for shard in (3, 12):
        commit_shard(fs, output, shard, {"images": _images_table(4)}, {"maskray": '{"job": 1}'}, {"shard": shard, "images": 4})
    assert finished_shards(fs, output) == {3, 12}
    if where == "s3":
        # Another process commits a shard: s3fs's cached listing must not hide it (a resumed job).
        import s3fs

        other = s3fs.S3FileSystem(**bucket.storage_options)
        commit_shard(other, output, 5, {"images": _images_table(1)}, {}, {"shard": 5, "images": 1})
        assert finished_shards(fs, output) == {3, 5, 12}
    with fs.open(part_path(output, "images", 12), "rb") as f:
        parquet = pq.ParquetFile(f)
        assert parquet.metadata.row_group(0).column(0).compression == "ZSTD"
        assert parquet.schema_arrow.metadata[b"maskray"] == b'{"job": 1}'
        assert parquet.read().drop_columns([]).to_pylist() == _images_table(4).to_pylist()
    assert json.loads(fs.cat_file(f"{output}/_done/shard-000012.json")) == {"images": 4, "shard": 12}


def test_parquet_bytes_keep_schema():
    data = table_to_parquet_bytes(_images_table(2), {"k": "v"})
    table = pq.read_table(pa.BufferReader(data))
    assert table.schema.remove_metadata() == IMAGES_SCHEMA


def _manifest(**changes) -> Manifest:
    base = dict(input="s3://b/in", output="s3://b/out", weights={"name": "w.pt", "sha256": "ab"}, config={"min_size": [320]},
                options={"shard_size": 64, "batch_size": 2, "max_pixels": 100}, versions={"torch": "2"})
    return Manifest(**{**base, **changes})


def test_manifest_round_trip_and_identity(tmp_path):
    fs, output = open_url(str(tmp_path))
    assert Manifest.read(fs, output) is None
    manifest = _manifest()
    manifest.write(fs, output)
    stored = Manifest.read(fs, output)
    assert stored == manifest
    assert identity_mismatch(stored, _manifest(versions={"torch": "3"})) == []  # versions may change
    assert identity_mismatch(stored, _manifest(input="s3://b/other")) == ["input"]
    assert identity_mismatch(stored, _manifest(weights={"name": "w.pt", "sha256": "cd"})) == ["weights_sha256"]
    assert identity_mismatch(stored, _manifest(config={"min_size": [800]})) == ["config.min_size"]
    assert identity_mismatch(stored, _manifest(options={"shard_size": 8, "batch_size": 2, "max_pixels": 100})) == ["shard_size"]
    # A batch size left to the device (None) resumes an output made with one: the job runs it as stored.
    assert identity_mismatch(stored, _manifest(options={"shard_size": 64, "batch_size": None, "max_pixels": 100})) == []
    assert identity_mismatch(stored, _manifest(options={"shard_size": 64, "batch_size": 4, "max_pixels": 100})) == ["batch_size"]


# Generations (maskray segment --update) -------------------------------------------------------


def test_a_generation_continues_the_shards_and_ids_and_leaves_the_plan_before_it(tmp_path):
    """An update's generation: shards and image ids go on from the plan's (a short last shard
    stays short), the files before it are not rewritten, and a reopened plan reads them all."""
    fs, output = open_url(str(tmp_path / "out"))
    first = [f"s3://b/{i:04d}.jpg" for i in range(7)]
    plan = Plan.create(fs, output, first, 3)  # shards 0, 1 and a short 2
    before = (tmp_path / "out" / PLAN_FILE).stat()
    added = [f"s3://b/{i:04d}.jpg" for i in range(7, 12)]
    plan = plan.add_generation(added, 3)
    assert [(g.number, g.file, g.first_shard, g.num_shards, g.first_image_id, g.num_images) for g in plan.generations] == [
        (0, PLAN_FILE, 0, 3, 0, 7), (1, f"{GENERATIONS}/plan-000001.parquet", 3, 2, 7, 5)]
    assert (plan.num_images, plan.num_shards, plan.shard_size) == (12, 5, 3)
    assert (tmp_path / "out" / GENERATIONS / "plan-000001.parquet").is_file()
    after = (tmp_path / "out" / PLAN_FILE).stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    plan = plan.add_generation(["s3://b/late.jpg"], 3)
    reopened = Plan(fs, output)
    shards = list(reopened.shards())
    assert [s.index for s in shards] == [0, 1, 2, 3, 4, 5]
    assert [len(s.uris) for s in shards] == [3, 3, 1, 3, 2, 1] == [reopened.shard_length(i) for i in range(6)]
    assert [u for s in shards for u in s.uris] == first + added + ["s3://b/late.jpg"]
    assert [i for s in shards for i in s.image_ids] == list(range(13))
    assert [s.index for s in reopened.shards(skip={0, 1, 2})] == [3, 4, 5]
    assert reopened.shard(1) == shards[1] and reopened.shard(4) == shards[4]  # back and forth between files
    with pytest.raises(IndexError):
        reopened.shard(6)
    reopened.close()
    plan.close()


def test_a_gap_in_the_generations_is_a_damaged_plan(tmp_path):
    fs, output = open_url(str(tmp_path / "out"))
    plan = Plan.create(fs, output, ["a", "b"], 1).add_generation(["c"], 1).add_generation(["d"], 1)
    plan.close()
    (tmp_path / "out" / GENERATIONS / "plan-000001.parquet").unlink()
    with pytest.raises(ValueError, match="the plan is damaged: _plan/plan-000001.parquet is missing"):
        Plan(fs, output)
    # A generation file of another plan (ids that do not go on from this one's) is refused too.
    (tmp_path / "out" / GENERATIONS / "plan-000002.parquet").rename(tmp_path / "out" / GENERATIONS / "plan-000001.parquet")
    with pytest.raises(ValueError, match="image ids start at 3, where the generations before it end at 2"):
        Plan(fs, output)


def _naive_unplanned(listing: list[str], planned: list[str]) -> tuple[list[str], int]:
    known = set(planned)
    return [u for u in listing if u not in known], sum(u in known for u in listing)


@pytest.mark.parametrize("batch_rows", [1, 7, 65536])
def test_unplanned_is_the_listing_less_the_plan(tmp_path, monkeypatch, batch_rows):
    """The merge of a listing with every generation of a plan, batch by batch, finds exactly what a
    set would: keys before, between and after the plan's, keys gone from the listing, unicode,
    generations whose ranges overlap, and a plan file whose rows are not sorted."""
    import random

    from maskray.pipeline.segment import plan as plan_module
    from maskray.pipeline.segment.listing import sorted_unique

    monkeypatch.setattr(plan_module, "DIFF_BATCH_ROWS", batch_rows)
    monkeypatch.setattr(plan_module, "DIFF_BATCH_GROUPS", 3)
    rng = random.Random(batch_rows)
    alphabet = "ab/éж😀0"
    universe = sorted({"s3://b/" + "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 8))) for _ in range(2000)})
    fs, output = open_url(str(tmp_path / "out"))
    generations = [sorted(rng.sample(universe, 150)), sorted(rng.sample(universe, 90)), rng.sample(universe, 40)]
    planned: list[str] = []
    plan = None
    for uris in generations:
        uris = [u for u in uris if u not in set(planned)]
        plan = Plan.create(fs, output, uris, 4) if plan is None else plan.add_generation(uris, 4)
        planned += uris
    assert len(plan.generations) == 3
    listing = sorted(rng.sample(universe, 400))
    new, present = plan.unplanned(sorted_unique(listing))
    assert (new.to_pylist(), present) == _naive_unplanned(listing, planned)
    assert plan.unplanned(sorted_unique(planned))[0].to_pylist() == []
    assert plan.unplanned(pa.array([], pa.large_string()))[0].to_pylist() == []
    plan.close()


def test_unplanned_reads_are_retried(no_waits, monkeypatch):  # noqa: F811
    fs, output = MemoryFileSystem(skip_instance_cache=True), f"/out-{uuid.uuid4().hex[:8]}"
    plan = Plan.create(fs, output, ["a", "c"], 1).add_generation(["b"], 1)
    calls = failing_first(monkeypatch, fs, "ls", [_throttled()])  # the listing of the generations
    reopened = Plan(fs, output)
    assert len(calls) == 2 and reopened.num_shards == 3
    assert reopened.unplanned(pa.array(["a", "b", "d"], pa.large_string()))[0].to_pylist() == ["d"]
    reopened.close()
    plan.close()
