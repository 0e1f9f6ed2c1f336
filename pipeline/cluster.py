"""Joining a Ray cluster, or starting a private one on this machine.

Every job (segment, train) connects the same way: the cluster at ``--address`` or
RAY_ADDRESS when given (``ray job submit`` sets RAY_ADDRESS); otherwise a local cluster that
listens on 127.0.0.1 only (its GCS, raylet, object manager, workers, agents and dashboard),
so that nothing is reachable from the machine's other addresses. A Ray this process already
started (tests, notebooks) is reused.
"""

import logging
import os

# Ray picks a local node's address when it is imported: with this set to 0 it takes the
# loopback address (and so binds its servers there) instead of the machine's outward one.
_LOOPBACK_ONLY_VARIABLE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def connect_ray(address: str | None = None, dashboard: bool = False) -> None:
    """``dashboard``: start a local cluster with its dashboard (on 127.0.0.1 too). Ray Train
    needs it: its placement-group cleaner asks the dashboard's State API about the run, and
    logs a warning every few seconds when there is none."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        loopback_only()
        ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=dashboard, dashboard_host="127.0.0.1",
                 logging_level=logging.WARNING)


def loopback_only() -> None:
    """Makes the local cluster that ray.init starts next take 127.0.0.1 as its node address.

    ``ray.init(_node_ip_address="127.0.0.1")`` alone is not enough: Ray swaps a loopback address
    for the machine's outward one, and its agents and gRPC servers then listen on that address
    or on all of them (0.0.0.0, ::). Ray keeps it from doing so when the variable above is 0.
    The cluster's processes read it from the environment they inherit; this process read it
    when it imported ray, which may have been before now, so its copy is set as well. Only for
    a cluster started here: a driver joining a real cluster must keep its outward address.
    """
    os.environ[_LOOPBACK_ONLY_VARIABLE] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False
