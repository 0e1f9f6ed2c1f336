"""Update: a listing of N keys compared with a plan of N keys (``maskray segment --update``), in the
driver's memory, against the naive way of a Python set.

The plan: ``Plan.create`` of N synthetic URLs (~40 characters, as bench/scale.py makes them) in
shards of 64. The listing: a ``.txt`` listing file of the same N URLs less 0.1% (images gone from
the bucket) plus 1% new ones, shuffled. Each way runs in a fresh process: ``list_images`` of the
listing (the same for both), then the comparison that finds the new images and counts the
planned ones still listed:

- ``merge`` (maskray): ``Plan.unplanned``, a merge of the sorted listing with the plan a batch of
  65,536 rows at a time (Arrow's ``is_in`` over one batch, a byte per listed key);
- ``set`` (the naive peer): the plan's ``image_uri`` column as Python strings in a ``set``, and
  the listing's URLs as Python strings tested against it.

Memory is the process's peak RSS over the comparison minus its RSS once the listing is loaded
(Linux's high-water mark, reset after the listing; the modules are loaded and warmed on a small
plan first), and, for the whole check, the peak over listing and comparison together minus the
RSS before the listing. Both ways must find the same new images (checked). Then ``update``: the
same merge followed by the write of the new generation (``Plan.add_generation``), the whole of
what ``--update`` adds to a rerun before its shards run.

    python bench/update.py                   # 1,000,000 keys against a plan of 1,000,000
    python bench/update.py --keys 200000

tests/test_update.py runs it at a CI size against the bounds below.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.scale import _peak_rss, _rss, synthetic_uris, write_listing

# The bounds this benchmark checks (and tests/test_update.py with it): the merge's peak memory
# over the loaded listing, per listed key (a byte of its mask, the filtered new keys, one batch
# of the plan and its hash table: ~2-10 bytes a key at a million), plus a fixed part; and how
# much less that is than the set's (~100+ bytes a key: a Python str per planned and listed URL).
# At the test's 200,000 keys the merge grows by only ~4 MB, so the allocator's granularity
# shows: 20-25 bytes a key measured on two machines (Intel, AMD), hence the bound's room.
MERGE_BYTES_PER_KEY_BOUND = 32
MERGE_FIXED_BYTES_BOUND = 32 * 1024**2
SET_OVER_MERGE_BOUND = 4.0
NEW_SHARE, GONE_SHARE = 0.01, 0.001
WARM_UP_KEYS = 2000
WAYS = ("merge", "set", "update")


def make_case(keys: int, folder: Path, shard_size: int = 64) -> dict:
    """The plan of ``keys`` URLs in ``folder/out`` and a listing file of them, 0.1% gone, 1% new."""
    from maskray.pipeline.segment.listing import sorted_unique
    from maskray.pipeline.segment.plan import Plan
    from maskray.pipeline.storage import open_url

    planned = [u for u in dict.fromkeys(synthetic_uris(keys))]  # distinct, in a random order
    rng = random.Random(1)
    gone = set(rng.sample(range(len(planned)), int(keys * GONE_SHARE)))
    new = [f"s3://photos/2026/new/{i % 1000:03d}/img-{i:09d}.jpg" for i in range(int(keys * NEW_SHARE))]
    listed = [u for i, u in enumerate(planned) if i not in gone] + new
    rng.shuffle(listed)
    fs, output = open_url(str(folder / "out"))
    Plan.create(fs, output, sorted_unique(planned), shard_size).close()
    listing = write_listing(folder / "listing.txt", listed)
    return {"plan_keys": len(planned), "new_keys": len(new), "gone_keys": len(gone),
            "output": str(folder / "out"), "listing": str(listing)}


def _set_way(plan, listing) -> tuple[list[str], int]:
    """The naive comparison: every planned URL a Python str in a set."""
    import pyarrow.parquet as pq

    known: set[str] = set()
    for generation in plan.generations:
        with plan.fs.open(f"{plan.output}/{generation.file}", "rb") as f:
            known.update(pq.read_table(f, columns=["image_uri"]).column(0).to_pylist())
    listed = listing.to_pylist()
    new = [u for u in listed if u not in known]
    return new, len(listed) - len(new)


def child(way: str, output: str, listing_path: str) -> dict:
    """One way measured in this (fresh) process: see the module's docstring."""
    import gc

    import pyarrow as pa

    from maskray.pipeline.segment.listing import list_images
    from maskray.pipeline.segment.plan import Plan
    from maskray.pipeline.storage import open_url

    # Warm-up on a small plan: Arrow's kernels, the Parquet reader and writer, fsspec.
    folder = Path(output).parent / f"warm-up-{way}"
    small = make_case(WARM_UP_KEYS, folder)
    small_plan = Plan(*open_url(small["output"]))
    small_listing = list_images(small["listing"]).array
    _set_way(small_plan, small_listing) if way == "set" else small_plan.unplanned(small_listing)
    small_plan.close()
    del small_plan, small_listing
    gc.collect()

    def reset_peak() -> int:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the high-water mark of RSS to the current RSS
        return _rss()

    fs, path = open_url(output)
    plan = Plan(fs, path)
    before = reset_peak()
    started = time.perf_counter()
    listing = list_images(listing_path).array
    listed_at = time.perf_counter()
    listing_peak = _peak_rss()
    loaded = reset_peak()
    if way == "set":
        new, present = _set_way(plan, listing)
        new_count = len(new)
        sample = sorted(new)[:3] + sorted(new)[-3:]
    else:
        new, present = plan.unplanned(listing)
        new_count = len(new)
        sample = new.slice(0, 3).to_pylist() + new.slice(max(0, new_count - 3)).to_pylist()
        if way == "update":
            plan = plan.add_generation(new, plan.shard_size)
    compared_at = time.perf_counter()
    peak = _peak_rss()
    assert isinstance(listing, pa.Array)
    result = {"way": way, "listing_keys": len(listing), "new": new_count, "present": present, "sample": sample,
              "list_seconds": listed_at - started, "compare_seconds": compared_at - listed_at,
              "rss_before": before, "listing_growth": listing_peak - before, "compare_growth": peak - loaded,
              "check_growth": max(listing_peak, peak) - before, "generations": len(plan.generations)}
    plan.close()
    return result


def measure(keys: int, folder: Path, ways=WAYS) -> dict[str, dict]:
    """The case of ``keys`` made in ``folder``, then each way in a fresh process; their figures."""
    case = make_case(keys, folder)
    results = {}
    for way in ways:
        output = case["output"]
        if way == "update":  # it writes a generation: on a copy of the plan
            import shutil

            output = str(folder / "out-update")
            shutil.copytree(case["output"], output)
        command = [sys.executable, str(Path(__file__).resolve()), "child", way, output, case["listing"]]
        done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=ROOT)
        if done.returncode != 0:
            raise RuntimeError(f"the {way} process failed:\n{done.stderr[-4000:]}")
        results[way] = {**json.loads(done.stdout.strip().splitlines()[-1]), **case}
    return results


def figures(results: dict[str, dict]) -> dict:
    merge, naive = results["merge"], results["set"]
    keys = merge["listing_keys"]
    return {"merge_bytes_per_key": merge["compare_growth"] / keys, "set_bytes_per_key": naive["compare_growth"] / keys,
            "set_over_merge": naive["compare_growth"] / max(1, merge["compare_growth"]),
            "check_set_over_merge": naive["check_growth"] / max(1, merge["check_growth"])}


def bound_failures(results: dict[str, dict], small: dict[str, dict] | None = None) -> list[str]:
    """Past the bounds above; with ``small`` (the same at a tenth of the keys), the merge's cost per key is the growth between them."""
    failures = []
    merge, naive = results["merge"], results["set"]
    if (merge["new"], merge["present"], merge["sample"]) != (naive["new"], naive["present"], naive["sample"]):
        failures.append(f"the merge and the set disagree: {merge['new']} vs {naive['new']} new, "
                        f"{merge['present']} vs {naive['present']} present")
    if merge["new"] != merge["new_keys"] or merge["present"] != merge["plan_keys"] - merge["gone_keys"]:
        failures.append(f"the merge found {merge['new']} new and {merge['present']} planned, not {merge['new_keys']} and "
                        f"{merge['plan_keys'] - merge['gone_keys']}")
    keys = merge["listing_keys"]
    if small is not None:
        per_key = (merge["compare_growth"] - small["merge"]["compare_growth"]) / (keys - small["merge"]["listing_keys"])
        fixed = small["merge"]["compare_growth"] - per_key * small["merge"]["listing_keys"]
    else:
        per_key, fixed = merge["compare_growth"] / keys, 0.0
    if per_key > MERGE_BYTES_PER_KEY_BOUND:
        failures.append(f"the merge costs {per_key:.1f} bytes a listed key > {MERGE_BYTES_PER_KEY_BOUND}")
    if fixed > MERGE_FIXED_BYTES_BOUND:
        failures.append(f"the merge costs {fixed / 1e6:.0f} MB whatever the size > {MERGE_FIXED_BYTES_BOUND / 1e6:.0f}")
    ratio = figures(results)["set_over_merge"]
    if ratio < SET_OVER_MERGE_BOUND:
        failures.append(f"the set's peak is only {ratio:.1f}x the merge's (< {SET_OVER_MERGE_BOUND})")
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=1_000_000, help="keys planned (default 1,000,000), and about as many listed")
    sub = parser.add_subparsers(dest="what")
    child_parser = sub.add_parser("child", help=argparse.SUPPRESS)
    child_parser.add_argument("way", choices=WAYS)
    child_parser.add_argument("output")
    child_parser.add_argument("listing")
    args = parser.parse_args()
    if args.what == "child":
        print(json.dumps(child(args.way, args.output, args.listing)))
        return 0
    with tempfile.TemporaryDirectory(prefix="maskray-update-") as tmp:
        results = measure(args.keys, Path(tmp))
    any_result = results["merge"]
    print(f"plan {any_result['plan_keys']:,} keys; listing {any_result['listing_keys']:,} keys "
          f"({any_result['new_keys']:,} new, {any_result['gone_keys']:,} planned ones gone)")
    for way in WAYS:
        r = results[way]
        what = {"merge": "merge (Plan.unplanned)", "set": "set (naive peer)",
                "update": "merge + new generation written"}[way]
        print(f"{what:32s} listing {r['list_seconds']:5.2f} s +{r['listing_growth'] / 1e6:6.1f} MB; compare "
              f"{r['compare_seconds']:5.2f} s, peak +{r['compare_growth'] / 1e6:6.1f} MB "
              f"({r['compare_growth'] / r['listing_keys']:5.1f} B/key); whole check peak +{r['check_growth'] / 1e6:6.1f} MB; "
              f"{r['new']:,} new")
    f = figures(results)
    print(f"the set's peak over the merge's: x{f['set_over_merge']:.1f} for the comparison, "
          f"x{f['check_set_over_merge']:.1f} for the whole check (listing included)")
    failures = bound_failures(results)
    for failure in failures:
        print("BOUND EXCEEDED:", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
