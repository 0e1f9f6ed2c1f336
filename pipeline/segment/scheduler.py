"""The segmentation driver's scheduling on Ray: shards handed to actors, their outcomes read back,
lost actors killed and replaced. What each outcome means (a shard counted, charged an attempt,
requeued or failed; an actor replaced or not) is decided by ``shardbook.ShardBook``."""

import json
import logging
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from maskray.pipeline.cluster import connect_ray
from maskray.pipeline.errors import JobError
from maskray.pipeline.segment.actors import actor_layout, first_line, make_actor_class, make_board_class
from maskray.pipeline.segment.manifest import Manifest
from maskray.pipeline.segment.plan import Plan, Shard
from maskray.pipeline.segment.settings import SegmentJob
from maskray.pipeline.segment.shardbook import FailedOnItsOwn, Finished, Lost, Outcome, RunStats, ShardBook

log = logging.getLogger("maskray.segment")

# Two at once in each actor (max_concurrency): while one shard is in the model, the next one's
# reads start and its first batch is made ready, and then the first one's commit is written while
# the next one is in the model, so that the model never waits for the driver, for storage's first
# answers or for a commit between shards. The worker runs the model calls of both on one thread
# of its own, a shard after the other (segment.worker): an actor whose two executor threads each
# called the model measured 15% slower (bench/pipeline.py, BENCHMARKS.md).
SHARDS_IN_FLIGHT_PER_ACTOR = 2
# How long the driver waits for the outcome of something in flight before it looks at the
# progress and the start timeout again.
POLL_SECONDS = 0.5
# How long a dead actor's shards are given to settle, so that one it finished just before it died
# is counted as finished rather than lost.
SETTLE_SECONDS = 10


def execute(job: SegmentJob, weights, manifest: Manifest, plan: Plan, todo: list[int], already_done: int) -> RunStats:
    connect_ray(job.address)
    return ShardDispatcher(job, weights, manifest, plan, todo, already_done).run()


@dataclass
class _Slot:
    """An actor and the shards it has in flight; ``ready`` once its model is loaded."""

    actor: Any
    ready_ref: Any
    ready: bool = False
    shards: dict = field(default_factory=dict)  # ObjectRef -> Shard, in submission order


class ShardDispatcher:
    """Runs a job's shards on Ray actors: hands shards to ready actors, waits for what comes back,
    and carries out what its ``ShardBook`` decides about it."""

    def __init__(self, job: SegmentJob, weights, manifest: Manifest, plan: Plan, todo: list[int], already_done: int):
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        self.job, self.plan, self.already_done = job, plan, already_done
        num_actors, self.resources = actor_layout(job)
        # The board lives on the driver's node: it is lost only with the driver, never with a worker
        # node (the driver asks it for totals, and a dead board would end the job).
        self.board = make_board_class().options(scheduling_strategy=NodeAffinitySchedulingStrategy(
            ray.get_runtime_context().get_node_id(), soft=False)).remote()
        self.actor_class = make_actor_class()
        self.actor_options = dict(self.resources, max_concurrency=SHARDS_IN_FLIGHT_PER_ACTOR, max_restarts=0)
        threads = int(self.resources.get("num_cpus", 1)) if "num_gpus" not in self.resources else None
        metadata = {"job_id": manifest.job_id, "weights": json.dumps(manifest.weights),
                    "versions": json.dumps(manifest.versions), "config": json.dumps(manifest.config)}
        self.actor_arguments = (ray.put(weights), job.output, job.storage_options, job.overrides(), metadata,
                                job.worker_options(), threads, self.board)
        # Named, so that operators (and tests) can find a job's actors; unique per run, since a killed
        # run's actors may still be shutting down when the rerun starts.
        self.job_name = f"maskray-segment-{manifest.job_id[:8]}-{uuid.uuid4().hex[:6]}"
        self.slots: list[_Slot] = []
        self.actors_made = 0
        for _ in range(min(num_actors, len(todo))):
            self._start_actor()
        self.book = ShardBook(todo, initial_actors=len(self.slots))
        self.waiting_since = time.monotonic()  # for an actor to become ready
        self.bar = _progress_bar(job.progress, plan, todo, already_done)

    def run(self) -> RunStats:
        import ray

        try:
            while self._step():
                pass
        finally:
            if self.bar is not None:
                self.bar.close()
            for slot in self.slots:
                ray.kill(slot.actor, no_restart=True)
            ray.kill(self.board, no_restart=True)
        return self.book.result(time.monotonic())

    def _step(self) -> bool:
        """Shards handed out, then one outcome waited for and acted on; False once the book says the job is over."""
        import ray

        self._hand_out()
        if self.book.finished():  # before the check for actors (see finished)
            return False
        in_flight = {ref: slot for slot in self.slots for ref in slot.shards}
        starting = {slot.ready_ref: slot for slot in self.slots if not slot.ready}
        if not self.slots:
            raise JobError(f"no actor is left to run the remaining shards ({self.actors_made} were started; "
                           "see the errors above)")
        ready, _ = ray.wait([*in_flight, *starting], num_returns=1, timeout=POLL_SECONDS)
        for ref in ready:
            if ref in starting:
                self._actor_started(starting[ref])
            else:
                self._shard_returned(in_flight[ref], ref)
        self._show_progress()
        waited = time.monotonic() - self.waiting_since
        if not any(slot.ready for slot in self.slots) and waited > self.job.actor_start_timeout:
            raise JobError(
                f"no segmentation actor started within {self.job.actor_start_timeout:.0f} s: the cluster lacks the "
                f"resources each needs ({self.resources})"
            )
        return True

    def _hand_out(self) -> None:
        """Shards to the ready actors, up to SHARDS_IN_FLIGHT_PER_ACTOR each, while any are left."""
        for slot in self.slots:
            while slot.ready and len(slot.shards) < SHARDS_IN_FLIGHT_PER_ACTOR:
                index = self.book.next_shard()
                if index is None:
                    return
                shard = self.plan.shard(index)
                slot.shards[slot.actor.process.remote(shard)] = shard

    def _actor_started(self, slot: _Slot) -> None:
        import ray

        try:
            log.info("actor ready: %s", ray.get(slot.ready_ref))
        except ray.exceptions.RayActorError as error:
            self.slots.remove(slot)
            if self.book.actor_could_not_start(first_line(error)):
                # A fresh actor in its place: it starts when a node has room; until then the other
                # actors go on, and one that never starts (its node is gone for good) holds nothing up.
                self._start_actor()
            if not self.slots:
                raise JobError(f"the segmentation actors could not start: {first_line(error)}") from None
            return
        slot.ready = True
        self.book.actor_ready(time.monotonic())
        self.waiting_since = time.monotonic()

    def _shard_returned(self, slot: _Slot, ref) -> None:
        import ray

        in_order = list(slot.shards.items())  # submission order, which is the order they take the model in
        shard: Shard = slot.shards.pop(ref)
        try:
            summary = ray.get(ref)
        except ray.exceptions.RayActorError as error:  # the actor (or its node) died
            self._actor_died(slot, in_order, first_line(error))
            return
        except ray.exceptions.RayTaskError as error:  # e.g. the output could not be written
            self.book.shard_failed(shard.index, _task_failure(error))
            self.board.restart.remote(shard.index)
            return
        self.book.shard_finished(shard.index, summary)
        self.board.finish.remote(shard.index)
        if self.bar is not None:
            self.bar.set_postfix_str(f"shards {self.already_done + self.book.stats.shards}/{self.plan.num_shards}",
                                     refresh=False)

    def _actor_died(self, slot: _Slot, in_order: list[tuple[Any, Shard]], reason: str) -> None:
        import ray

        slot.shards.clear()
        ray.wait([ref for ref, _ in in_order], num_returns=len(in_order), timeout=SETTLE_SECONDS)
        death = self.book.actor_died([(shard.index, _outcome(ref)) for ref, shard in in_order], reason)
        for index in death.finished:
            self.board.finish.remote(index)
        for index in death.restarted:
            self.board.restart.remote(index)
        self.slots.remove(slot)
        ray.kill(slot.actor, no_restart=True)
        if death.replace:
            # A fresh actor in its place, started when a node has room; the others go on meanwhile.
            self._start_actor()

    def _start_actor(self) -> None:
        actor = self.actor_class.options(**self.actor_options, name=f"{self.job_name}-{self.actors_made}").remote(
            *self.actor_arguments)
        self.slots.append(_Slot(actor, actor.ready.remote()))
        self.actors_made += 1

    def _show_progress(self) -> None:
        import ray

        if self.bar is None:
            return
        # update() rather than setting n: it keeps tqdm's rate limit (one line per 10 s in logs).
        done_now = self.book.stats.images + ray.get(self.board.total.remote())
        if done_now > self.bar.n:
            self.bar.update(done_now - self.bar.n)


def _outcome(ref) -> Outcome:
    """What became of a shard of an actor that died (its ref already settled, or never to be)."""
    import ray

    try:
        return Finished(ray.get(ref, timeout=0))
    except ray.exceptions.RayTaskError as error:  # it ran, and failed on its own
        return FailedOnItsOwn(_task_failure(error))
    except Exception:  # noqa: BLE001 - lost with the actor
        return Lost()


def _task_failure(error) -> str:
    return first_line(getattr(error, "cause", None) or error)


def _progress_bar(enabled: bool, plan: Plan, todo: list[int], already_done: int):
    if not enabled:
        return None
    from tqdm import tqdm

    total = sum(plan.shard_length(i) for i in todo)  # from the plan's footer: exact, and no data read
    tty = sys.stderr.isatty()
    return tqdm(total=total, unit="img", desc="segment", dynamic_ncols=True, mininterval=0.5 if tty else 10.0,
                postfix=f"shards {already_done}/{plan.num_shards}")
