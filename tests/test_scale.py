"""Scale: the driver's planning step costs little memory per key and grows linearly; a long job
keeps its memory flat and its throughput steady, and loses no image.

Both are measured with bench/scale.py's own code, the figures it prints for BENCHMARKS.md, here
at sizes CI runs, against the bounds it states. Nothing here asserts a speed (that is the
benchmark's business): only memory per key, memory growth over a run, the evenness of the run,
and that every image is in the output exactly once.
"""

import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import scale  # noqa: E402
from maskray.pipeline.results.query import connect  # noqa: E402

PLAN_KEYS = 20_000  # and 10x: the 200,000-key listing is the one checked key by key


def test_plan_memory_per_key_is_small_and_linear(tmp_path):
    small = scale.measure_plan(PLAN_KEYS, tmp_path, "txt")
    large = scale.measure_plan(10 * PLAN_KEYS, tmp_path, "txt")
    figures = scale.plan_figures(small, large)
    # A regression to Python lists and sets of the URLs (~240 bytes a key) breaks the first bound.
    assert figures["bytes_per_key"] <= scale.PLAN_BYTES_PER_KEY_BOUND, figures
    assert figures["fixed_bytes"] <= scale.PLAN_FIXED_BYTES_BOUND, figures
    assert large["peak_growth"] > small["peak_growth"]  # the measurement sees the listing at all

    # The plan covers every listed key once, in the listing's order, in shards of 64.
    lines = Path(large["listing"]).read_text().splitlines()
    expected = sorted({line for line in lines if line and not line.startswith("#")})
    assert len(lines) - 1 > len(expected) == 10 * PLAN_KEYS  # the listing repeats some keys
    plan = pq.ParquetFile(Path(large["output"]) / "_plan.parquet")
    table = plan.read()
    assert table.column("image_uri").to_pylist() == expected
    assert table.column("image_id").to_pylist() == list(range(len(expected)))
    sizes = [plan.metadata.row_group(i).num_rows for i in range(plan.num_row_groups)]
    assert sizes[:-1] == [64] * (len(sizes) - 1) and 0 < sizes[-1] <= 64 and large["shards"] == len(sizes)


def test_listing_keeps_pythons_order_and_forms(tmp_path):
    """The Arrow sort gives Python's ``sorted`` order (by code point) on any text, repeats go,
    and a Parquet listing's categorical, relative and empty entries are read as before."""
    import random

    import pyarrow as pa

    from maskray.pipeline.segment.listing import list_images

    rng = random.Random(3)
    alphabet = "aZ09-_./ éßœж中😀\u00ff\u0100"
    names = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12))).strip() or "x" for _ in range(3000)]
    uris = [f"s3://bucket/{n}.jpg" for n in names]
    uris += uris[:300]  # repeats
    rng.shuffle(uris)
    (tmp_path / "list.txt").write_text("\n".join(uris) + "\n", encoding="utf-8")
    assert list_images(str(tmp_path / "list.txt")).uris == sorted(set(uris))

    column = pa.array(["s3://b/2.jpg", "s3://b/1.jpg", None, "", "s3://b/1.jpg", "rel/3.jpg"]).dictionary_encode()
    pq.write_table(pa.table({"image_uri": column}), tmp_path / "list.parquet")
    assert list_images(str(tmp_path / "list.parquet")).uris == [f"file://{tmp_path}/rel/3.jpg", "s3://b/1.jpg", "s3://b/2.jpg"]
    pq.write_table(pa.table({"uri": [1, 2]}), tmp_path / "numbers.parquet")
    with pytest.raises(ValueError, match=r"numbers.parquet: column 'uri' must hold strings, holds int64"):
        list_images(str(tmp_path / "numbers.parquet"))


@pytest.mark.slow
def test_long_job_keeps_memory_flat_and_loses_nothing(ray_local, tmp_path):
    count = 10_000
    paths = scale.write_tiny_images(tmp_path / "images", count)
    weights = scale.tiny_weights(tmp_path / "tiny.pt")
    run = scale.run_job(tmp_path / "images", tmp_path / "output", weights, actors=2, shard_size=200, batch_size=16)

    summary = run.summary
    assert summary.complete and (summary.images, summary.errors, summary.shards) == (count, 0, count // 200)
    con = connect(str(tmp_path / "output"))
    uris = [row[0] for row in con.sql("SELECT image_uri FROM images").fetchall()]
    assert len(uris) == len(set(uris)) == count  # every image exactly once
    assert set(uris) == {f"file://{p}" for p in paths}
    assert con.sql("SELECT count(*) FROM images WHERE status <> 'ok'").fetchall()[0][0] == 0

    # Memory was sampled through the steady state of the driver and of both actors.
    in_run = lambda samples: [t for t, _ in samples if run.start <= t <= run.end]  # noqa: E731
    assert len(in_run(run.trace.driver)) >= 10
    assert len(run.trace.actors) == 2 and all(len(in_run(s)) >= 5 for s in run.trace.actors.values()), run.trace.actors.keys()
    assert scale.job_bound_failures(run) == [], (run.memory_report(), run.tenths, run.work_tenths)


def test_job_bounds_catch_a_leak_a_slowdown_and_a_stall():
    """The job test's checks can fail: RSS that rises 4 KB per image after the warm-up, a tenth
    of the run that needs 4x the CPU per image, and a tenth that stalls, are each reported; a
    flat, even run is not."""
    rate, seconds = 100.0, 100  # images/s over the run, its length
    flat = [(float(t), 900 * 1024**2 + (t % 3) * 1024**2) for t in range(seconds + 1)]  # a few MB of noise
    leaking = [(t, rss + int(4096 * rate * t)) for t, rss in flat]
    even = [rate] * 10

    def run(driver=flat, tenths=even, work=even):
        return scale.JobRun(None, scale.MemoryTrace(driver, {7: flat}), list(tenths), list(work), rate, 0.0, float(seconds))

    assert scale.job_bound_failures(run()) == []
    [failure] = scale.job_bound_failures(run(driver=leaking))
    assert failure.startswith("driver: RSS rises")
    [failure] = scale.job_bound_failures(run(work=[rate] * 9 + [rate / 4]))
    assert "images per CPU-second" in failure
    [failure] = scale.job_bound_failures(run(tenths=[rate] * 9 + [rate / 20]))
    assert "a stall" in failure


def test_work_per_tenth_follows_cpu_not_wall_time():
    """Images per actor CPU-second, per tenth: an actor that gets half the CPU in the second
    half of the run (another process on its core) does half the images/s but the same work per
    CPU-second; one that burns twice the CPU per image in the second half is seen doing half."""
    crowded = [(float(t), 10 if t <= 50 else 5) for t in range(1, 101)]  # images committed each second
    crowded_cpu = {1: [(float(t), 0.5 * t if t <= 50 else 25 + 0.25 * (t - 50)) for t in range(101)]}
    assert scale.throughput_by_tenth([(0.0, 0), *crowded])[6:] == pytest.approx([5] * 4)
    assert scale.work_by_tenth([(0.0, 0), *crowded], crowded_cpu) == pytest.approx([20] * 10)

    steady = [(float(t), 10) for t in range(1, 101)]
    costly_cpu = {1: [(float(t), 0.5 * t if t <= 50 else 25 + 1.0 * (t - 50)) for t in range(101)]}
    assert scale.work_by_tenth([(0.0, 0), *steady], costly_cpu) == pytest.approx([20] * 5 + [10] * 5)
