"""Joining a Ray cluster, or starting a private one on this machine.

Every job (segment, train) connects the same way: the cluster at ``--address`` or
RAY_ADDRESS when given (``ray job submit`` sets RAY_ADDRESS); otherwise a local cluster bound
to 127.0.0.1 only, without the dashboard, so that nothing listens on the machine's other
addresses. A Ray this process already started (tests, notebooks) is reused.
"""

import logging
import os


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
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=dashboard, dashboard_host="127.0.0.1",
                 logging_level=logging.WARNING)
