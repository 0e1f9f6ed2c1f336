"""Joining a Ray cluster, or starting a private one on this machine.

Every job (segment, train) connects the same way: the cluster at ``--address`` or
RAY_ADDRESS when given (``ray job submit`` sets RAY_ADDRESS; a cluster at 127.0.0.1 is joined
from 127.0.0.1); otherwise a local cluster that listens on 127.0.0.1 only (its GCS, raylet,
object manager, workers, agents and dashboard), so that nothing is reachable from the
machine's other addresses. A Ray this process already started (tests, notebooks) is reused.

``start_head`` and ``stop_head`` (``maskray cluster start|stop``) run a cluster of one's own on
this machine for ``ray job submit``: see below.
"""

import dataclasses
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from maskray.pipeline.errors import MaskrayError

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
        if address.rsplit(":", 1)[0] in ("127.0.0.1", "localhost"):
            loopback_only()  # a cluster on loopback (maskray cluster start): this driver's node is 127.0.0.1 too
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


# -----------------------------------------------------------------------------------------------
# A cluster of one's own on this machine (``maskray cluster start|env|stop``)
#
# ``ray start --head --block`` in a session of its own, on 127.0.0.1 only (the node address, the
# dashboard, and the variable above in its environment, which every process of the cluster
# inherits), with token authentication on and a token of its own; every port chosen free, and a
# temp dir of its own, so that it starts beside any other Ray on the machine and ``stop`` stops
# exactly it (``ray stop`` would stop every Ray of the user's). What it started is recorded in
# ~/.maskray/cluster/: cluster.json (pid, temp dir, addresses), the token (mode 0600) and
# ray-start.log. Linux: its processes are found through /proc.

_STATE_FOLDER = Path("~/.maskray/cluster")
# In the environment of every process of a cluster started here: which cluster it belongs to.
_MARK_VARIABLE = "MASKRAY_CLUSTER"
# What a client of the cluster is told: the environment `ray job submit` and `ray.init` read.
# The last: a driver started in the client's shell (ray.init) takes 127.0.0.1 as its node's address,
# the cluster's, as it must to join (it waits forever for a node at its outward address otherwise).
CLIENT_VARIABLES = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH",
                    _LOOPBACK_ONLY_VARIABLE)


class ClusterError(MaskrayError):
    """The cluster cannot be started or stopped as asked; the message says why."""


@dataclass(frozen=True)
class HeadNode:
    """A cluster that ``start_head`` started."""

    pid: int  # the `ray start --block` process: its session holds the cluster's processes
    mark: str  # the value of _MARK_VARIABLE in their environment
    temp_dir: str  # Ray's temp dir: session_*/logs, the unpacked working dirs of jobs
    gcs_address: str  # 127.0.0.1:PORT, what ray.init joins
    dashboard_url: str  # http://127.0.0.1:PORT, where `ray job submit` sends a job
    token_path: str  # the cluster's token, readable by the user alone
    log: str  # what `ray start` printed

    def client_environment(self) -> dict[str, str]:
        """The environment of a client: `ray job submit` (its RAY_API_SERVER_ADDRESS comes before
        RAY_ADDRESS), `ray.init` and `maskray segment` (RAY_ADDRESS), with the cluster's token."""
        return dict(zip(CLIENT_VARIABLES, (self.gcs_address, self.dashboard_url, "token", self.token_path, "0")))

    def processes(self) -> list[int]:
        """The pids of the cluster's processes still alive: those of `ray start`'s session and any
        that carries the cluster's mark (a job's driver runs in a session of its own)."""
        mark = f"{_MARK_VARIABLE}={self.mark}".encode()
        found = []
        for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
            try:
                if os.getsid(pid) == self.pid or mark in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                    found.append(pid)
            except OSError:  # gone, or not ours to look at
                pass
        return found


def state_folder() -> Path:
    return _STATE_FOLDER.expanduser()


def recorded_head() -> HeadNode | None:
    """The cluster ``start_head`` recorded, if its `ray start` still runs (else None)."""
    try:
        head = HeadNode(**json.loads((state_folder() / "cluster.json").read_text()))
    except (OSError, ValueError, TypeError):
        return None
    return head if _is_our_head(head) else None


def start_head(num_cpus: int | None = None, num_gpus: int | None = None, object_store_memory: int | None = None,
               port: int | None = None, dashboard_port: int | None = None, temp_dir: str | None = None,
               timeout: float = 180.0) -> HeadNode:
    """Starts a one-node cluster on 127.0.0.1 and records it; returns once its dashboard answers."""
    running = recorded_head()
    if running is not None:
        raise ClusterError(f"a cluster is already running (dashboard {running.dashboard_url}, pid {running.pid}): "
                           "stop it first: eval \"$(maskray cluster stop)\"")
    state = state_folder()
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    gcs, dashboard, agent, client = _free_ports(4, fixed=[port, dashboard_port])
    # Short, for the socket paths under it (at most 107 bytes); /tmp rather than a long TMPDIR.
    temp_dir = os.path.abspath(temp_dir) if temp_dir else tempfile.mkdtemp(prefix="maskray-ray-", dir="/tmp")
    token_path = state / "auth_token"
    token_path.unlink(missing_ok=True)
    descriptor = os.open(token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as out:
        out.write(secrets.token_hex(32))
    head_env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN")}
    mark = secrets.token_hex(8)
    head_env.update({_LOOPBACK_ONLY_VARIABLE: "0", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path),
                     _MARK_VARIABLE: mark})
    command = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
               "--node-ip-address=127.0.0.1", f"--port={gcs}", "--include-dashboard=true",
               "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--dashboard-agent-listen-port={agent}",
               f"--ray-client-server-port={client}", f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    for flag, value in (("--num-cpus", num_cpus), ("--num-gpus", num_gpus), ("--object-store-memory", object_store_memory)):
        if value is not None:
            command.append(f"{flag}={value}")
    log = state / "ray-start.log"
    with open(log, "w") as out:
        process = subprocess.Popen(command, env=head_env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True, cwd=temp_dir)
    head = HeadNode(pid=process.pid, mark=mark, temp_dir=temp_dir, gcs_address=f"127.0.0.1:{gcs}",
                    dashboard_url=f"http://127.0.0.1:{dashboard}", token_path=str(token_path), log=str(log))
    (state / "cluster.json").write_text(json.dumps(dataclasses.asdict(head), indent=1) + "\n")
    deadline = time.monotonic() + timeout
    while "Ray runtime started" not in log.read_text(errors="replace") or not accepts_connections(dashboard):
        if process.poll() is not None or time.monotonic() > deadline:
            why = f"exited with status {process.returncode}" if process.returncode is not None else f"not up in {timeout:.0f} s"
            stop_head(head, remove_temp_dir=False)
            raise ClusterError(f"ray start {why}: {_last_line(log)} (all it printed: {log}; Ray's logs: {temp_dir})")
        time.sleep(0.5)
    return head


def stop_head(head: HeadNode, remove_temp_dir: bool = True, grace: float = 60.0) -> int:
    """Stops the cluster ``head`` (`ray start` drains the node and stops what it started, in a
    few seconds; whatever outlives it is killed), forgets it and, unless told otherwise, removes
    its temp dir (its logs and the working dirs Ray unpacked). Returns how many processes it had."""
    found = head.processes()
    if _is_our_head(head):
        os.kill(head.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while _alive(head.pid) and time.monotonic() < deadline:
            time.sleep(0.25)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        left = head.processes()
        for pid in left:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + 5
        while left and any(_alive(pid) for pid in left) and time.monotonic() < deadline:
            time.sleep(0.1)
    for name in ("cluster.json", "auth_token"):
        (state_folder() / name).unlink(missing_ok=True)
    if remove_temp_dir:
        shutil.rmtree(head.temp_dir, ignore_errors=True)
    return len(found)


def forget_stale_head() -> HeadNode | None:
    """The cluster recorded but no longer running (its `ray start` gone), stopped and forgotten."""
    try:
        head = HeadNode(**json.loads((state_folder() / "cluster.json").read_text()))
    except (OSError, ValueError, TypeError):
        return None
    if _is_our_head(head):
        return None
    stop_head(head, remove_temp_dir=False)
    return head


def _is_our_head(head: HeadNode) -> bool:
    """Whether ``head.pid`` is still that `ray start` (and not a process that got its number since)."""
    try:
        command = Path(f"/proc/{head.pid}/cmdline").read_bytes().split(b"\0")
        environment = Path(f"/proc/{head.pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"--head" in command and f"{_MARK_VARIABLE}={head.mark}".encode() in environment


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has stopped
    except (OSError, IndexError):
        return False


def _free_ports(count: int, fixed: list[int | None]) -> list[int]:
    """``count`` ports: those ``fixed`` gives (where not None), the others free on 127.0.0.1 now
    (their sockets stay open until all are picked, so that they differ)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        free = [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()
    return [given if given is not None else chosen for given, chosen in zip(fixed + [None] * count, free)]


def accepts_connections(port: int) -> bool:
    """Whether something listens on 127.0.0.1:``port`` (a dashboard that is up)."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def _last_line(log: Path) -> str:
    """What `ray start` said last: the last error it printed (a traceback's last line), else its last line."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"[\w.]*(Error|Exception)\b", line)]
    return (errors or lines or ["it printed nothing"])[-1]
