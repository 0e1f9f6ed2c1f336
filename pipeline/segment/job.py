"""The segmentation job: plan the input into shards, run them on Ray actors, commit, resume.

Why Ray core actors and not Ray Data's ``map_batches``: a shard here is the unit of work *and*
of commit (its part files, then its done-marker), which is what makes a rerun skip finished
work exactly and a retried shard rewrite the same files. Ray Data streams rows through
operators and writes files of its own choosing; resuming it means re-reading every input and
remembering every finished id. With actors the driver holds only the shards in flight, a
shard whose actor died is simply sent to another one, and each actor overlaps its reading and
decoding with inference itself (maskray.pipeline.segment.worker).

The driver: check storage and weights (fail fast), write or read back the plan, start one
actor per GPU (or per ``cpus_per_actor`` CPUs), keep two shards in flight per actor (one
running, one queued), retry the shards of actors that died on fresh actors, show a
progress bar, and write the manifest's totals at the end.
"""


import logging
import time
from dataclasses import dataclass

from maskray.pipeline.errors import Interrupted, JobError, MaskrayError, StorageError
from maskray.pipeline.segment.listing import list_images
from maskray.pipeline.segment.manifest import MANIFEST_FILE, Manifest, identity_mismatch
from maskray.pipeline.segment.output import DONE, IMAGES, INSTANCES, finished_shards, remove_interrupted_writes
from maskray.pipeline.segment.plan import PLAN_FILE, Plan
from maskray.pipeline.segment.scheduler import execute
from maskray.pipeline.segment.settings import SegmentJob
from maskray.pipeline.segment.shardbook import RunStats
from maskray.pipeline.storage import check_output_is_ours, check_reachable, open_url, public_url, redact, secret_values
from maskray.pipeline.weights import build_model, read_weights

log = logging.getLogger("maskray.segment")

# What an output holds at its top once its manifest is written (the plan is written just
# before it): nothing else may be there (storage.check_output_is_ours).
OUTPUT_NAMES = (MANIFEST_FILE, PLAN_FILE, DONE, INSTANCES, IMAGES)


@dataclass
class JobSummary:
    output: str
    images: int  # in the whole output
    errors: int
    instances: int
    shards: int
    shards_run: int  # by this run (0 when everything was already done)
    failed_shards: dict[int, str]  # shard -> why, for shards that failed every attempt
    seconds: float
    images_run: int  # images processed by this run
    retries: int = 0  # shards run again because their actor died or their commit failed
    actors_lost: int = 0  # actors that died mid-job (killed, out of memory, or their node lost)
    nodes: frozenset[str] = frozenset()  # Ray node ids whose actors committed shards in this run
    processing_seconds: float = 0.0  # from the first actor ready to the last shard: the steady state

    @property
    def complete(self) -> bool:
        return not self.failed_shards

    def describe(self) -> str:
        rate = self.images_run / self.seconds if self.seconds > 0 else 0.0
        lines = [f"{self.images:,} images ({self.errors:,} errors), {self.instances:,} instances in {self.output}"]
        if self.shards_run or self.failed_shards:
            lines.append(f"this run: {self.shards_run} of {self.shards} shards, {self.images_run:,} images in "
                         f"{self.seconds:.1f} s ({rate:.2f} images/s)")
        else:
            done = "the one shard was" if self.shards == 1 else f"all {self.shards} shards were"
            lines.append(f"nothing to do: {done} already done")
        if self.actors_lost or self.retries:
            lines.append(f"{self.actors_lost} actor(s) lost, {self.retries} shard(s) retried; every retried shard was "
                         "rewritten whole")
        for shard, why in sorted(self.failed_shards.items()):
            lines.append(f"shard {shard} FAILED: {why}")
        if self.failed_shards:
            lines.append("rerun the same command to retry the failed shards (finished shards are kept)")
        return "\n".join(lines)


def run_segment(job: SegmentJob) -> JobSummary:
    """Runs (or resumes) ``job``; returns its summary. Raises JobError/StorageError before any
    work for a bad input, output or weights."""
    started = time.perf_counter()
    secrets = secret_values(job.storage_options)
    try:
        return _run(job, started)
    except KeyboardInterrupt:
        raise Interrupted(redact(_interrupted(job), secrets)) from None
    except (JobError, StorageError, FileNotFoundError, ValueError, OSError) as error:
        # Messages reach the console and logs: no credential in them, whatever the cause. Errors
        # come out as one of these four kinds. Ours say what they are; one of another type (a
        # JSONDecodeError from a damaged manifest, a PermissionError from read-only credentials)
        # is named in the message.
        kinds = (JobError, StorageError, FileNotFoundError, ValueError)
        kind = next((k for k in kinds if isinstance(error, k)), StorageError if isinstance(error, OSError) else JobError)
        ours = type(error) in kinds or type(error).__module__.startswith("maskray.")
        message = str(error) if ours else f"{type(error).__name__}: {error}"
        raise kind(redact(message, secrets)) from None


def _interrupted(job: SegmentJob) -> str:
    """What a Ctrl-C leaves: the shards committed (each whole; one in flight is redone whole) and how to go on."""
    from maskray.pipeline.results.query import output_progress

    try:
        progress = output_progress(job.output, job.storage_options)
    except (MaskrayError, OSError, ValueError):  # stopped before the manifest, or storage failing too
        progress = None
    if progress is None or progress.shards is None:
        return f"stopped before any shard of {public_url(job.output)} was planned; the same command starts it again"
    return (f"{progress.committed} of {progress.shards} shards are committed in {progress.url}; "
            "the same command resumes from there")


def _run(job: SegmentJob, started: float) -> JobSummary:
    job.validate()
    in_fs, in_path = open_url(job.input, job.storage_options)
    check_reachable(job.input, in_fs, in_path, must_exist=True)
    out_fs, out_path = open_url(job.output, job.storage_options)
    check_reachable(job.output, out_fs, out_path, must_exist=False)
    check_output_is_ours(job.output, out_fs, out_path, "a segmentation output", MANIFEST_FILE, OUTPUT_NAMES,
                         before_marker=(PLAN_FILE,))

    weights = read_weights(job.weights, job.storage_options)
    model = build_model(weights, job.overrides())  # a bad weights file fails here, before any work
    wanted = Manifest(
        input=public_url(job.input),
        output=public_url(job.output),
        weights={"name": weights.name, "sha256": weights.sha256},
        config=model.config.to_dict(),
        options={"shard_size": job.shard_size, "batch_size": job.batch_size, "max_pixels": job.max_pixels},
        versions=_versions(),
    )
    del model
    manifest, plan = _open_or_plan(job, wanted, out_fs, out_path)
    done = finished_shards(out_fs, out_path)
    todo = [s for s in range(plan.num_shards) if s not in done]
    run = RunStats()
    remove_interrupted_writes(out_fs, out_path)  # of a killed run
    if todo:
        # Also the proof, before Ray starts, that the output takes writes (read-only credentials
        # fail here, not in every actor).
        manifest.status = "running"
        manifest.write(out_fs, out_path)
        run = execute(job, weights, manifest, plan, todo, len(done))
        remove_interrupted_writes(out_fs, out_path)  # of this run's actors that died mid-write
    plan.close()

    from maskray.pipeline.results.query import output_totals

    totals = output_totals(job.output, job.storage_options)
    status = "complete" if len(finished_shards(out_fs, out_path)) == plan.num_shards else "running"
    if todo or manifest.totals != totals or manifest.status != status:  # a finished job's rerun writes nothing
        manifest.totals, manifest.status = totals, status
        manifest.write(out_fs, out_path)
    return JobSummary(
        output=public_url(job.output),
        images=totals["images"],
        errors=totals["errors"],
        instances=totals["instances"],
        shards=plan.num_shards,
        shards_run=run.shards,
        failed_shards=run.failed,
        seconds=time.perf_counter() - started,
        images_run=run.images,
        retries=run.retries,
        actors_lost=run.actors_lost,
        nodes=frozenset(run.nodes),
        processing_seconds=run.processing_seconds,
    )


def _versions() -> dict[str, str]:
    import ray

    from maskray.model.checkpoint import versions

    return {**versions(), "ray": ray.__version__}


def _open_or_plan(job: SegmentJob, wanted: Manifest, fs, output: str) -> tuple[Manifest, Plan]:
    """The stored job of ``output`` if it is the same job; else a new plan and manifest."""
    stored = Manifest.read(fs, output)
    if stored is not None:
        differences = identity_mismatch(stored, wanted)
        if differences:
            raise JobError(
                f"{public_url(job.output)} holds the output of a different job (it differs in: {', '.join(differences)}); "
                "write to a new output, or delete this one to start over"
            )
        if Plan.exists(fs, output):
            return stored, Plan(fs, output)
    # A new job (or one killed before its plan was written: nothing was processed yet).
    listing_started = time.perf_counter()
    listing = list_images(job.input, job.storage_options)
    if not len(listing):
        raise JobError(f"{public_url(job.input)}: no images found ({listing.skipped} other files skipped)")
    # The listing's Arrow array as it is: a list of Python strings would cost several times more.
    plan = Plan.create(fs, output, listing.array, job.shard_size)
    manifest = stored or wanted
    manifest.plan = {
        "file": PLAN_FILE,
        "num_images": plan.num_images,
        "num_shards": plan.num_shards,
        "shard_size": job.shard_size,
        "skipped_files": listing.skipped,
        "listing_seconds": round(time.perf_counter() - listing_started, 3),
    }
    manifest.write(fs, output)
    return manifest, plan
