"""Several nodes, and a node lost mid-job: a real multi-node Ray cluster on 127.0.0.1
(``ray.cluster_utils.Cluster``: a head without CPUs, so that every actor runs on an added node),
the output read back with DuckDB and compared row by row with an undisturbed run's.

What it proves: a job spreads its shards over the nodes; when a node dies mid-job, the shards
its actor had in flight are redone on the surviving node, the replacement actor that finds no
room anywhere neither hangs the job nor holds it up, and the output is exactly an undisturbed
run's, with no image or instance twice and nothing half-written left behind.
"""

import threading

import pytest

from maskray.pipeline.segment.job import run_segment
from maskray.pipeline.segment.settings import SegmentJob
from tests.test_segment import (  # noqa: F401 - local_input and weights_path are fixtures
    assert_only_whole_parts,
    assert_same_rows,
    done_markers,
    local_input,
    wait_for,
    weights_path,
)

pytestmark = pytest.mark.slow
TOTAL_SHARDS = 14  # local_input: 27 images (24 + 3 broken), 2 per shard


def test_shards_spread_over_nodes_and_a_lost_node_loses_nothing(ray_cluster, local_input, weights_path, tmp_path):  # noqa: F811
    import ray

    # Two worker nodes of 2 CPUs: one actor of 2 CPUs fits on each, none anywhere else.
    first = ray_cluster.add_node(num_cpus=2, node_ip_address="127.0.0.1")
    second = ray_cluster.add_node(num_cpus=2, node_ip_address="127.0.0.1")
    ray.init(address=ray_cluster.address)
    ray_cluster.wait_for_nodes()

    def job(output, **options) -> SegmentJob:
        return SegmentJob(str(local_input), str(output), str(weights_path), shard_size=2, cpus_per_actor=2,
                          **{"progress": False, **options})

    # 1. Undisturbed: both nodes commit shards.
    reference = tmp_path / "reference"
    undisturbed = run_segment(job(reference))
    assert undisturbed.complete and undisturbed.shards_run == TOTAL_SHARDS and undisturbed.retries == 0
    assert undisturbed.nodes == {first.node_id, second.node_id}

    # 2. The second node removed once a few shards are done: its raylet, its actor and the shards
    #    that actor had in flight are gone. The replacement actor finds no node with 2 free CPUs;
    #    the job must finish on the first node without waiting for it (actor_start_timeout is
    #    far longer than the join below allows). With a progress bar: its board must survive too.
    output = tmp_path / "out"
    outcome = {}

    def run() -> None:
        try:
            outcome["summary"] = run_segment(job(output, progress=True, actor_start_timeout=3600))
        except BaseException as error:  # noqa: BLE001 - reported by the assertions below
            outcome["error"] = error

    def job_actors() -> dict[str, str]:
        """The segmentation actors Ray lists, by name, with their namespaces."""
        return {a["name"]: a["namespace"] for a in ray.util.list_named_actors(all_namespaces=True)
                if a["name"].startswith("maskray-segment-")}

    earlier = set(job_actors())  # the undisturbed run's, if Ray still lists them
    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    try:
        # Both actors loaded and at work (a call queues behind the shards each has in flight), so
        # that the node goes with an actor that is running shards, not one still starting.
        wait_for(lambda: len(set(job_actors()) - earlier) == 2 or not runner.is_alive(), 300, "the job's two actors")
        ours = [ray.get_actor(name, namespace=space) for name, space in job_actors().items() if name not in earlier]
        ray.get([actor.ready.remote() for actor in ours], timeout=300)
        wait_for(lambda: done_markers(output) >= 3 or not runner.is_alive(), 300, "the first shards")
        done_at_removal = done_markers(output)
        assert runner.is_alive() and done_at_removal < TOTAL_SHARDS, f"the job ended before the node could be removed: {outcome}"
        ray_cluster.remove_node(second)
        # While the job goes on, only whole part files are ever visible.
        while runner.is_alive():
            assert_only_whole_parts(output, finished=False)
            runner.join(timeout=0.5)
            if done_markers(output) == TOTAL_SHARDS:
                break
    finally:
        runner.join(timeout=300)
    assert not runner.is_alive(), "the job hung after losing a node"
    assert "error" not in outcome, repr(outcome.get("error"))
    summary = outcome["summary"]

    assert summary.complete and summary.shards == TOTAL_SHARDS
    # One shard charged (the one running when the node went); the one queued behind it went back uncharged.
    assert summary.actors_lost == 1 and summary.retries == 1
    assert "1 actor(s) lost" in summary.describe()
    # The first node finished the job; the second committed only what it did before it went.
    assert first.node_id in summary.nodes and summary.nodes <= {first.node_id, second.node_id}
    assert_same_rows(output, reference)
    assert_only_whole_parts(output)
