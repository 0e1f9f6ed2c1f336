"""The segmentation driver's decisions (``ShardBook``), without Ray: which shard runs next, which is
charged an attempt, which goes back uncharged and where, which is failed and why, when a lost
actor is replaced, and when the job is over. tests/test_cluster_faults.py and tests/test_segment.py
check the same on real clusters."""

import pytest

from maskray.pipeline.segment.shardbook import (
    MAX_SHARD_ATTEMPTS,
    ActorDeath,
    FailedOnItsOwn,
    Finished,
    Lost,
    RunStats,
    ShardBook,
)


def summary(images: int, node: str = "node-a") -> dict:
    return {"images": images, "node": node, "precision": "fp32"}


def take(book: ShardBook, count: int) -> list[int | None]:
    return [book.next_shard() for _ in range(count)]


def test_fresh_shards_in_order_then_none():
    book = ShardBook([4, 2, 9], initial_actors=1)
    assert take(book, 4) == [4, 2, 9, None]
    assert book.next_shard() is None  # and stays so


def test_a_retried_shard_runs_before_fresh_ones():
    book = ShardBook([0, 1, 2, 3], initial_actors=1)
    assert take(book, 2) == [0, 1]
    assert book.shard_failed(1, "disk full") is True
    assert take(book, 4) == [1, 2, 3, None]
    assert (book.attempts, book.stats.retries, book.stats.failed) == ({1: 1}, 1, {})


def test_a_retry_after_exhaustion_is_handed_out_again():
    book = ShardBook([0], initial_actors=1)
    assert take(book, 2) == [0, None]
    book.shard_failed(0, "timeout")
    assert take(book, 2) == [0, None]


def test_no_shard_waits_once_the_last_one_failed_for_good():
    # The driver ends on this even when the shard's failure took the last actor with it.
    book = ShardBook([0], initial_actors=1)
    for attempt in range(MAX_SHARD_ATTEMPTS):
        assert book.next_shard() == 0
        book.actor_died([(0, Lost())], f"killed {attempt}")
    assert (book.finished(), book.stats.failed) == (True, {0: "its actor died: killed 2"})


def test_finished_shards_count_images_shards_and_nodes():
    book = ShardBook([0, 1, 2], initial_actors=2)
    assert take(book, 3) == [0, 1, 2]
    book.shard_finished(0, summary(5, "node-a"))
    book.shard_finished(1, summary(3, "node-b"))
    book.shard_finished(2, summary(0, "node-a"))
    assert (book.stats.images, book.stats.shards, book.stats.nodes) == (8, 3, {"node-a", "node-b"})
    assert (book.attempts, book.stats.retries, book.stats.failed) == ({}, 0, {})


def test_a_shard_failing_max_attempts_times_is_failed_with_its_last_reason():
    assert MAX_SHARD_ATTEMPTS == 3
    book = ShardBook([7], initial_actors=1)
    assert book.next_shard() == 7
    assert book.shard_failed(7, "first") is True
    assert book.next_shard() == 7
    assert book.shard_failed(7, "second") is True
    assert book.next_shard() == 7
    assert book.shard_failed(7, "third") is False
    assert book.next_shard() is None  # not queued again
    assert book.stats.failed == {7: "third"}
    assert (book.attempts, book.stats.retries) == ({7: 3}, 2)


def test_actor_death_charges_the_running_shard_and_requeues_those_behind_it_uncharged():
    book = ShardBook(list(range(8)), initial_actors=2)
    book.actor_ready(now=0.0)
    assert take(book, 5) == [0, 1, 2, 3, 4]  # 0..3 to the dying actor, say, in that order; 4 to another
    book.shard_failed(4, "disk full")  # an earlier retry, already queued
    death = book.actor_died([(0, Finished(summary(2))), (1, Lost()), (2, Lost()), (3, Lost())], "node gone")
    assert death == ActorDeath(finished=[0], restarted=[1, 2, 3], replace=True)
    # The uncharged ones at the front, in order; the charged one behind the retry queued before it.
    assert take(book, 8) == [2, 3, 4, 1, 5, 6, 7, None]
    assert book.attempts == {4: 1, 1: 1}
    assert (book.stats.retries, book.stats.shards, book.stats.images, book.stats.actors_lost) == (2, 1, 2, 1)
    assert book.stats.failed == {}


def test_actor_death_with_two_in_flight_like_the_driver():
    """SHARDS_IN_FLIGHT_PER_ACTOR = 2: one running (charged), one queued (back first, uncharged)."""
    book = ShardBook([0, 1, 2, 3], initial_actors=1)
    book.actor_ready(now=0.0)
    assert take(book, 2) == [0, 1]
    death = book.actor_died([(0, Lost()), (1, Lost())], "ActorDiedError")
    assert death == ActorDeath(finished=[], restarted=[0, 1], replace=True)
    assert take(book, 5) == [1, 0, 2, 3, None]
    assert (book.attempts, book.stats.retries, book.stats.actors_lost) == ({0: 1}, 1, 1)


def test_the_running_shard_is_charged_with_the_actors_death_and_fails_at_max_attempts():
    book = ShardBook([0, 1, 2], initial_actors=1)
    book.actor_ready(now=0.0)
    assert book.next_shard() == 0
    for _ in range(MAX_SHARD_ATTEMPTS - 1):  # shard 0 fails twice on its own, and is taken again
        book.shard_failed(0, "flaky")
        assert book.next_shard() == 0
    assert book.next_shard() == 1
    death = book.actor_died([(0, Lost()), (1, Lost())], "the node was removed")
    assert death.restarted == [0, 1]
    assert book.stats.failed == {0: "its actor died: the node was removed"}
    assert book.attempts == {0: 3}
    assert take(book, 3) == [1, 2, None]  # 0 is not queued again


def test_a_shard_that_failed_on_its_own_during_an_actors_death_is_charged_its_own_reason():
    book = ShardBook([0, 1, 2, 3], initial_actors=1)
    book.actor_ready(now=0.0)
    assert take(book, 2) == [0, 1]
    for _ in range(MAX_SHARD_ATTEMPTS - 1):  # shard 1 fails twice on its own, and is taken again
        book.shard_failed(1, "earlier")
        assert book.next_shard() == 1
    assert book.next_shard() == 2
    # The dying actor had 1 (ran, and failed on its own), then 0 (running), then 2 (queued).
    death = book.actor_died([(1, FailedOnItsOwn("the output could not be written")), (0, Lost()), (2, Lost())],
                            "ActorDiedError")
    assert death == ActorDeath(finished=[], restarted=[1, 0, 2], replace=True)
    assert book.stats.failed == {1: "the output could not be written"}
    assert book.attempts == {1: 3, 0: 1}
    assert book.stats.retries == 3  # shard 1 twice, shard 0 once
    assert take(book, 4) == [2, 0, 3, None]


def test_a_failure_on_its_own_before_the_lost_shards_does_not_spare_the_first_lost_one():
    book = ShardBook([5, 6, 7], initial_actors=1)
    book.actor_ready(now=0.0)
    assert take(book, 3) == [5, 6, 7]
    death = book.actor_died([(5, FailedOnItsOwn("bad bytes")), (6, Lost()), (7, Lost())], "oom")
    assert death == ActorDeath(finished=[], restarted=[5, 6, 7], replace=True)
    assert book.attempts == {5: 1, 6: 1}  # 6 was running: charged; 7 never ran
    assert book.stats.retries == 2
    assert take(book, 4) == [7, 5, 6, None]


def test_replacements_last_twice_the_initial_actors_plus_two():
    book = ShardBook(list(range(100)), initial_actors=2)
    book.actor_ready(now=0.0)
    assert book.replacements_left == 6
    decisions = [book.actor_died([(book.next_shard(), Lost())], f"death {n}").replace for n in range(8)]
    assert decisions == [True] * 6 + [False] * 2
    assert (book.stats.actors_lost, book.replacements_left) == (8, 0)


def test_an_actor_failing_to_start_before_any_was_ready_is_not_replaced():
    book = ShardBook([0, 1], initial_actors=2)
    assert book.actor_could_not_start("no module named maskray._ops") is False
    assert (book.stats.actors_lost, book.replacements_left) == (0, 6)


def test_an_actor_failing_to_start_after_one_was_ready_is_replaced_while_replacements_last():
    book = ShardBook([0, 1], initial_actors=1)
    book.actor_ready(now=3.0)
    assert [book.actor_could_not_start("its node died") for _ in range(5)] == [True] * 4 + [False]
    assert (book.stats.actors_lost, book.replacements_left) == (5, 0)


def test_processing_time_runs_from_the_first_ready_actor():
    book = ShardBook([0], initial_actors=2)
    book.actor_ready(now=10.0)
    book.actor_ready(now=12.0)  # a second actor does not move the start
    assert book.next_shard() == 0
    book.shard_finished(0, summary(4))
    assert book.result(now=25.5) == RunStats(shards=1, images=4, nodes={"node-a"}, precisions={"fp32"},
                                                  processing_seconds=15.5)


def test_no_processing_time_when_no_actor_was_ever_ready():
    assert ShardBook([0], initial_actors=1).result(now=99.0).processing_seconds == 0.0


def test_the_job_is_over_once_no_shard_is_in_flight_or_waiting():
    assert ShardBook([], initial_actors=1).finished() is True
    book = ShardBook([0, 1], initial_actors=1)
    assert book.finished() is False
    assert take(book, 3) == [0, 1, None]
    assert book.finished() is False  # nothing waits, but both are in flight
    book.shard_finished(0, summary(1))
    assert book.shard_failed(1, "flaky") is True
    assert book.finished() is False  # 1 waits to be retried
    assert book.next_shard() == 1
    book.actor_died([(1, Lost())], "oom")  # charged, and queued again
    assert (book.finished(), book.next_shard()) == (False, 1)
    book.shard_failed(1, "flaky again")  # the third attempt: failed for good
    assert (book.finished(), book.stats.failed) == (True, {1: "flaky again"})


def test_an_outcome_for_a_shard_not_in_flight_is_refused_and_changes_nothing():
    book = ShardBook([0, 1, 2], initial_actors=1)
    assert take(book, 2) == [0, 1]
    with pytest.raises(ValueError, match=r"shards \[2\] are not in flight"):
        book.shard_failed(2, "never handed out")
    with pytest.raises(ValueError, match=r"shards \[2\] are not in flight"):
        book.shard_finished(2, summary(3))
    with pytest.raises(ValueError, match=r"shards \[2\] are not in flight"):
        book.actor_died([(0, Finished(summary(1))), (1, Lost()), (2, Lost())], "node gone")
    with pytest.raises(ValueError, match="not in flight"):
        book.actor_died([(0, Lost()), (0, Lost())], "named twice")
    assert (book.attempts, book.stats) == ({}, RunStats())  # nothing was counted by the refused calls
    book.shard_finished(0, summary(1))
    with pytest.raises(ValueError, match=r"shards \[0\] are not in flight"):
        book.shard_finished(0, summary(1))  # an outcome comes once
    assert take(book, 2) == [2, None]  # 1 still in flight, 2 never queued twice
