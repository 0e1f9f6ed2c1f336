"""The segmentation job: plan the input into shards, run them on Ray actors, commit, resume.

Why Ray core actors and not Ray Data's ``map_batches``: a shard here is the unit of work *and*
of commit (its part files, then its done-marker), which is what makes a rerun skip finished
work exactly and a retried shard rewrite the same files. Ray Data streams rows through
operators and writes files of its own choosing; resuming it means re-reading every input and
remembering every finished id. With actors the driver holds only the shards in flight, a
shard whose actor died is simply sent to another one, and each actor overlaps its reading and
decoding with inference itself (pipeline.worker).

The driver: check storage and weights (fail fast), write or read back the plan, start one
actor per GPU (or per ``cpus_per_actor`` CPUs), keep two shards in flight per actor (one
running, one queued), retry the shards of actors that died on fresh actors, show a
progress bar, and write the manifest's totals at the end.
"""

import json
import logging
import os
import sys
import time
import uuid
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from pipeline.cluster import connect_ray
from pipeline.decode import DEFAULT_MAX_PIXELS
from pipeline.listing import list_images
from pipeline.manifest import Manifest, identity_mismatch
from pipeline.plan import PLAN_FILE, Plan, Shard
from pipeline.storage import StorageError, check_reachable, open_url, public_url, redact, secret_values
from pipeline.weights import build_model, read_weights
from pipeline.worker import WorkerOptions, device_is_broken
from pipeline.writer import finished_shards, remove_interrupted_writes

log = logging.getLogger("maskray.segment")

# One running, one queued in the actor, so that it never waits for the driver between shards.
# The actor runs them one at a time: a threaded actor (max_concurrency=2) measured 15% slower,
# its inference hopping between executor threads (bench/pipeline.py, BENCHMARKS.md).
SHARDS_IN_FLIGHT_PER_ACTOR = 2
MAX_SHARD_ATTEMPTS = 3


class JobError(RuntimeError):
    """The job cannot run as asked (the message says why); nothing was processed."""


@dataclass
class SegmentJob:
    """Everything a segmentation job is given (the ``maskray segment`` arguments)."""

    input: str
    output: str
    weights: str
    storage_options: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 2
    shard_size: int = 64
    num_actors: int | None = None  # default: one per GPU, or as many as the CPUs allow
    cpus_per_actor: int | None = None  # default: 2 (capped at the largest node)
    score_threshold: float | None = None  # default: the model's box_score_thresh
    max_pixels: int = DEFAULT_MAX_PIXELS
    read_threads: int = 8
    address: str | None = None  # a Ray cluster to join; default RAY_ADDRESS, else a local one
    progress: bool = True
    actor_start_timeout: float = 600.0

    def validate(self) -> None:
        for name in ("batch_size", "shard_size", "max_pixels", "read_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("num_actors", "cpus_per_actor"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.score_threshold is not None and not 0.0 <= self.score_threshold <= 1.0:
            raise ValueError(f"score_threshold must be in [0, 1], got {self.score_threshold}")

    def overrides(self) -> dict[str, Any]:
        return {} if self.score_threshold is None else {"box_score_thresh": float(self.score_threshold)}

    def worker_options(self) -> WorkerOptions:
        return WorkerOptions(batch_size=self.batch_size, max_pixels=self.max_pixels, read_threads=self.read_threads)


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
            lines.append(f"nothing to do: all {self.shards} shards were already done")
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
    except (JobError, StorageError, FileNotFoundError, ValueError, OSError) as error:
        # Messages reach the console and logs: no credential in them, whatever the cause. Errors
        # come out as one of these four kinds; one of another type (a StorageWriteError, a
        # JSONDecodeError from a damaged manifest, a PermissionError from read-only credentials)
        # is named in the message.
        kinds = (JobError, StorageError, FileNotFoundError, ValueError)
        kind = next((k for k in kinds if isinstance(error, k)), StorageError if isinstance(error, OSError) else JobError)
        message = str(error) if type(error) in kinds else f"{type(error).__name__}: {error}"
        raise kind(redact(message, secrets)) from None


def _run(job: SegmentJob, started: float) -> JobSummary:
    job.validate()
    in_fs, in_path = open_url(job.input, job.storage_options)
    check_reachable(job.input, in_fs, in_path, must_exist=True)
    out_fs, out_path = open_url(job.output, job.storage_options)
    check_reachable(job.output, out_fs, out_path, must_exist=False)

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
    run = _RunStats()
    remove_interrupted_writes(out_fs, out_path)  # of a killed run
    if todo:
        # Also the proof, before Ray starts, that the output takes writes (read-only credentials
        # fail here, not in every actor).
        manifest.status = "running"
        manifest.write(out_fs, out_path)
        run = _execute(job, weights, manifest, plan, todo, len(done))
        remove_interrupted_writes(out_fs, out_path)  # of this run's actors that died mid-write
    plan.close()

    from pipeline.query import output_totals

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

    from model.checkpoint import versions

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


# Ray ---------------------------------------------------------------------------------------


def _actor_layout(job: SegmentJob) -> tuple[int, dict[str, float]]:
    """(number of actors, resources of each): one GPU each where the cluster has GPUs,
    else ``cpus_per_actor`` CPUs each, as many as fit on the alive nodes."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    gpus = sum(n["Resources"].get("GPU", 0) for n in nodes)
    if gpus >= 1:
        return job.num_actors or int(gpus), {"num_gpus": 1, "num_cpus": 1}
    node_cpus = [int(n["Resources"].get("CPU", 0)) for n in nodes]
    largest = max(node_cpus, default=0)
    if largest < 1:
        raise JobError("the Ray cluster has no CPUs and no GPUs to run actors on")
    per_actor = max(1, min(job.cpus_per_actor or 2, largest))
    fitting = sum(c // per_actor for c in node_cpus)
    return job.num_actors or max(1, fitting), {"num_cpus": per_actor}


def _make_actor_class():
    import ray

    @ray.remote
    class SegmentActor:
        """One model on one GPU (or a few CPUs), turning shards into part files."""

        def __init__(self, weights, output, storage_options, overrides, metadata, options, threads, board):
            import torch

            from pipeline.worker import ShardWorker

            if threads:
                torch.set_num_threads(threads)
            self.board = board
            self.worker = ShardWorker(weights, output, storage_options, overrides, metadata, options)

        def ready(self) -> str:
            return f"{self.worker.device} on {ray.util.get_node_ip_address()} (pid {os.getpid()})"

        def pid(self) -> int:
            return os.getpid()

        def process(self, shard: Shard) -> dict:
            last = [0.0]

            def report(images: int) -> None:
                # At most twice a second: each report is a remote call, and the driver polls that often.
                if time.monotonic() - last[0] >= 0.5:
                    last[0] = time.monotonic()
                    self.board.report.remote(shard.index, images)

            try:
                summary = self.worker.process(shard, on_progress=report)
            except Exception as error:
                if device_is_broken(error):
                    # The CUDA context is unusable for the rest of this process: end it, so that the
                    # driver retries the shard on a fresh actor instead of here, three times in vain.
                    log.error("the GPU failed (%s); this actor exits to be replaced", _first_line(error))
                    os._exit(1)
                raise
            summary["node"] = ray.get_runtime_context().get_node_id()
            return summary

    return SegmentActor


def _make_board_class():
    import ray

    @ray.remote(num_cpus=0)
    class ProgressBoard:
        """Images done per shard in progress, reported by the actors after each batch; a
        retried shard starts again from zero, so nothing is counted twice."""

        def __init__(self):
            self.in_progress: dict[int, int] = {}
            self.finished: set[int] = set()

        def report(self, shard: int, images: int) -> None:
            if shard not in self.finished:  # a late report of a shard the driver already counted
                self.in_progress[shard] = images

        def restart(self, shard: int) -> None:
            self.in_progress.pop(shard, None)

        def finish(self, shard: int) -> None:
            self.finished.add(shard)
            self.in_progress.pop(shard, None)

        def total(self) -> int:
            return sum(self.in_progress.values())

    return ProgressBoard


@dataclass
class _RunStats:
    shards: int = 0  # committed by this run
    images: int = 0
    failed: dict[int, str] = field(default_factory=dict)
    retries: int = 0
    actors_lost: int = 0
    nodes: set[str] = field(default_factory=set)
    processing_seconds: float = 0.0


@dataclass
class _Slot:
    """An actor and the shards it has in flight; ``ready`` once its model is loaded."""

    actor: Any
    ready_ref: Any
    ready: bool = False
    shards: dict = field(default_factory=dict)  # ObjectRef -> Shard


def _execute(job: SegmentJob, weights, manifest: Manifest, plan: Plan, todo: list[int], already_done: int) -> _RunStats:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    connect_ray(job.address)
    num_actors, resources = _actor_layout(job)
    threads = int(resources.get("num_cpus", 1)) if "num_gpus" not in resources else None
    # The board lives on the driver's node: it is lost only with the driver, never with a worker
    # node (the driver asks it for totals, and a dead board would end the job).
    board = _make_board_class().options(scheduling_strategy=NodeAffinitySchedulingStrategy(
        ray.get_runtime_context().get_node_id(), soft=False)).remote()
    actor_class = _make_actor_class()
    actor_options = dict(resources, max_concurrency=1, max_restarts=0)
    weights_ref = ray.put(weights)
    metadata = {"job_id": manifest.job_id, "weights": json.dumps(manifest.weights), "versions": json.dumps(manifest.versions),
                "config": json.dumps(manifest.config)}
    # Named, so that operators (and tests) can find a job's actors; unique per run, since a killed
    # run's actors may still be shutting down when the rerun starts.
    job_name = f"maskray-segment-{manifest.job_id[:8]}-{uuid.uuid4().hex[:6]}"

    def new_slot(number: int) -> _Slot:
        actor = actor_class.options(**actor_options, name=f"{job_name}-{number}").remote(
            weights_ref, job.output, job.storage_options, job.overrides(), metadata, job.worker_options(), threads, board
        )
        return _Slot(actor, actor.ready.remote())

    slots = [new_slot(i) for i in range(min(num_actors, len(todo)))]
    actors_made = len(slots)
    replacements_left = 2 * len(slots) + 2  # actors that die are replaced, but not forever

    queue: deque[int] = deque()
    fresh: Iterator[int] = iter(todo)
    attempts: dict[int, int] = {}
    stats = _RunStats()
    failed = stats.failed
    images_done, shards_done = 0, 0
    waiting_since = time.monotonic()
    first_ready: float | None = None
    bar = _progress_bar(job.progress, plan, todo, already_done)

    def replace_lost_actor(reason: str) -> None:
        """A fresh actor in a lost one's place, while replacements last. It starts when a node has
        room; until then the other actors go on, and one that never starts (its node is gone for
        good) holds nothing up."""
        nonlocal actors_made, replacements_left
        stats.actors_lost += 1
        if replacements_left > 0:
            log.warning("an actor was lost (%s); a replacement is asked for", reason)
            replacements_left -= 1
            slots.append(new_slot(actors_made))
            actors_made += 1

    def next_shard() -> int | None:
        if queue:
            return queue.popleft()
        return next(fresh, None)

    def finished(shard: Shard, summary: dict) -> None:
        nonlocal images_done, shards_done
        board.finish.remote(shard.index)
        images_done += summary["images"]
        shards_done += 1
        stats.nodes.add(summary["node"])

    def retry_or_fail(shard: Shard, why: str) -> None:
        attempts[shard.index] = attempts.get(shard.index, 0) + 1
        board.restart.remote(shard.index)
        if attempts[shard.index] >= MAX_SHARD_ATTEMPTS:
            failed[shard.index] = why
            log.error("shard %d failed %d times, giving up: %s", shard.index, attempts[shard.index], why)
        else:
            log.warning("shard %d will be retried (%s)", shard.index, why)
            stats.retries += 1
            queue.append(shard.index)

    try:
        while True:
            # Hand out shards to ready actors, up to SHARDS_IN_FLIGHT_PER_ACTOR each.
            exhausted = False
            for slot in slots:
                while slot.ready and len(slot.shards) < SHARDS_IN_FLIGHT_PER_ACTOR:
                    index = next_shard()
                    if index is None:
                        exhausted = True
                        break
                    shard = plan.shard(index)
                    slot.shards[slot.actor.process.remote(shard)] = shard
            in_flight = {ref: slot for slot in slots for ref in slot.shards}
            starting = {slot.ready_ref: slot for slot in slots if not slot.ready}
            if not in_flight and exhausted and not queue:
                break
            if not slots:
                raise JobError(f"no actor is left to run the remaining shards ({actors_made} were started; see the errors above)")
            ready, _ = ray.wait([*in_flight, *starting], num_returns=1, timeout=0.5)
            for ref in ready:
                if ref in starting:
                    slot = starting[ref]
                    try:
                        log.info("actor ready: %s", ray.get(ref))
                        slot.ready = True
                        first_ready = first_ready or time.monotonic()
                        waiting_since = time.monotonic()
                    except ray.exceptions.RayActorError as error:
                        # Before any actor has loaded the model, a failure is the model's (missing
                        # compiled ops, no memory): the same would happen again. After, it is this
                        # actor's (its node died while it started): a fresh one takes its place.
                        slots.remove(slot)
                        log.error("an actor could not start: %s", _first_line(error))
                        if first_ready is not None:
                            replace_lost_actor(_first_line(error))
                        if not slots:
                            raise JobError(f"the segmentation actors could not start: {_first_line(error)}") from None
                    continue
                slot = in_flight[ref]
                order = list(slot.shards.items())  # submission order, which is the order they run in
                shard = slot.shards.pop(ref)
                try:
                    finished(shard, ray.get(ref))
                except ray.exceptions.RayActorError as error:
                    # The actor (or its node) died. Its shards ran in submission order: those
                    # before the one it was running had finished, that one is charged an
                    # attempt, and those queued behind it never ran, so they go back uncharged.
                    why = f"its actor died: {_first_line(error)}"
                    slot.shards.clear()
                    ray.wait([r for r, _ in order], num_returns=len(order), timeout=10)
                    charged, never_ran = False, []
                    for other_ref, other in order:
                        try:
                            finished(other, ray.get(other_ref, timeout=0))
                        except ray.exceptions.RayTaskError as task_error:  # it ran, and failed on its own
                            retry_or_fail(other, _first_line(getattr(task_error, "cause", None) or task_error))
                        except Exception:  # noqa: BLE001 - lost with the actor
                            if charged:
                                board.restart.remote(other.index)
                                never_ran.append(other.index)
                            else:
                                retry_or_fail(other, why)
                                charged = True
                    queue.extendleft(reversed(never_ran))
                    slots.remove(slot)
                    ray.kill(slot.actor, no_restart=True)
                    replace_lost_actor(_first_line(error))
                    continue
                except ray.exceptions.RayTaskError as error:  # e.g. the output could not be written
                    retry_or_fail(shard, _first_line(getattr(error, "cause", None) or error))
                    continue
                if bar is not None:
                    bar.set_postfix_str(f"shards {already_done + shards_done}/{plan.num_shards}", refresh=False)
            if bar is not None:
                # update() rather than setting n: it keeps tqdm's rate limit (one line per 10 s in logs).
                done_now = images_done + ray.get(board.total.remote())
                if done_now > bar.n:
                    bar.update(done_now - bar.n)
            if not any(s.ready for s in slots) and time.monotonic() - waiting_since > job.actor_start_timeout:
                raise JobError(
                    f"no segmentation actor started within {job.actor_start_timeout:.0f} s: the cluster lacks the "
                    f"resources each needs ({resources})"
                )
    finally:
        if bar is not None:
            bar.close()
        for slot in slots:
            ray.kill(slot.actor, no_restart=True)
        ray.kill(board, no_restart=True)
    stats.images, stats.shards = images_done, shards_done
    stats.processing_seconds = time.monotonic() - first_ready if first_ready else 0.0
    return stats


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    # Ray's errors carry a traceback; the last line says what happened.
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(error).__name__


def _progress_bar(enabled: bool, plan: Plan, todo: list[int], already_done: int):
    if not enabled:
        return None
    from tqdm import tqdm

    total = sum(plan.shard_length(i) for i in todo)  # from the plan's footer: exact, and no data read
    tty = sys.stderr.isatty()
    return tqdm(total=total, unit="img", desc="segment", dynamic_ncols=True, mininterval=0.5 if tty else 10.0,
                postfix=f"shards {already_done}/{plan.num_shards}")
