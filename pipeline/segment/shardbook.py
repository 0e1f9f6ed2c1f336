"""The segmentation driver's bookkeeping: which shard runs next, which is charged an attempt, which
is failed, whether a lost actor is replaced, and when the job is done. Plain Python, no Ray:
``scheduler`` carries its decisions out, and tests/test_scheduler.py checks them without a cluster."""

import logging
from collections import deque
from dataclasses import dataclass, field

log = logging.getLogger("maskray.segment")

MAX_SHARD_ATTEMPTS = 3


@dataclass
class RunStats:
    shards: int = 0  # committed by this run
    images: int = 0
    failed: dict[int, str] = field(default_factory=dict)
    retries: int = 0
    actors_lost: int = 0
    nodes: set[str] = field(default_factory=set)
    precisions: set[str] = field(default_factory=set)  # that the actors ran in (fp32, bf16, fp16)
    processing_seconds: float = 0.0


# What became of a shard an actor had in flight when it died.
@dataclass(frozen=True)
class Finished:
    """It was done before the actor went; ``summary`` is what the actor returned."""

    summary: dict


@dataclass(frozen=True)
class FailedOnItsOwn:
    """Its task ran and raised (e.g. the output could not be written): not the actor's death."""

    reason: str


@dataclass(frozen=True)
class Lost:
    """It went with the actor: it was running, or queued behind the one that was."""


Outcome = Finished | FailedOnItsOwn | Lost


@dataclass(frozen=True)
class ActorDeath:
    """What to do about an actor that died with shards in flight."""

    finished: list[int]  # to mark finished on the progress board
    restarted: list[int]  # to count again from zero on the progress board, in submission order
    replace: bool  # whether a fresh actor is started in its place


class ShardBook:
    """The shards still to (re)run and those in flight, the attempts charged to each, the failed ones
    with their reasons, and the actors lost and the replacements left; the driver asks it what to do next.

    A shard is in flight from ``next_shard`` until its outcome (``shard_finished``, ``shard_failed``
    or ``actor_died``); an outcome for a shard that is not in flight is refused with ValueError, so
    that a slip in the driver cannot count a shard twice or queue it twice."""

    def __init__(self, todo: list[int], initial_actors: int):
        self._retry: deque[int] = deque()  # run before any fresh shard
        self._fresh: deque[int] = deque(todo)
        self._in_flight: set[int] = set()
        self.attempts: dict[int, int] = {}
        self.stats = RunStats()
        self.replacements_left = 2 * initial_actors + 2  # actors that die are replaced, but not forever
        self.first_ready: float | None = None  # when the first actor had loaded the model

    def finished(self) -> bool:
        """Whether the job is over: no shard in flight and none waiting (to be retried or fresh).
        The driver asks before it looks for actors: the last shard may have failed for good with
        the last actor, and then the job is over, not stuck."""
        return not (self._in_flight or self._retry or self._fresh)

    def next_shard(self) -> int | None:
        """The shard to run next (retried ones first, then fresh), now in flight; None when none waits."""
        if self._retry:
            index = self._retry.popleft()
        elif self._fresh:
            index = self._fresh.popleft()
        else:
            return None
        self._in_flight.add(index)
        return index

    def _check_in_flight(self, indices: list[int]) -> None:
        """ValueError unless each of ``indices`` is in flight, and named once."""
        stray = [index for index in indices if index not in self._in_flight]
        if stray or len(set(indices)) != len(indices):
            raise ValueError(f"shards {stray or indices} are not in flight (once each): an outcome comes only "
                             "for a shard handed out by next_shard")

    def _land(self, index: int) -> None:
        """Shard ``index``, in flight, has its outcome (refused with ValueError if it was not in flight)."""
        self._check_in_flight([index])
        self._in_flight.remove(index)

    def shard_finished(self, index: int, summary: dict) -> None:
        self._land(index)
        self.stats.images += summary["images"]
        self.stats.shards += 1
        self.stats.nodes.add(summary["node"])
        self.stats.precisions.add(summary["precision"])

    def shard_failed(self, index: int, reason: str) -> bool:
        """Charges shard ``index`` an attempt; True if it is queued again, False if it has had its
        MAX_SHARD_ATTEMPTS and is failed with ``reason``. Either way it starts again from zero."""
        self._land(index)
        self.attempts[index] = self.attempts.get(index, 0) + 1
        if self.attempts[index] >= MAX_SHARD_ATTEMPTS:
            self.stats.failed[index] = reason
            log.error("shard %d failed %d times, giving up: %s", index, self.attempts[index], reason)
            return False
        log.warning("shard %d will be retried (%s)", index, reason)
        self.stats.retries += 1
        self._retry.append(index)
        return True

    def actor_ready(self, now: float) -> None:
        if self.first_ready is None:
            self.first_ready = now

    def actor_could_not_start(self, reason: str) -> bool:
        """Whether a fresh actor takes the place of one that failed to start. Before any actor has
        loaded the model, a failure is the model's (missing compiled ops, no memory): the same would
        happen again. After, it is this actor's (its node died while it started)."""
        log.error("an actor could not start: %s", reason)
        if self.first_ready is None:
            return False
        return self.actor_lost(reason)

    def actor_died(self, shards: list[tuple[int, Outcome]], reason: str) -> ActorDeath:
        """An actor (or its node) died with ``shards`` in flight, given in submission order, which
        is the order they take the model in: those before the first unfinished one had finished,
        that one is charged an attempt, and those behind it had at most read ahead, so they go
        back, uncharged, to the front of the queue. (If one of those was the cause, say an image
        that crashes its reader, it is first in its next actor and charged there.) One that
        failed on its own is charged its own reason."""
        self._check_in_flight([index for index, _ in shards])  # before any is counted
        finished, restarted, never_ran = [], [], []
        charged = False
        for index, outcome in shards:
            if isinstance(outcome, Finished):
                self.shard_finished(index, outcome.summary)
                finished.append(index)
                continue
            restarted.append(index)
            if isinstance(outcome, FailedOnItsOwn):
                self.shard_failed(index, outcome.reason)
            elif charged:
                self._land(index)
                never_ran.append(index)
            else:
                self.shard_failed(index, f"its actor died: {reason}")
                charged = True
        self._retry.extendleft(reversed(never_ran))
        return ActorDeath(finished, restarted, self.actor_lost(reason))

    def actor_lost(self, reason: str) -> bool:
        """Counts a lost actor; True if a replacement is asked for, while replacements last."""
        self.stats.actors_lost += 1
        if self.replacements_left <= 0:
            return False
        log.warning("an actor was lost (%s); a replacement is asked for", reason)
        self.replacements_left -= 1
        return True

    def result(self, now: float) -> RunStats:
        self.stats.processing_seconds = now - self.first_ready if self.first_ready is not None else 0.0
        return self.stats
