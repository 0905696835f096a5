"""The ``lmcache`` command."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence


def _plugins_list(args: argparse.Namespace) -> int:
    from lmcache.plugin.registry import (
        KINDS,
        URL_SCHEME,
        PluginError,
        plugin_modules,
        registry,
    )

    rows = [("KIND", "NAME", "DISTRIBUTION", "STATUS")]
    for kind in KINDS:
        for entry in registry.entries(kind):
            if args.no_load:
                status = "not loaded"
            else:
                try:
                    registry.load(kind, entry.name)
                    status = "ok"
                except PluginError as exc:
                    status = f"error: {exc}"
            rows.append((kind, entry.name, entry.distribution, status))
    for entry in registry.entries(URL_SCHEME):
        try:  # metadata only: which storage backend serves remote_url of this scheme
            status = f"served by {registry.backend_for_scheme(entry.name)!r}"
        except PluginError as exc:
            status = f"error: {exc}"
        rows.append((URL_SCHEME, f"{entry.name}://", entry.distribution, status))
    for name, value, distribution in plugin_modules():
        rows.append(("hooks", name, distribution, value))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row[:3], widths)) + "  " + row[3])
    return 0


def _config_check(args: argparse.Namespace) -> int:
    from lmcache.kernel.config import ConfigError, LMCacheEngineConfig

    try:
        config = LMCacheEngineConfig.from_file(args.file)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    tiers = ", ".join(s.name for s in config.storage_backend_specs()) or "(none)"
    print(f"{args.file}: ok (chunk_size {config.chunk_size}; tiers: {tiers})")
    return 0


def _config_schema(args: argparse.Namespace) -> int:
    from lmcache.kernel.config_schema import config_json_schema

    print(json.dumps(config_json_schema(), indent=2, sort_keys=False))
    return 0


def _server(args: argparse.Namespace) -> int:
    from lmcache.server.main import run

    return run(args)


def _kernels_build(args: argparse.Namespace) -> int:
    import os

    from lmcache.ops import ENV, cpu_ops, library_path

    if os.environ.get(ENV, "1") == "0":
        print(f"{ENV}=0: the CPU kernels are turned off")
        return 1
    ops = cpu_ops(wait=True)
    if ops is None:
        print("the CPU kernels could not be built (see the warning above); the torch path "
              "serves, with identical results")
        return 1
    print(f"CPU kernels ready: {library_path()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmcache", description="lmcache KV-cache engine")
    sub = parser.add_subparsers(dest="command", required=True)

    plugins = sub.add_parser("plugins", help="inspect installed plugins")
    psub = plugins.add_subparsers(dest="plugins_command", required=True)
    plist = psub.add_parser("list", help="list components, URL schemes and hook modules, and "
                            "whether they load")
    plist.add_argument("--no-load", action="store_true", help="do not import plugin code")
    plist.set_defaults(func=_plugins_list)

    config = sub.add_parser("config", help="check configuration files")
    csub = config.add_subparsers(dest="config_command", required=True)
    check = csub.add_parser("check", help="validate a YAML configuration file")
    check.add_argument("file")
    check.set_defaults(func=_config_check)
    schema = csub.add_parser("schema", help="print the JSON schema of the configuration")
    schema.set_defaults(func=_config_schema)

    kernels = sub.add_parser("kernels", help="the native CPU kernels")
    ksub = kernels.add_subparsers(dest="kernels_command", required=True)
    kbuild = ksub.add_parser("build", help="compile (or find) the CPU kernels now, so that "
                             "the first process that moves KV need not wait for them")
    kbuild.set_defaults(func=_kernels_build)

    from lmcache.server.main import add_arguments as add_server_arguments  # argparse only

    server = sub.add_parser("server", help="run the cache server (remote_url: lm://HOST:PORT)",
                            description="lmcache's cache server: engines share chunks "
                            "through it with remote_url: lm://HOST:PORT")
    add_server_arguments(server).set_defaults(func=_server)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
