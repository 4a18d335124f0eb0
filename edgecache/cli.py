"""The `edgecache` command line: `edgecache serve` (more subcommands arrive with their issues)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from edgecache.config import load_config
from edgecache.errors import ConfigError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgecache", description="Pull-through caching proxy for OCI container registries."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the mirror")
    serve.add_argument("--config", metavar="FILE", help="TOML configuration (see conf/edgecache.toml)")
    serve.add_argument("--listen", metavar="HOST:PORT", help="address to listen on (127.0.0.1:5000)")
    serve.add_argument(
        "--upstream",
        metavar="URL|NAME=URL",
        action="append",
        help="default upstream URL, or a named upstream NAME=URL (repeatable)",
    )
    serve.add_argument("--cache-dir", metavar="DIR", help="where the cache lives")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        config = load_config(
            args.config, listen=args.listen, cache_dir=args.cache_dir, upstreams=args.upstream
        )
        from edgecache.app import serve

        asyncio.run(serve(config))
    except ConfigError as exc:
        print(f"edgecache: configuration error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"edgecache: cannot start: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0
