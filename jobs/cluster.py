"""``maskray cluster start|env|stop``: a Ray cluster of one's own on this machine, for ``ray job submit``.

``eval "$(maskray cluster start)"`` starts `ray start --head` on 127.0.0.1 only, with its dashboard
(job submission talks to it) and token authentication, on free ports and in a temp dir of its
own; it prints, as shell lines, the environment its clients need: RAY_ADDRESS (what ``ray.init``
and ``maskray segment`` join), RAY_API_SERVER_ADDRESS (the dashboard, where ``ray job submit``
sends a job), RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH (the file holding the token: the
token itself is never printed). ``maskray cluster env`` prints them again, for another shell.
``eval "$(maskray cluster stop)"`` stops exactly that cluster (not any other Ray of the machine),
removes its temp dir and unsets them. Shell lines go to stdout, everything said to the user to
stderr. How it is done: ``maskray.pipeline.cluster.start_head``.
"""

import argparse
import shlex
import sys

from maskray.jobs.cli import reports_user_errors


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    start = actions.add_parser(
        "start", help="start Ray on 127.0.0.1 (dashboard, token auth); print the client's environment as shell lines",
        description="Start a one-node Ray cluster on 127.0.0.1 only, with its dashboard and token authentication, "
                    "and print the environment its clients need as shell lines: eval \"$(maskray cluster start)\".")
    start.add_argument("--num-cpus", type=int, help="CPUs the cluster offers (default: Ray's, all of the machine's)")
    start.add_argument("--num-gpus", type=int, help="GPUs the cluster offers (default: Ray's, those it finds)")
    start.add_argument("--object-store-memory", type=int, metavar="BYTES",
                       help="the object store's size (default: Ray's, 30%% of memory)")
    start.add_argument("--port", type=int, help="the GCS port, what RAY_ADDRESS names (default: a free one)")
    start.add_argument("--dashboard-port", type=int, help="the dashboard's port, where jobs are submitted "
                                                          "(default: a free one)")
    start.add_argument("--temp-dir", help="Ray's temp dir: logs, the jobs' working dirs (default: a new one under /tmp)")
    start.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for it (default %(default)s)")
    actions.add_parser("env", help="print the environment of the running cluster's clients as shell lines",
                       description="Print the environment a client of the running cluster needs, as shell lines: "
                                   "eval \"$(maskray cluster env)\".")
    stop = actions.add_parser("stop", help="stop the cluster that start started; print shell lines that unset its "
                                           "environment", description="Stop the cluster `maskray cluster start` "
                                           "started (no other Ray), remove its temp dir, and print shell lines that "
                                           "unset its environment: eval \"$(maskray cluster stop)\".")
    stop.add_argument("--keep-temp-dir", action="store_true", help="keep its temp dir (Ray's logs)")


@reports_user_errors
def run(args: argparse.Namespace) -> int:
    from maskray.pipeline import cluster

    if args.action == "start":
        stale = cluster.forget_stale_head()
        if stale is not None:
            _say(f"a cluster that was recorded had stopped (pid {stale.pid}); forgotten")
        head = cluster.start_head(num_cpus=args.num_cpus, num_gpus=args.num_gpus,
                                  object_store_memory=args.object_store_memory, port=args.port,
                                  dashboard_port=args.dashboard_port, temp_dir=args.temp_dir, timeout=args.timeout)
        print(_exports(head), flush=True)
        _say(f"Ray on 127.0.0.1: RAY_ADDRESS {head.gcs_address}, dashboard {head.dashboard_url}, token authentication "
             f"(token in {head.token_path}), logs in {head.temp_dir}; another shell: eval \"$(maskray cluster env)\"; "
             "stop: eval \"$(maskray cluster stop)\"")
        return 0
    if args.action == "env":
        head = cluster.recorded_head()
        if head is None:
            raise cluster.ClusterError(f"no cluster is running (none recorded in {cluster.state_folder()}): "
                                       "start one: eval \"$(maskray cluster start)\"")
        print(_exports(head), flush=True)
        return 0
    head = cluster.recorded_head() or cluster.forget_stale_head()
    if head is None:
        _say(f"no cluster is running (none recorded in {cluster.state_folder()})")
    else:
        count = cluster.stop_head(head, remove_temp_dir=not args.keep_temp_dir)
        kept = f"; its temp dir is kept: {head.temp_dir}" if args.keep_temp_dir else ""
        _say(f"stopped the cluster at {head.gcs_address} ({count} processes){kept}")
    print("\n".join(f"unset {name}" for name in cluster.CLIENT_VARIABLES), flush=True)
    return 0


def _exports(head) -> str:
    # RAY_AUTH_TOKEN would come before the token file: a token of another cluster's must not.
    lines = [f"export {name}={shlex.quote(value)}" for name, value in head.client_environment().items()]
    return "\n".join([*lines, "unset RAY_AUTH_TOKEN"])


def _say(text: str) -> None:
    print(f"maskray cluster: {text}", file=sys.stderr, flush=True)
