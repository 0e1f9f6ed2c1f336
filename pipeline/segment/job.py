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

A rerun resumes from the stored plan; with ``update`` (``--update``) it lists the input again
first and adds the images that are not in the plan yet as a new generation of it (their own,
new shards: maskray.pipeline.segment.plan), committed before any of them runs. Without it, a
rerun lists the input too, only to say how many new images it leaves out (a listing is what
any rerun's check of the input costs: a LIST call per 1,000 keys, or a read of the listing
file, next to the images a resume reads; a failure of that look is a warning, never the end of
a resume).
"""


import dataclasses
import logging
import time
from dataclasses import dataclass

from maskray.pipeline.errors import Interrupted, JobError, MaskrayError, StorageError
from maskray.pipeline.segment.listing import list_images
from maskray.pipeline.segment.manifest import MANIFEST_FILE, Manifest, identity_mismatch
from maskray.pipeline.segment.output import DONE, IMAGES, INSTANCES, finished_shards, remove_interrupted_writes
from maskray.pipeline.segment.plan import GENERATIONS, PLAN_FILE, Plan, remove_interrupted_plan_writes
from maskray.pipeline.segment.scheduler import execute
from maskray.pipeline.segment.settings import SegmentJob
from maskray.pipeline.segment.shardbook import RunStats
from maskray.pipeline.storage import check_output_is_ours, check_reachable, open_url, public_url, redact, secret_values
from maskray.pipeline.weights import build_model, read_weights

log = logging.getLogger("maskray.segment")

# What an output holds at its top once its manifest is written (the plan is written just
# before it): nothing else may be there (storage.check_output_is_ours).
OUTPUT_NAMES = (MANIFEST_FILE, PLAN_FILE, GENERATIONS, DONE, INSTANCES, IMAGES)


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
    input: str = ""  # the job's INPUT, without credentials
    images_added: int = 0  # by this run's update: images new in the input, planned as new shards
    shards_added: int = 0
    images_gone: int = 0  # planned images an update did not find in the input any more (their rows stay)
    new_images_ignored: int = 0  # images in the input but not in the plan, left out by a run without update

    @property
    def complete(self) -> bool:
        return not self.failed_shards

    def describe(self) -> str:
        rate = self.images_run / self.seconds if self.seconds > 0 else 0.0
        lines = [f"{self.images:,} images ({self.errors:,} errors), {self.instances:,} instances in {self.output}"]
        if self.images_added or self.images_gone:
            added = (f"{_count(self.images_added, 'new image')} in {_count(self.shards_added, 'new shard')}"
                     if self.images_added else "no new images")
            gone = (f"; {_count(self.images_gone, 'planned image')} no longer in the input "
                    f"{'keeps its rows' if self.images_gone == 1 else 'keep their rows'}" if self.images_gone else "")
            lines.append(f"update: {added}{gone}")
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
        if self.new_images_ignored:
            lines.append(ignored_images_message(self.new_images_ignored, self.input))
        return "\n".join(lines)


def ignored_images_message(count: int, input_url: str) -> str:
    """What a run without ``--update`` says of the images its input has gained since its plan."""
    are = "is" if count == 1 else "are"
    return (f"{_count(count, 'new image')} in {input_url} {are} not in this output's plan; add "
            f"{'it' if count == 1 else 'them'} with --update")


def _count(n: int, what: str) -> str:
    return f"{n:,} {what}" + ("" if n == 1 else "s")


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
        weights=weights.describe(),
        config=model.config.to_dict(),
        options={"shard_size": job.shard_size, "batch_size": job.batch_size, "max_pixels": job.max_pixels},
        versions=_versions(),
    )
    del model
    planned = _open_or_plan(job, wanted, out_fs, out_path)
    manifest, plan = planned.manifest, planned.plan
    if job.batch_size is None and manifest.options.get("batch_size") is not None:
        job = dataclasses.replace(job, batch_size=manifest.options["batch_size"])  # resumed as it first ran
    done = finished_shards(out_fs, out_path)
    todo = [s for s in range(plan.num_shards) if s not in done]
    run = RunStats()
    remove_interrupted_writes(out_fs, out_path)  # of a killed run
    remove_interrupted_plan_writes(out_fs, out_path)  # of a killed update
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
    precision = sorted(set(manifest.precision) | run.precisions)
    if todo or manifest.totals != totals or manifest.status != status:  # a finished job's rerun writes nothing
        manifest.totals, manifest.status, manifest.precision = totals, status, precision
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
        input=public_url(job.input),
        images_added=planned.images_added,
        shards_added=planned.shards_added,
        images_gone=planned.images_gone,
        new_images_ignored=planned.new_images_ignored,
    )


def _versions() -> dict[str, str]:
    import ray

    from maskray.model.checkpoint import versions

    return {**versions(), "ray": ray.__version__}


@dataclass
class _Planned:
    """The job's manifest and plan, and what this run's look at the input found."""

    manifest: Manifest
    plan: Plan
    images_added: int = 0
    shards_added: int = 0
    images_gone: int = 0
    new_images_ignored: int = 0


def _open_or_plan(job: SegmentJob, wanted: Manifest, fs, output: str) -> _Planned:
    """The stored job of ``output`` if it is the same job (updated with the input's new images
    when ``job.update``); else a new plan and manifest."""
    stored = Manifest.read(fs, output)
    if stored is not None:
        differences = identity_mismatch(stored, wanted)
        if differences:
            raise JobError(
                f"{public_url(job.output)} holds the output of a different job (it differs in: {', '.join(differences)}); "
                "write to a new output, or delete this one to start over"
            )
        if Plan.exists(fs, output):
            plan = Plan(fs, output)
            try:
                return _update(job, stored, plan, fs, output) if job.update else _look_for_new_images(job, stored, plan, fs, output)
            except BaseException:
                plan.close()
                raise
    # A new job (or one killed before its plan was written: nothing was processed yet). An
    # update of an output that has no plan yet is this too: its first run.
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
    return _Planned(manifest, plan)


def _update(job: SegmentJob, manifest: Manifest, plan: Plan, fs, output: str) -> _Planned:
    """``--update``: the input listed again, and its images that no generation of the plan has
    planned as the next one. Nothing is written before that generation, whole, and a run killed
    before it lands leaves the plan as it was; once it has landed, a rerun (with or without
    ``--update``) runs its shards, and an update again finds nothing new in them."""
    listing_started = time.perf_counter()
    listing = list_images(job.input, job.storage_options)  # a failure here ends the update before any work
    new, present = plan.unplanned(listing.array)
    skipped, seconds = listing.skipped, round(time.perf_counter() - listing_started, 3)
    del listing
    gone = plan.num_images - present  # planned, and no longer listed: their rows stay
    if not len(new):
        _record_generations(manifest, plan, fs, output)
        return _Planned(manifest, plan, images_gone=gone)
    shards_before = plan.num_shards
    plan = plan.add_generation(new, job.shard_size)  # the update's commit point (one atomic write)
    try:
        generation = plan.generations[-1]
        log.info("update: %d new images of %s in shards %d..%d (plan generation %d)", generation.num_images,
                 public_url(job.input), generation.first_shard, plan.num_shards - 1, generation.number)
        _record_generations(manifest, plan, fs, output, {
            **_generation_record(plan), "images_gone": gone, "skipped_files": skipped, "listing_seconds": seconds})
    except BaseException:
        plan.close()
        raise
    return _Planned(manifest, plan, images_added=len(new),
                    shards_added=plan.num_shards - shards_before, images_gone=gone)


def _look_for_new_images(job: SegmentJob, manifest: Manifest, plan: Plan, fs, output: str) -> _Planned:
    """A rerun without ``--update``: the input listed again only to say how many new images this
    run leaves out. A failure to look is a warning: it must not stop a resume."""
    try:
        new, _ = plan.unplanned(list_images(job.input, job.storage_options).array)
        ignored = len(new)
        del new
    except (MaskrayError, OSError, ValueError) as error:
        reason = redact(str(error) or type(error).__name__, secret_values(job.storage_options))
        log.warning("could not look for new images in %s (%s); this run goes on with the plan it has",
                    public_url(job.input), reason)
        ignored = 0
    if ignored:
        log.warning("%s", ignored_images_message(ignored, public_url(job.input)))
    _record_generations(manifest, plan, fs, output)  # a generation that an update killed after writing it left
    return _Planned(manifest, plan, new_images_ignored=ignored)


def _generation_record(plan: Plan) -> dict:
    last = plan.generations[-1]
    return {"generation": last.number, "file": last.file, "first_shard": last.first_shard, "new_images": last.num_images,
            "new_shards": last.num_shards}


def _record_generations(manifest: Manifest, plan: Plan, fs, output: str, last_update: dict | None = None) -> None:
    """The manifest's plan summary made to say what the plan holds (totals over every generation,
    the last update), written only when that changes it: an update that finds nothing new writes nothing."""
    summary = dict(manifest.plan)
    summary.update(num_images=plan.num_images, num_shards=plan.num_shards)
    if len(plan.generations) > 1:
        summary["generations"] = len(plan.generations)
        if last_update is not None:
            summary["last_update"] = last_update
        elif (summary.get("last_update") or {}).get("generation") != plan.generations[-1].number:
            summary["last_update"] = _generation_record(plan)  # the update that wrote it was killed before this
    if summary != manifest.plan:
        manifest.plan = summary
        manifest.write(fs, output)
