"""``maskray browse OUTPUT``: serve a web gallery of a segmentation output on 127.0.0.1
(``maskray.pipeline.results.browse``), until Ctrl-C. ``--host`` serves elsewhere, with a
warning: the pages show every image of the output to whoever reaches the port."""

import argparse
import sys

from maskray.jobs.arguments import add_storage_options_argument
from maskray.jobs.cli import reports_user_errors
from maskray.pipeline.options import positive_int


def port_number(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port must be a whole number in 0..65535 (0: any free one), got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output", metavar="OUTPUT", help="a segmentation output (any fsspec URL)")
    parser.add_argument("--port", type=port_number, default=8000,
                        help="the port to listen on (default 8000; 0: any free one)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="the address to listen on (default 127.0.0.1: this machine only; another address "
                             "shows the output's images to every machine that reaches it)")
    parser.add_argument("--page-size", type=positive_int, default=None, help="cards per gallery page (default 50)")
    add_storage_options_argument(parser)


@reports_user_errors
def run(args: argparse.Namespace) -> int:
    from maskray.pipeline.results import browse
    from maskray.pipeline.results.query import output_progress

    progress = output_progress(args.output, args.storage_options)  # no output there: one line, before serving
    sock = _listen(args.host, args.port)  # a port in use: one line, before the index is built
    try:
        if not browse.is_loopback(args.host):
            print(f"maskray browse: warning: serving on {args.host}, not this machine only: anyone who reaches "
                  "this port sees the output's images (no password)", file=sys.stderr)
        browser = browse.Browser(args.output, args.storage_options, page_size=args.page_size or browse.PAGE_SIZE)
    except BaseException:
        sock.close()
        raise
    try:
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        if not progress.finished:
            print(f"maskray browse: note: {progress.describe()}; the pages show the committed shards", file=sys.stderr)
        print(f"maskray browse: serving {browser.where_shown} ({browser.total:,} images, "
              f"{browser.total_instances:,} instances) at http://{shown}:{port}/ (Ctrl-C to stop)", flush=True)
        _serve(browse.make_app(browser, browse.allowed_hosts_for(args.host)), sock)
    finally:
        browser.close()
        sock.close()
    # uvicorn stops on SIGINT or SIGTERM and raises the signal again once stopped (KeyboardInterrupt
    # for Ctrl-C, reported as one line by reports_user_errors); here only when it stopped otherwise.
    return 0


def _listen(host: str, port: int):
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as error:
        raise OSError(f"cannot listen on {host}:{port}: no such address ({error.strerror or error})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as error:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port} ({error.strerror or error})") from None
    return sock


def _serve(app, sock) -> None:
    import uvicorn

    config = uvicorn.Config(app, log_level="warning", access_log=False, server_header=False, lifespan="off")
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    from maskray.jobs.cli import main

    sys.exit(main(["browse", *sys.argv[1:]]))
