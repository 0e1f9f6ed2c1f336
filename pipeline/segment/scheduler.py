"""The segmentation driver's scheduling: shards handed to actors, retried, charged, and counted."""

import json
import logging
import sys
import time
import uuid
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from maskray.pipeline.cluster import connect_ray
from maskray.pipeline.errors import JobError
from maskray.pipeline.segment.actors import actor_layout, first_line, make_actor_class, make_board_class
from maskray.pipeline.segment.manifest import Manifest
from maskray.pipeline.segment.plan import Plan, Shard
from maskray.pipeline.segment.settings import SegmentJob

log = logging.getLogger("maskray.segment")

# One running, one queued in the actor, so that it never waits for the driver between shards.
# The actor runs them one at a time: a threaded actor (max_concurrency=2) measured 15% slower,
# its inference hopping between executor threads (bench/pipeline.py, BENCHMARKS.md).
SHARDS_IN_FLIGHT_PER_ACTOR = 2
MAX_SHARD_ATTEMPTS = 3


@dataclass
class RunStats:
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


def execute(job: SegmentJob, weights, manifest: Manifest, plan: Plan, todo: list[int], already_done: int) -> RunStats:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    connect_ray(job.address)
    num_actors, resources = actor_layout(job)
    threads = int(resources.get("num_cpus", 1)) if "num_gpus" not in resources else None
    # The board lives on the driver's node: it is lost only with the driver, never with a worker
    # node (the driver asks it for totals, and a dead board would end the job).
    board = make_board_class().options(scheduling_strategy=NodeAffinitySchedulingStrategy(
        ray.get_runtime_context().get_node_id(), soft=False)).remote()
    actor_class = make_actor_class()
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
    stats = RunStats()
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
                        log.error("an actor could not start: %s", first_line(error))
                        if first_ready is not None:
                            replace_lost_actor(first_line(error))
                        if not slots:
                            raise JobError(f"the segmentation actors could not start: {first_line(error)}") from None
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
                    why = f"its actor died: {first_line(error)}"
                    slot.shards.clear()
                    ray.wait([r for r, _ in order], num_returns=len(order), timeout=10)
                    charged, never_ran = False, []
                    for other_ref, other in order:
                        try:
                            finished(other, ray.get(other_ref, timeout=0))
                        except ray.exceptions.RayTaskError as task_error:  # it ran, and failed on its own
                            retry_or_fail(other, first_line(getattr(task_error, "cause", None) or task_error))
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
                    replace_lost_actor(first_line(error))
                    continue
                except ray.exceptions.RayTaskError as error:  # e.g. the output could not be written
                    retry_or_fail(shard, first_line(getattr(error, "cause", None) or error))
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



def _progress_bar(enabled: bool, plan: Plan, todo: list[int], already_done: int):
    if not enabled:
        return None
    from tqdm import tqdm

    total = sum(plan.shard_length(i) for i in todo)  # from the plan's footer: exact, and no data read
    tty = sys.stderr.isatty()
    return tqdm(total=total, unit="img", desc="segment", dynamic_ncols=True, mininterval=0.5 if tty else 10.0,
                postfix=f"shards {already_done}/{plan.num_shards}")
