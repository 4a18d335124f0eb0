"""The `edgecache` command line: serve, warm, stats, export, import, and the maintenance commands du,
prune, verify and pin. Parsing and messages live here; the work is in `app` (serve) and `ops/` (the rest)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from edgecache import __version__
from edgecache.config import Config, load_config
from edgecache.errors import ConfigError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgecache", description="Pull-through caching proxy for OCI container registries."
    )
    parser.add_argument("--version", action="version", version=f"edgecache {__version__}")
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
    serve.add_argument("--max-size", metavar="SIZE", help="cache size limit, e.g. 20G (default: none)")
    serve.add_argument("--tls-cert", metavar="FILE", help="PEM certificate (chain): --listen serves TLS")
    serve.add_argument("--tls-key", metavar="FILE", help="PEM private key of --tls-cert")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.add_argument(
        "--log-format",
        choices=["json", "text"],
        help="access log as JSON lines or readable text (default: text on a terminal, else json)",
    )
    stats = sub.add_parser("stats", help="hit ratio, bytes saved and top repositories of a running instance")
    stats.add_argument(
        "--url",
        default="http://127.0.0.1:5000",
        help="the instance's metrics address (its listen, or metrics_listen when set)",
    )
    warm = sub.add_parser("warm", help="pull images into the cache ahead of the clients")
    warm.add_argument("refs", nargs="*", metavar="REF", help="[registry/]repository[:tag|@digest]")
    warm.add_argument("--file", metavar="FILE", help="more references, one per line (# comments)")
    warm.add_argument(
        "--platform",
        action="append",
        metavar="OS/ARCH",
        help="platforms of indexes to pull (default: linux/amd64; all)",
    )
    warm.add_argument("--concurrency", type=int, default=4, help="requests at once (default 4)")
    warm.add_argument("--url", help="a running edgecache to warm through (default: open the cache directory)")
    warm.add_argument(
        "--cache-dir", metavar="DIR", help="the cache directory (when not warming through --url)"
    )
    warm.add_argument("--config", metavar="FILE", help="the configuration (cache directory, upstreams)")
    warm.add_argument("--upstream", metavar="URL|NAME=URL", action="append", help="as for serve")
    warm.add_argument(
        "--pin", action="store_true", help="also pin what was warmed (needs the cache directory)"
    )
    export = sub.add_parser("export", help="write images as an OCI layout tar (a bundle for import)")
    export.add_argument("refs", nargs="+", metavar="REF", help="[registry/]repository[:tag|@digest]")
    export.add_argument("-o", "--output", metavar="FILE", required=True, help="the bundle (.tar, .tar.zst)")
    export.add_argument(
        "--platform",
        action="append",
        metavar="OS/ARCH",
        help="platforms of indexes to include (repeatable; default: all)",
    )
    export.add_argument("--zstd", action="store_true", help="compress with zstd (implied by a .zst name)")
    export.add_argument("--url", help="a running edgecache to export through")
    export.add_argument("--cache-dir", metavar="DIR", help="export from this cache directory, no server")
    export.add_argument("--config", metavar="FILE", help="read cache.dir from this configuration")
    import_ = sub.add_parser("import", help="import a bundle (OCI layout tar) into a cache directory")
    import_.add_argument("file", metavar="FILE", help="the bundle (edgecache export's, or an oci-archive)")
    import_.add_argument("--cache-dir", metavar="DIR", help="the cache directory (default: configured)")
    import_.add_argument("--config", metavar="FILE", help="read cache.dir from this configuration")
    import_.add_argument("--pin", action="store_true", help="pin the imported tags (never evicted)")
    import_.add_argument(
        "--repository",
        metavar="[REGISTRY/]REPOSITORY",
        help="where to import images the bundle names by a bare tag (skopeo's oci-archive:FILE:TAG)",
    )
    for name, text in (
        ("du", "size, entries, pinned bytes and the largest repositories of a cache"),
        ("prune", "evict least recently used entries until the cache is at most --to SIZE"),
        ("verify", "re-hash the store; quarantine what does not match its digest"),
        ("pin", "pin images (never evicted): pin add|rm REF, pin ls"),
    ):
        command = sub.add_parser(name, help=text)
        command.add_argument(
            "--cache-dir", metavar="DIR", help="the cache directory (default: the configured one)"
        )
        command.add_argument("--config", metavar="FILE", help="read cache.dir from this configuration")
        if name == "prune":
            command.add_argument("--to", metavar="SIZE", required=True, help="target size, e.g. 10G")
        if name == "verify":
            command.add_argument("--sample", type=int, metavar="N", help="check N random entries only")
        if name == "pin":
            command.add_argument("action", choices=["add", "rm", "ls"])
            command.add_argument("ref", nargs="?", help="[registry/]repository[:tag], globs allowed")
    return parser


def run_maintenance(args: argparse.Namespace) -> int:
    from edgecache.ops import maintenance
    from edgecache.sizes import parse_size

    cache_dir = load_config(args.config, cache_dir=args.cache_dir).cache.dir
    if args.command == "du":
        return maintenance.du(cache_dir)
    if args.command == "prune":
        return maintenance.prune(cache_dir, parse_size(args.to, "--to"))
    if args.command == "verify":
        return maintenance.verify(cache_dir, args.sample, progress=sys.stderr.isatty())
    if args.action != "ls" and not args.ref:
        raise ConfigError(f"pin {args.action}: a reference is needed, e.g. docker.io/library/alpine:3.19")
    return maintenance.pin(cache_dir, args.action, args.ref)


def run_warm(args: argparse.Namespace) -> int:
    from edgecache.ops import maintenance, warm
    from edgecache.sizes import human_size

    texts = list(args.refs)
    if args.file:
        try:
            lines = Path(args.file).read_text().splitlines()
        except OSError as exc:
            raise ConfigError(f"--file {args.file}: {exc.strerror}") from None
        texts += [line.split("#", 1)[0].strip() for line in lines if line.split("#", 1)[0].strip()]
    if not texts:
        raise ConfigError("nothing to warm: give image references or --file")
    refs = [warm.parse_ref(text) for text in texts]
    config = load_config(args.config, cache_dir=args.cache_dir, upstreams=args.upstream)
    if args.pin and args.url and not args.cache_dir and not args.config:
        raise ConfigError("--pin with --url also needs --cache-dir (or --config) of that instance")
    summary = asyncio.run(
        warm.run(
            refs,
            url=args.url,
            config=config,
            platforms=args.platform or ["linux/amd64"],
            concurrency=args.concurrency,
        )
    )
    fetched, cached = human_size(summary.fetched_bytes), human_size(summary.cached_bytes)
    print(
        f"warmed {summary.images}/{len(refs)} images: {summary.blobs} blobs, "
        f"{fetched} fetched, {cached} already cached"
    )
    for failure in summary.failures:
        print(f"edgecache warm: {failure}", file=sys.stderr)
    if args.pin:
        for ref in refs:
            if ":" in ref.reference:
                print(f"edgecache warm: {ref} not pinned: pins name tags, not digests", file=sys.stderr)
            elif str(ref) in summary.failed:
                print(f"edgecache warm: {ref} not pinned: it was not warmed", file=sys.stderr)
            else:
                maintenance.pin(config.cache.dir, "add", str(ref))
    return 1 if summary.failures else 0


def run_export(args: argparse.Namespace) -> int:
    from edgecache.ops import bundle_export, warm
    from edgecache.sizes import human_size

    refs = [warm.parse_ref(text) for text in args.refs]
    if args.url and (args.cache_dir or args.config):
        raise ConfigError("give --url or --cache-dir, not both")
    cache_dir = None
    if not args.url:
        if not args.cache_dir and not args.config:
            raise ConfigError("give --url of a running edgecache, or --cache-dir (or --config)")
        cache_dir = Path(load_config(args.config, cache_dir=args.cache_dir).cache.dir).expanduser()
    output = Path(args.output)
    zstd = args.zstd or output.suffix in (".zst", ".zstd")
    try:
        done = asyncio.run(
            bundle_export.run(
                refs,
                output,
                url=args.url,
                cache_dir=cache_dir,
                platforms=args.platform or [],
                zstd=zstd,
                progress=sys.stderr.isatty(),
            )
        )
    except bundle_export.ExportError as exc:
        print(f"edgecache export: {exc}", file=sys.stderr)
        return 1
    for note in done.notes:
        print(f"edgecache export: {note}", file=sys.stderr)
    print(
        f"exported {done.images} images to {output}: {done.manifests} manifests, {done.blobs} blobs, "
        f"{done.signatures} signatures, {human_size(done.content_bytes)} "
        f"({human_size(done.file_bytes)} on disk)"
        + (f"; {done.platforms_left_out} platforms left out" if done.platforms_left_out else "")
    )
    return 0


def run_import(args: argparse.Namespace) -> int:
    from edgecache.ops import bundle_import

    cache_dir = Path(load_config(args.config, cache_dir=args.cache_dir).cache.dir)
    try:
        done = bundle_import.run(
            Path(args.file),
            cache_dir,
            pin=args.pin,
            repository=args.repository,
            progress=sys.stderr.isatty(),
        )
    except bundle_import.BundleError as exc:
        print(f"edgecache import: {exc}; nothing was imported", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"edgecache import: {exc.filename or args.file}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    for note in done.notes:
        print(f"edgecache import: {note}", file=sys.stderr)
    print(bundle_import.describe(done))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "stats":
        from edgecache.ops.stats import main as stats_main

        return stats_main(args.url)
    if args.command == "warm":
        try:
            return run_warm(args)
        except ConfigError as exc:
            print(f"edgecache warm: {exc}", file=sys.stderr)
            return 2
    if args.command in ("export", "import"):
        try:
            return run_export(args) if args.command == "export" else run_import(args)
        except ConfigError as exc:
            print(f"edgecache {args.command}: {exc}", file=sys.stderr)
            return 2
    if args.command in ("du", "prune", "verify", "pin"):
        try:
            return run_maintenance(args)
        except ConfigError as exc:
            print(f"edgecache {args.command}: {exc}", file=sys.stderr)
            return 2
    log_format = args.log_format or ("text" if sys.stderr.isatty() else "json")
    handler = logging.StreamHandler()
    if log_format == "json":
        from edgecache.http.accesslog import JsonFormatter

        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=args.log_level.upper(), handlers=[handler])
    # No format here shows a record's thread or process, and looking them up is most of what making
    # a record costs (every request makes one with the access log on).
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    try:

        def load() -> Config:
            return load_config(
                args.config,
                listen=args.listen,
                cache_dir=args.cache_dir,
                upstreams=args.upstream,
                max_size=args.max_size,
                tls_cert=args.tls_cert,
                tls_key=args.tls_key,
            )

        config = load()
        from edgecache.app import serve

        asyncio.run(serve(config, log_format, reload=load, log_handler=handler))
    except ConfigError as exc:
        print(f"edgecache: configuration error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"edgecache: cannot start: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0
