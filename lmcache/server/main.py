"""The cache server's command line: ``python -m lmcache.server HOST PORT [DEVICE] [options]``,
also ``python -m lmcache.experimental.server``, ``python -m lmcache.v1.server`` and
``lmcache server``.

Importing this module is cheap (argparse only): the ``lmcache`` command builds its
``server`` sub-command from `add_arguments` without loading torch.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["add_arguments", "main", "run"]

logger = logging.getLogger("lmcache.server")

DEFAULT_CPU_GB = 4.0
DEFAULT_DISK_GB = 16.0
#: ``--prefault`` as the allocators take it (`lmcache.builtin.allocators.region`).
_PREFAULT_MODES = {"background": "background", "now": True, "off": False}


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The server's arguments, on ``parser``."""
    parser.add_argument("host", help="address to listen on (localhost, 0.0.0.0, ...)")
    parser.add_argument("port", type=int, help="TCP port to listen on (0: any free port)")
    parser.add_argument("device", nargs="?", default="cpu",
                        help="accepted for compatibility with LMCache's server: the server "
                        "keeps chunks in host memory; any other device is reported and "
                        "the server goes on with host memory")
    parser.add_argument("--cpu-gb", type=float, default=DEFAULT_CPU_GB,
                        help="memory budget in GiB (least recently used chunks are evicted "
                        "beyond it; default %(default)s)")
    parser.add_argument("--disk", metavar="PATH",
                        help="directory (or fsspec URL) of a disk tier that keeps every "
                        "chunk written through, so that a restarted server finds them")
    parser.add_argument("--disk-gb", type=float, default=DEFAULT_DISK_GB,
                        help="budget of the disk tier in GiB (default %(default)s)")
    parser.add_argument("--max-clients", type=int, default=256,
                        help="connections served at once; more are answered BUSY "
                        "(default %(default)s)")
    parser.add_argument("--max-value-mb", type=float, default=1024.0,
                        help="largest value a client may store, in MiB (default "
                        "%(default)s)")
    parser.add_argument("--idle-timeout", type=float, default=300.0, metavar="S",
                        help="close a connection idle this long (default %(default)s s)")
    parser.add_argument("--frame-timeout", type=float, default=60.0, metavar="S",
                        help="a request must arrive whole, and its reply be taken, within "
                        "this time once it has begun (default %(default)s s)")
    parser.add_argument("--stats-interval", type=float, default=60.0, metavar="S",
                        help="log the counters this often; 0: never (default %(default)s s)")
    parser.add_argument("--prefault", nargs="?", const="now", default="background",
                        choices=["background", "now", "off"],
                        help="when the memory budget gets backed by memory: by a thread of "
                        "idle priority after start-up (background, the default), before "
                        "serving (now; --prefault alone), or on first use (off)")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


def run(args: argparse.Namespace) -> int:
    """Start the server described by ``args`` (see `add_arguments`) and serve until
    SIGTERM or SIGINT; returns the exit status."""
    logging.basicConfig(level=getattr(logging, args.log_level),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if str(args.device).lower() != "cpu":
        print(f"lmcache server: device {args.device!r} ignored: the server keeps chunks in "
              "host memory", file=sys.stderr, flush=True)
    problems = [f"{name} must be > 0, got {value}" for name, value in (
        ("--cpu-gb", args.cpu_gb), ("--disk-gb", args.disk_gb),
        ("--max-clients", args.max_clients), ("--max-value-mb", args.max_value_mb),
        ("--idle-timeout", args.idle_timeout), ("--frame-timeout", args.frame_timeout))
        if not value > 0]
    if not 0 <= args.port < 65536:
        problems.append(f"PORT must be in [0, 65535], got {args.port}")
    if problems:
        print("lmcache server: " + "; ".join(problems), file=sys.stderr)
        return 2

    from lmcache.kits.wire import Limits
    from lmcache.server.cache_server import CacheServer
    from lmcache.server.store import ChunkStore

    try:
        store = ChunkStore(int(args.cpu_gb * 1024**3), args.disk,
                           int(args.disk_gb * 1024**3),
                           prefault=_PREFAULT_MODES[args.prefault])
    except (ValueError, OSError) as exc:
        print(f"lmcache server: {exc}", file=sys.stderr)
        return 2
    server = CacheServer(args.host, args.port, store,
                         limits=Limits(max_payload=int(args.max_value_mb * 1024**2)),
                         max_clients=args.max_clients, idle_timeout_s=args.idle_timeout,
                         frame_timeout_s=args.frame_timeout,
                         stats_interval_s=args.stats_interval)
    try:
        server.start()
    except OSError as exc:
        print(f"lmcache server: cannot listen on {args.host}:{args.port}: {exc}",
              file=sys.stderr)
        store.close()
        return 1

    def stop(signum: int, _frame: Any) -> None:
        logger.info("signal %d: stopping", signum)
        server.stop()

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    host, port = server.address
    disk = f", disk tier {args.disk} ({args.disk_gb:g} GiB)" if args.disk else ""
    print(f"lmcache server listening on {host}:{port} ({args.cpu_gb:g} GiB in memory{disk})",
          flush=True)
    try:
        while not server.wait(1.0):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        server.stop()
        store.close()
        logger.info("lmcache server %s:%d stopped: %s", host, port, server.stats_line())
    return 0


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """``HOST PORT [DEVICE] [options]`` (see `add_arguments`)."""
    parser = add_arguments(argparse.ArgumentParser(
        prog=prog or "python -m lmcache.server",
        description="lmcache's cache server: engines share chunks through it with "
        "remote_url: lm://HOST:PORT"))
    return run(parser.parse_args(argv))
